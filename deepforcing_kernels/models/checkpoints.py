"""Checkpoint loading, in one place: recognise the checkpoints the field ships and load them into
:class:`~deepforcing_kernels.models.CausalWanModel` (:func:`load_checkpoint`), down to the strict name and shape
check of :func:`load_wan_state_dict`.

Layouts, recognised by their keys (what each project's loading code reads):

* ``self_forcing`` -- ``{"generator": sd, "generator_ema": sd, ...}`` with the DiT under Self-Forcing's
  ``WanDiffusionWrapper`` (``model.blocks.0.self_attn.q.weight``); EMA copies saved from FSDP carry
  ``model._fsdp_wrapped_module.`` (guandeh17/Self-Forcing ``inference.py``: ``state_dict['generator' if not
  use_ema else 'generator_ema']``). Causal Forcing (thu-ml/Causal-Forcing: ``chunkwise/causal_forcing.pt``,
  ``causal-forcing++/framewise-2step.pt``, ``chunkwise/longvideo.pt``) and Rolling Forcing
  (TencentARC/RollingForcing: ``checkpoints/rolling_forcing_dmd.pt``) save the same layout; their keys cannot tell
  the three apart, and do not need to.
* ``longlive`` -- NVlabs/LongLive: a base checkpoint of that layout (``longlive_base.pt``) plus a LoRA
  (``lora.pt`` = ``{"generator_lora": peft_sd}``, or the peft state dict itself, or ``generator_lora`` inside the
  base checkpoint) whose keys are peft's ``base_model.model.blocks.N.self_attn.q.lora_A.weight`` /
  ``lora_B.weight`` on every Linear of the attention blocks. The LoRA is merged on load:
  ``W += (alpha / r) * B @ A`` (peft's ``merge_and_unload``); LongLive's configs set ``alpha = rank`` (256 for
  LongLive 1.3B), so ``lora_alpha=None`` means scale 1.
* ``safetensors`` -- a ``.safetensors`` file (or a folder of shards with ``*.safetensors.index.json``) holding the
  DiT flat, with or without the wrapper's ``model.`` prefix: Krea Realtime 14B's
  ``krea-realtime-video-14b.safetensors`` (``model.blocks.0.self_attn.k.weight`` of 5120 rows: Wan2.1-14B sizes),
  Wan2.1's own ``diffusion_pytorch_model*.safetensors``.
* ``state_dict`` -- a plain state dict with Wan2.1's names (optionally under ``model`` / ``state_dict`` /
  ``module``).

Everything ends in :func:`deepforcing_kernels.models.load_wan_state_dict`, which strips the remaining wrapper
prefixes and checks every name and shape. Errors are one ``ValueError`` saying which layout was recognised and
what did not match.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .wan import CausalWanModel

__all__ = ["load_checkpoint", "read_checkpoint", "detect_layout", "merge_lora", "wan_sizes_from_state_dict",
           "CheckpointInfo", "load_wan_state_dict", "LoadResult"]

PathOrSD = Union[str, os.PathLike, Mapping[str, Any]]

_GEN = ("generator", "generator_ema")
_LORA_KEY = "generator_lora"
_LORA_RE = re.compile(r"(.+)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight")
# names only diffusers' WanTransformer3DModel uses
_DIFFUSERS_DIT = ("condition_embedder.", ".attn1.to_q.", "proj_out.", "scale_shift_table")


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` recognised and did.

    Attributes:
        layout: ``"self_forcing"``, ``"longlive"``, ``"safetensors"`` or ``"state_dict"``.
        source: the path (or ``"<state dict>"``).
        selected: the top-level key used (``"generator"`` / ``"generator_ema"``), if any.
        lora_modules: Linear layers a LoRA was merged into (0 without one).
        lora_rank, lora_scale: the merged LoRA's rank and ``alpha / rank``.
        sizes: the DiT's sizes read from the weights' shapes (see :func:`wan_sizes_from_state_dict`).
    """

    layout: str
    source: str
    selected: Optional[str] = None
    lora_modules: int = 0
    lora_rank: Optional[int] = None
    lora_scale: Optional[float] = None
    sizes: Dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- reading
