"""What the runs of ``deepforcing generate`` share: reading inputs, checking the device and backend, the settings a
run is saved with, the save interval and the stop request. Every failure is one line naming the flag or file."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import torch

from ...models import build_model as _build_named_model
from ...models import random_text_embeds  # noqa: F401  (re-exported for the runs)
from ...presets import canonical_model_name, canonical_policy_name, make_policy, recipe, torch_dtype
from .._common import StopRequest, fail

__all__ = ["policy_from_args", "jitter_from_args", "check_head_jitter", "sampling_from_args", "build_model", "random_text_embeds", "read_tensors", "load_text", "check_device",
           "check_backend", "run_settings", "settings_diff", "save_interval", "stop_request", "wants_video",
           "read_prompt_file", "state_path", "threads_for", "model_dtype", "cache_dtype", "first_line"]


def sampling_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``--recipe`` with ``--block-frames`` / ``--steps`` / ``--first-block-steps`` / ``--ema`` laid over it:
    ``{"recipe", "block_frames", "denoising_steps", "first_block_steps", "use_ema"}``."""
    out = {"recipe": getattr(args, "recipe", None) or "self_forcing", **recipe(getattr(args, "recipe", None)
                                                                          or "self_forcing")}
    for key, flag in (("block_frames", "block_frames"), ("denoising_steps", "steps"),
                      ("first_block_steps", "first_block_steps"), ("use_ema", "ema")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    return out


def policy_from_args(name: str, score: Optional[str], block_frames: Optional[int] = None, head_jitter: float = 0.0,
                     head_jitter_seed: int = 0, commit_rule: Any = None) -> Any:
    """The :class:`CachePolicy` of ``--policy`` / ``--score`` / ``--head-jitter`` / ``--head-jitter-seed`` /
    ``--commit-rule`` (:func:`deepforcing_kernels.presets.make_policy`), with blocks of ``block_frames`` latent frames
    (the recipe's) when given; ValueError naming ``--score`` / ``--head-jitter`` / ``--commit-rule`` when the policy
    cannot take it, ``--block-frames`` when the policy cannot run blocks of that size."""
    kw = {"head_jitter": head_jitter, "head_jitter_seed": head_jitter_seed}
    if commit_rule is not None:
        kw["commit_rule"] = commit_rule
    try:
        if block_frames is not None and block_frames != 3:
            try:
                return make_policy(name, score=score, block_frames=block_frames, **kw)
            except ValueError as e:
                if str(e).startswith(("head_jitter", "commit_rule")):
                    raise
                raise ValueError(f"--block-frames {block_frames} does not fit --policy {name}: {e}") from None
        return make_policy(name, score=score, **kw)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("head_jitter"):
            msg = msg.replace("head_jitter_seed", "head-jitter-seed").replace("head_jitter", "head-jitter", 1)
        if msg.startswith("commit_rule"):
            msg = msg.replace("commit_rule=True", "commit_rule", 1).replace("commit_rule", "commit-rule", 1)
        raise ValueError("--" + msg if msg.startswith(("score", "head-jitter", "commit-rule")) else msg) from None


def jitter_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``--head-jitter`` / ``--head-jitter-seed`` as :func:`policy_from_args` keywords."""
    return {"head_jitter": getattr(args, "head_jitter", 0.0) or 0.0,
            "head_jitter_seed": getattr(args, "head_jitter_seed", 0) or 0}


def check_head_jitter(policy: Any, backend: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """Fail with one line naming ``--head-jitter`` when the attention backend cannot take per-head RoPE tables."""
    if not policy.head_jitter:
        return
    from ...backends import resolve

    try:
        resolve(backend, device, head_dim, dtype, features=("head_rope",))
    except ValueError as e:
        fail(f"--head-jitter {policy.head_jitter:g} needs per-head RoPE tables: {first_line(e)}")


def build_model(name: str, checkpoint: Optional[str], seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu", use_ema: Optional[bool] = None):
    """:func:`deepforcing_kernels.models.build_model` with ``--checkpoint`` read as a file (one-line failures
    naming the flag). ``use_ema`` picks a training checkpoint's ``generator_ema`` (True) or ``generator`` (False);
    None takes ``generator`` when present (as the authors' inference scripts without ``--use_ema``)."""
    sd = read_tensors(checkpoint, "--checkpoint") if checkpoint else None
    if sd is not None and use_ema is not None and isinstance(sd, dict) and ("generator" in sd or "generator_ema" in sd):
        key = "generator_ema" if use_ema else "generator"
        if not isinstance(sd.get(key), dict):
            fail(f"--checkpoint {checkpoint} has no '{key}' weights ({'--ema' if use_ema else '--no-ema'}, or the "
                 f"recipe's choice); its keys: {', '.join(sorted(map(str, sd))[:8])}")
        sd = sd[key]
    return _build_named_model(name, sd, seed, dtype, device)


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """``--dtype`` as a torch dtype."""
    return torch_dtype(args.dtype)


def cache_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--cache-dtype`` as a torch dtype (None: the model's)."""
    return torch_dtype(args.cache_dtype) if args.cache_dtype else None


def threads_for(args: argparse.Namespace, device: torch.device) -> Optional[int]:
    """``--threads``, or its default: 1 for the tiny model on CPU (its ops are too small to gain from more)."""
    if args.threads is not None:
        return args.threads
    return 1 if args.model == "tiny" and device.type == "cpu" else None


def first_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def read_tensors(path: str, flag: str) -> Any:
    """``torch.load`` (``weights_only``) or safetensors ``load_file``; one-line failure naming ``flag`` and file."""
    if not os.path.exists(path):
        fail(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a directory, not a file")
    if os.path.getsize(path) == 0:
        fail(f"{flag} {path} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            fail(f"{flag} {path}: reading .safetensors needs the safetensors package: pip install safetensors")
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - any damage is the file's fault
            fail(f"{flag} {path} is not a readable safetensors file ({type(e).__name__}: {first_line(e, 120)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        fail(f"{flag} {path} is not a readable torch .pt file ({type(e).__name__}: {first_line(e, 120)})")


def load_text(path: str, text_dim: int, batch_size: int) -> torch.Tensor:
    """The text embeddings of ``--text-embeds``, checked: a float tensor ``[L, text_dim]`` or ``[B, L, text_dim]``
    (B = 1 or ``batch_size``, L >= 1), all finite."""
    obj = read_tensors(path, "--text-embeds")
    if isinstance(obj, dict):
        for key in ("text_embeds", "prompt_embeds", "context", "embeds"):
            if isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
        else:
            tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) == 1:
                obj = obj[tensors[0]]
    if not isinstance(obj, torch.Tensor):
        fail(f"--text-embeds {path} must hold a tensor [L, {text_dim}] or [B, L, {text_dim}] (or a dict with "
             f"'text_embeds' / 'prompt_embeds'), got {type(obj).__name__}")
    if obj.dim() not in (2, 3):
        fail(f"--text-embeds {path} holds a tensor of rank {obj.dim()} {list(obj.shape)}: expected [L, {text_dim}] "
             f"or [B, L, {text_dim}]")
    if obj.shape[-1] != text_dim:
        fail(f"--text-embeds {path} has width {obj.shape[-1]} {list(obj.shape)}, the model takes {text_dim}")
    if obj.shape[-2] == 0:
        fail(f"--text-embeds {path} holds no text rows {list(obj.shape)}")
    if obj.dim() == 3 and obj.shape[0] not in (1, batch_size):
        fail(f"--text-embeds {path} holds {obj.shape[0]} prompts but --batch-size is {batch_size} (use 1 prompt "
             f"or {batch_size})")
    if obj.is_complex() or obj.dtype == torch.bool:
        fail(f"--text-embeds {path} holds {obj.dtype} values, not real numbers")
    obj = obj.float()
    bad = int((~torch.isfinite(obj)).sum())
    if bad:
        fail(f"--text-embeds {path} holds {bad} NaN / inf values: the text encoder's output must be finite")
    return obj


def check_device(name: Optional[str]) -> torch.device:
    """The ``--device`` as a torch.device, or a one-line failure (bogus name, no GPU, GPU index out of range)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {name}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                 "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_backend(backend: str, device: torch.device, flag: str = "--backend") -> None:
    """Fail unless the named attention backend runs on ``device`` here ("auto" always does)."""
    if backend == "auto":
        return
    from ...attention import available_backends

    avail = available_backends(device)
    if backend not in avail:
        why = ""
        try:
            from ...backends import get_backend

            why = get_backend(backend).reason_against(device) or ""
        except Exception:  # noqa: BLE001 - an older registry: the list below says enough
            pass
        fail(f"{flag} {backend} cannot run on {device.type}" + (f" ({why})" if why else "") +
             f"; available here: {', '.join(('auto',) + tuple(avail))}")


def _policy_settings(name: str, score: Optional[str]) -> Dict[str, Any]:
    try:
        p = policy_from_args(name, score)
    except ValueError:
        return {}
    return {"score": p.score if p.compresses else None, "policy_config": p.to_dict()}


def run_settings(args: argparse.Namespace, policy: Any, latent_size: Any, device: torch.device,
                 threads: Optional[int]) -> Dict[str, Any]:
    """The settings a run is saved with (and that ``--resume`` must match, ``frames`` and ``threads`` aside)."""
    return {"model": args.model, "checkpoint": args.checkpoint, "text_embeds": args.text_embeds,
            "policy": args.policy, "score": policy.score if policy.compresses else None,
            "policy_config": policy.to_dict(), "seed": args.seed, "batch_size": args.batch_size,
            "latent_size": list(latent_size), "dtype": args.dtype, "cache_dtype": args.cache_dtype or args.dtype,
            "backend": args.backend, "device": device.type, "frames": args.frames, "threads": threads,
            "head_jitter": policy.head_jitter_setting,
            **_sampling_settings(args)}


def _sampling_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The sampler's settings a run is saved with; the Self-Forcing default is left out, so runs saved before
    recipes existed resume unchanged."""
    s = sampling_from_args(args)
    if s["denoising_steps"] == recipe("self_forcing")["denoising_steps"] and s["first_block_steps"] is None:
        out = {}
    else:
        out = {"denoising_steps": s["denoising_steps"], "first_block_steps": s["first_block_steps"]}
    if s["use_ema"] is not None and getattr(args, "checkpoint", None):
        out["use_ema"] = s["use_ema"]
    return out


_NOT_COMPARED = ("frames", "threads")


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any], default_latent: Any) -> Dict[str, Any]:
    """``{key: (saved, now)}`` for the settings that differ; runs of earlier versions are normalised first (an
    implicit ``--score`` is the policy's default, a missing latent size the model's)."""
    old = dict(saved)
    for key, canon in (("policy", canonical_policy_name), ("model", canonical_model_name)):
        try:  # runs of earlier versions spelled deep-forcing / wan-1.3b
            old[key] = canon(old[key]) if key in old else old.get(key)
        except (TypeError, ValueError):
            pass
    if "policy_config" not in old and "policy" in old:
        old.update(_policy_settings(old["policy"], old.get("score")))
    if old.get("latent_size") is None:
        old["latent_size"] = list(default_latent)
    diff = {k: (old[k], v) for k, v in now.items() if k not in _NOT_COMPARED and k in old and old[k] != v}
    if "head_jitter" in diff and "policy_config" in diff and _without_jitter(diff["policy_config"][0]) == \
            _without_jitter(diff["policy_config"][1]):
        del diff["policy_config"]  # the jitter is all that differs: name it alone
    return diff


def _without_jitter(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    return {k: v for k, v in config.items() if not k.startswith("head_jitter")}


def save_interval(every_s: float, max_overhead: float, blocked_s: float) -> float:
    """Seconds until the next state save: ``--save-every-s``, stretched so that a save holding generation for
    ``blocked_s`` costs at most ``max_overhead`` of the run (``blocked_s / max_overhead``). ``every_s == 0``
    (after every block) is taken as asked."""
    if max_overhead <= 0 or every_s == 0:
        return every_s
    return max(every_s, blocked_s / max_overhead)


def stop_request() -> StopRequest:
    """The SIGINT / SIGTERM handler of a single-process run."""
    return StopRequest("deepforcing generate: {signal}: stopping after this block and saving the resume state (send "
                       "it again to stop at once)")


def wants_video(args: argparse.Namespace) -> bool:
    """Whether ``generate`` takes the prompt -> mp4 path: an ``.mp4`` output or a prompt given."""
    return bool(args.prompt or args.prompt_file or str(args.out).lower().endswith(".mp4"))


def read_prompt_file(path: str) -> List[str]:
    """One prompt a line (blank lines and ``#`` comments skipped); a clear error for a missing or empty file."""
    if not os.path.isfile(path):
        fail(f"--prompt-file {path}: " + ("is a directory, not a file" if os.path.isdir(path) else "no such file"))
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompt-file {path}: cannot be read as UTF-8 text ({type(e).__name__})")
    if not prompts:
        fail(f"--prompt-file {path} holds no prompt (one prompt a line)")
    return prompts


def state_path(out: str) -> str:
    """Where a video run keeps its resume state."""
    return out + ".state.pt"


def check_fits_in_memory(cfg: Any, latent_size: Any, policy: Any, batch: int, cache_dtype: str, frames: int) -> None:
    """Refuse, before anything is allocated, a run whose KV cache alone (every layer's K and V over the policy's
    window) exceeds this machine's memory: one line naming --latent-size, instead of the allocator's traceback or
    the kernel's OOM killer."""
    from ...presets import torch_dtype

    tokens = cfg.tokens_per_frame(latent_size)
    window = policy.window_frames if getattr(policy, "window_frames", None) else frames
    per = torch.empty((), dtype=torch_dtype(cache_dtype)).element_size()
    need = 2 * cfg.num_layers * batch * min(window, frames) * tokens * cfg.dim * per
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return
    if need > have:
        h, w = latent_size
        fail(f"--latent-size {h} {w}: the KV cache alone needs {need / 2**30:.1f} GiB "
             f"({tokens} tokens per frame); this machine has {have / 2**30:.1f} GiB")