def _torch_load(p: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(str(p), map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except RuntimeError as e:
        if "mmap" in str(e):  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(str(p), map_location="cpu", weights_only=not trust_pickle)
        raise


def read_checkpoint(path: Union[str, os.PathLike], *, trust_pickle: bool = False) -> Mapping[str, Any]:
    """Read a checkpoint file (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` by ``torch.load``, memory-mapped and
    tensors-only unless ``trust_pickle``; ``.safetensors``) or a folder of safetensors shards.

    Raises:
        FileNotFoundError: no such file or folder. ValueError: not a readable checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        return _read_folder(p)
    if p.suffix == ".safetensors":
        return _read_safetensors([p])
    try:
        obj = _torch_load(p, trust_pickle)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors all mean "not a checkpoint we can read"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"checkpoint {str(p)!r} holds Python objects besides tensors; load it with "
                             "trust_pickle=True only if you trust its source") from None
        raise ValueError(f"checkpoint {str(p)!r} is not a readable torch checkpoint ({msg})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {str(p)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _read_safetensors(files: List[Path]) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError('reading .safetensors needs the package safetensors: pip install safetensors '
                          '(or pip install "deepforcing_kernels[video]")') from None
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise ValueError(f"checkpoint {str(f)!r} is not a readable safetensors file "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return out


def _read_folder(p: Path) -> Dict[str, torch.Tensor]:
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{str(indexes[0])!r} is not a safetensors index ({e})") from None
        shards = sorted({p / s for s in weight_map.values()})
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"{str(indexes[0])!r} names missing shards: {', '.join(missing[:4])}")
        return _read_safetensors(shards)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return _read_safetensors(files)
    if not files:
        raise FileNotFoundError(f"checkpoint folder {str(p)!r} has no .safetensors file; pass the checkpoint file")
    raise ValueError(f"checkpoint folder {str(p)!r} has {len(files)} .safetensors files and no "
                     "*.safetensors.index.json; pass one file")


# ---------------------------------------------------------------------------------------------------- layout
def _strip(key: str) -> str:
    """The one key normalisation (:func:`_normalise_key`)."""
    return _normalise_key(key)


def _is_lora_sd(sd: Mapping[str, Any]) -> bool:
    keys = [k for k in sd if isinstance(k, str)]
    return bool(keys) and all(".lora_" in k for k in keys)


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def detect_layout(ckpt: Mapping[str, Any]) -> str:
    """The layout of a loaded checkpoint: ``"self_forcing"`` (generator / generator_ema dicts), ``"longlive"``
    (those plus ``generator_lora``), ``"lora"`` (a LoRA alone), ``"state_dict"`` (flat tensors, possibly under
    ``model`` / ``state_dict`` / ``module``), or ``"unknown"``."""
    if any(isinstance(ckpt.get(k), Mapping) for k in _GEN):
        return "longlive" if isinstance(ckpt.get(_LORA_KEY), Mapping) else "self_forcing"
    if isinstance(ckpt.get(_LORA_KEY), Mapping) or (_tensor_dict(ckpt) and _is_lora_sd(ckpt)):
        return "lora"
    if _tensor_dict(ckpt):
        return "state_dict"
    for k in ("model", "state_dict", "module"):
        if _tensor_dict(ckpt.get(k)):
            return "state_dict"
    return "unknown"


def _top_keys(ckpt: Mapping[str, Any], n: int = 10) -> str:
    ks = [str(k) for k in list(ckpt)[:n]]
    return ", ".join(ks) + (", ..." if len(ckpt) > n else "") if ks else "(empty)"


def _select(ckpt: Mapping[str, Any], use_ema: Optional[bool], src: str) -> Tuple[Mapping[str, Any], str]:
    if use_ema is True:
        if not isinstance(ckpt.get("generator_ema"), Mapping):
            raise ValueError(f"{src}: use_ema=True but the checkpoint has no 'generator_ema' (keys: {_top_keys(ckpt)})")
        return ckpt["generator_ema"], "generator_ema"
    if isinstance(ckpt.get("generator"), Mapping):
        return ckpt["generator"], "generator"
    if use_ema is False:
        raise ValueError(f"{src}: use_ema=False but the checkpoint has no 'generator' (keys: {_top_keys(ckpt)})")
    return ckpt["generator_ema"], "generator_ema"


def wan_sizes_from_state_dict(sd: Mapping[str, Any]) -> Dict[str, int]:
    """The Wan DiT's sizes read from a state dict's shapes (after any prefixes): dim, ffn_dim, num_layers,
    in_dim, out_dim, text_dim, freq_dim, and num_heads = dim / 128 (Wan2.1's head size). Missing entries are
    left out. Wan2.1-1.3B: dim 1536, 30 layers; Wan2.1-14B (Krea Realtime 14B): dim 5120, ffn 13824, 40 layers."""
    s = {_strip(k): v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    out: Dict[str, int] = {}
    if "patch_embedding.weight" in s:
        w = s["patch_embedding.weight"]
        out["dim"], out["in_dim"] = int(w.shape[0]), int(w.shape[1])
        if out["dim"] % 128 == 0:
            out["num_heads"] = out["dim"] // 128
    if "blocks.0.ffn.0.weight" in s:
        out["ffn_dim"] = int(s["blocks.0.ffn.0.weight"].shape[0])
    layers = {int(m.group(1)) for k in s for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if layers:
        out["num_layers"] = max(layers) + 1
    if "text_embedding.0.weight" in s:
        out["text_dim"] = int(s["text_embedding.0.weight"].shape[1])
    if "time_embedding.0.weight" in s:
        out["freq_dim"] = int(s["time_embedding.0.weight"].shape[1])
    if "head.head.weight" in s and "patch_embedding.weight" in s:
        pe = s["patch_embedding.weight"]
        out["out_dim"] = int(s["head.head.weight"].shape[0]) // max(1, int(pe[0, 0].numel()))
    return out


# ---------------------------------------------------------------------------------------------------- LoRA
def merge_lora(base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], *,
               lora_alpha: Optional[float] = None) -> Tuple[Dict[str, torch.Tensor], int, int, float]:
    """Merge a peft LoRA into a DiT state dict: for every ``X.lora_A.weight`` [r, in] / ``X.lora_B.weight``
    [out, r] pair, ``X.weight += (alpha / r) * B @ A`` (in float32, cast back to the weight's dtype).

    Both dicts may carry wrapper prefixes (``base_model.model.``, ``model.``, FSDP's); an adapter name between
    ``lora_A`` and ``weight`` (``lora_A.default.weight``) is accepted. ``lora_alpha`` None means alpha = r.

    Returns:
        (merged state dict with normalised names, modules merged, rank, scale).

    Raises:
        ValueError: a pair incomplete, a target missing from the base, a shape mismatch, ranks that differ, keys
            that are not plain LoRA (DoRA magnitudes, embedding LoRAs), listed.
    """
    merged = {_strip(k): v for k, v in base.items()}
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    bad: List[str] = []
    for k, v in lora.items():
        m = _LORA_RE.fullmatch(_strip(k))
        if m is None or not isinstance(v, torch.Tensor):
            bad.append(k)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    incomplete = [f"{t} (lora_{'B' if 'A' in p else 'A'} missing)" for t, p in pairs.items() if len(p) != 2]
    no_target = [t for t in pairs if f"{t}.weight" not in merged]
    if bad or incomplete or no_target:
        raise ValueError("LoRA does not match the base checkpoint: "
                         + "; ".join(part for part in (
                             f"not LoRA weights ({len(bad)}): {', '.join(bad[:6])}" if bad else "",
                             f"incomplete ({len(incomplete)}): {', '.join(incomplete[:6])}" if incomplete else "",
                             f"no base weight for ({len(no_target)}): {', '.join(t + '.weight' for t in no_target[:6])}"
                             if no_target else "") if part))
    if not pairs:
        raise ValueError("LoRA holds no lora_A / lora_B weights")
    ranks = {int(p["A"].shape[0]) for p in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ between modules ({sorted(ranks)}); one rank per LoRA is supported")
    r = ranks.pop()
    scale = float(r if lora_alpha is None else lora_alpha) / r
    for t, p in pairs.items():
        a, b, w = p["A"], p["B"], merged[f"{t}.weight"]
        if a.dim() != 2 or b.dim() != 2 or w.dim() != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != w.shape:
            raise ValueError(f"LoRA for {t}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                             f"{t}.weight {list(w.shape)}")
        merged[f"{t}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged, len(pairs), r, scale


# ---------------------------------------------------------------------------------------------------- loading
def _as_mapping(obj: PathOrSD, trust_pickle: bool) -> Tuple[Mapping[str, Any], str, bool]:
    if isinstance(obj, Mapping):
        return obj, "<state dict>", False
    p = Path(obj)
    is_st = p.suffix == ".safetensors" or p.is_dir()
    return read_checkpoint(p, trust_pickle=trust_pickle), str(p), is_st


def load_checkpoint(model: Any, path_or_sd: PathOrSD, *, lora: Optional[PathOrSD] = None,
                    lora_alpha: Optional[float] = None, use_ema: Optional[bool] = None, strict: bool = True,
                    trust_pickle: bool = False) -> CheckpointInfo:
    """Load a Self-Forcing / Causal Forcing / Rolling Forcing / LongLive / Krea / Wan2.1 checkpoint into ``model``.

    Args:
        model: a :class:`~deepforcing_kernels.models.CausalWanModel` of the checkpoint's sizes.
        path_or_sd: a checkpoint file, a folder of safetensors shards, or an already loaded checkpoint.
        lora: a LongLive LoRA (``lora.pt``: ``{"generator_lora": ...}`` or the peft dict), merged into the base;
            also found as ``generator_lora`` inside the base checkpoint.
        lora_alpha: the LoRA's alpha (scale = alpha / rank); None: alpha = rank, as LongLive's configs.
        use_ema: take ``generator_ema`` (True) or ``generator`` (False) of a training checkpoint; None:
            ``generator`` when present, else ``generator_ema``.
        strict: every name must match (default); see ``load_wan_state_dict``.
        trust_pickle: allow ``torch.load`` to unpickle non-tensor objects (only for files you trust).

    Returns:
        :class:`CheckpointInfo`.

    Raises:
        ValueError: an unrecognised layout, a LoRA-only file given as the base, a LoRA that does not fit, or
            names / shapes that do not match the model (the layout and the checkpoint's sizes are named).
        FileNotFoundError: a missing file.
    """
    ckpt, src, is_st = _as_mapping(path_or_sd, trust_pickle)
    layout = detect_layout(ckpt)
    selected: Optional[str] = None
    if layout == "lora":
        raise ValueError(f"{src} is a LoRA alone (LongLive's lora.pt); pass the base checkpoint "
                         "(e.g. longlive_base.pt) and lora=this file")
    if layout == "unknown":
        raise ValueError(f"{src}: not a recognised checkpoint layout (expected 'generator' / 'generator_ema' "
                         f"dicts, a LongLive base + LoRA, or a flat Wan state dict); top-level keys: {_top_keys(ckpt)}")
    lora_sd: Optional[Mapping[str, Any]] = None
    if layout in ("self_forcing", "longlive"):
        sd, selected = _select(ckpt, use_ema, src)
        if layout == "longlive":
            lora_sd = ckpt[_LORA_KEY]
    else:
        sd = ckpt
        if not _tensor_dict(sd):
            for k in ("model", "state_dict", "module"):
                if _tensor_dict(ckpt.get(k)):
                    sd, selected = ckpt[k], k
                    break
        if is_st:
            layout = "safetensors"
    if any(d in k for k in list(sd)[:2000] for d in _DIFFUSERS_DIT):
        raise ValueError(f"{src}: these are diffusers WanTransformer3DModel names (condition_embedder, attn1.to_q, "
                         "...); load the original-format file (e.g. Krea's krea-realtime-video-14b.safetensors or "
                         "Wan2.1's diffusion_pytorch_model*.safetensors)")
    if lora is not None:
        other, lsrc, _ = _as_mapping(lora, trust_pickle)
        if isinstance(other.get(_LORA_KEY), Mapping):
            other = other[_LORA_KEY]
        elif not _is_lora_sd(other):
            raise ValueError(f"lora {lsrc}: not a LoRA state dict (no 'generator_lora' and not all keys *.lora_*); "
                             f"top-level keys: {_top_keys(other)}")
        lora_sd = other
    info = CheckpointInfo(layout="longlive" if lora_sd is not None else layout, source=src, selected=selected,
                          sizes=wan_sizes_from_state_dict(sd))
    if lora_sd is not None:
        sd, info.lora_modules, info.lora_rank, info.lora_scale = merge_lora(sd, lora_sd, lora_alpha=lora_alpha)
    try:
        load_wan_state_dict(model, sd, strict=strict)
    except ValueError as e:
        sizes = ", ".join(f"{k}={v}" for k, v in info.sizes.items())
        what = f"{info.layout} layout" + (f", {selected!r}" if selected else "")
        hint = ""
        cfg = getattr(model, "config", None)
        if cfg is not None and info.sizes.get("dim") not in (None, getattr(cfg, "dim", None)):
            hint = (f"; the checkpoint is dim={info.sizes['dim']} but the model is dim={cfg.dim}"
                    + (" (Wan2.1-14B sizes, e.g. Krea Realtime 14B)" if info.sizes.get("dim") == 5120 else ""))
        raise ValueError(f"{src} ({what}; checkpoint sizes: {sizes}){hint}: {e}") from None
    return info


# ---------------------------------------------------------------------------------------------------- strict load
class LoadResult(NamedTuple):
    """What :func:`load_wan_state_dict` did with ``strict=False``."""

    missing: List[str]
    unexpected: List[str]


# Wrapper modules insert these anywhere in a name (FSDP, activation checkpointing, torch.compile).
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes: Self-Forcing's WanDiffusionWrapper keeps the DiT as ``.model``, training scripts save the
# generator as ``generator`` / ``generator_ema``, DDP adds ``module.``, peft ``base_model.model.`` (LongLive's LoRA).
_PREFIXES = ("base_model.model.", "module.", "generator_ema.", "generator.", "model.")
# Top-level keys of a training checkpoint that hold a state dict, in order of preference.
_CONTAINERS = ("generator", "generator_ema", "state_dict", "model", "module")


def _normalise_key(key: str, prefixes: Sequence[str] = _PREFIXES) -> str:
    """``key`` without wrapper-module infixes and leading ``prefixes`` (repeatedly: ``module.model.x`` -> ``x``)."""
    for w in _INNER_WRAPPERS:
        key = key.replace(w, "")
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_wan_state_dict(model: CausalWanModel, sd: Mapping[str, Any], *, strict: bool = True,
                        select: Optional[str] = None) -> LoadResult:
    """Load a Wan2.1 / Self-Forcing state dict into ``model``.

    Args:
        model: the :class:`CausalWanModel` to fill.
        sd: a state dict with the original Wan names (``patch_embedding.weight``, ``blocks.0.self_attn.q.weight``,
            ..., ``head.head.weight``). Wrapper prefixes are stripped: ``model.`` (Self-Forcing's wrapper),
            ``generator.`` / ``generator_ema.``, ``module.`` (DDP) and, anywhere in a name,
            ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` / ``_orig_mod.``. A whole training
            checkpoint (``{"generator": sd, "generator_ema": sd, ...}``) is unwrapped too.
        strict: raise ``ValueError`` listing every missing and unexpected key (default); otherwise load what
            matches and report the rest.
        select: the top-level key to unwrap (e.g. ``"generator_ema"`` for Self-Forcing's EMA weights); by default
            the first of ``generator``, ``generator_ema``, ``state_dict``, ``model``, ``module`` that holds a dict.

    Returns:
        :class:`LoadResult` (missing and unexpected names; both empty after a strict load).

    Raises:
        TypeError: ``model`` or ``sd`` is of the wrong kind.
        ValueError: missing / unexpected keys (strict), a shape mismatch, or two keys that name one parameter.
    """
    if not isinstance(model, CausalWanModel):
        raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a mapping of names to tensors, got {type(sd).__name__}")
    if select is not None:
        if select not in sd or not isinstance(sd[select], Mapping):
            raise ValueError(f"select={select!r} is not a key of sd holding a state dict; keys: {sorted(sd)[:10]}")
        sd = sd[select]
    else:
        for key in _CONTAINERS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    renamed: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"state dict keys must be str, got {type(k).__name__}")
        nk = _normalise_key(k)
        if nk in renamed:
            raise ValueError(f"keys {origin[nk]!r} and {k!r} both name parameter {nk!r}")
        renamed[nk], origin[nk] = v, k
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed), key=_natural)
    unexpected = sorted(set(renamed) - set(own), key=_natural)
    if strict and (missing or unexpected):
        raise ValueError("state dict does not match the Wan model:\n"
                         f"  missing ({len(missing)}): {_short(missing)}\n"
                         f"  unexpected ({len(unexpected)}): {_short([origin[u] for u in unexpected])}")
    with torch.no_grad():
        for name, t in own.items():
            if name not in renamed:
                continue
            src = renamed[name]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"{origin[name]!r} must be a tensor, got {type(src).__name__}")
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{origin[name]!r} has shape {list(src.shape)} but {name} is {list(t.shape)}")
            t.copy_(src.to(device=t.device, dtype=t.dtype))
    return LoadResult(missing, unexpected)


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _short(names: List[str], limit: int = 12) -> str:
    if not names:
        return "none"
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
