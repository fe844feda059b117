"""Wan2.1's umT5-XXL text encoder, run by transformers' ``UMT5EncoderModel``.

* :meth:`UMT5Encoder.from_original` reads ``models_t5_umt5-xxl-enc-bf16.pth`` (the ``T5Encoder`` of
  ``wan/modules/t5.py``: ``token_embedding``, ``blocks.N.norm1`` / ``attn.{q,k,v,o}`` / ``norm2`` /
  ``ffn.{gate.0,fc1,fc2}`` / ``pos_embedding.embedding`` (one relative-position table per block, umT5's
  ``shared_pos=False``), ``norm``) and maps it onto transformers' names (:func:`original_to_hf_key`). With
  ``shared_pos=True`` (plain T5: one table, ``pos_embedding.embedding`` at the top) it builds ``T5EncoderModel``.
* :meth:`UMT5Encoder.encode_ids` returns what the DiT consumes, exactly as Wan2.1 builds it: the encoder runs
  on the padded ids with their mask, each row is cut to its valid tokens (``T5EncoderModel.__call__``:
  ``u[:v] for v in seq_lens``) and zero-padded back to ``text_len`` (``WanModel.forward``).
* ``enc(prompts)`` tokenises like Wan2.1's ``HuggingfaceTokenizer(seq_len=text_len, clean="whitespace")``
  (padding to ``text_len``, truncation, ``</s>`` added) with the tokenizer files found beside the weights, or
  with :class:`~deepforcing_kernels.video.tokenizer.ByteTokenizer` for the tiny random model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ._deps import require
from .tokenizer import BYTE_VOCAB, ByteTokenizer, clean_whitespace
from .vae import _diffusers_folder, _load_file, _short

__all__ = ["UMT5Encoder", "original_to_hf_key", "UMT5_XXL_CONFIG", "TINY_T5_CONFIG", "TOKENIZER_FILES"]

#: umT5-XXL's encoder in the original keyword names (``umt5_xxl`` in ``wan/modules/t5.py``)
UMT5_XXL_CONFIG: Dict[str, Any] = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64,
                                       num_layers=24, num_buckets=32, shared_pos=False)
#: the tiny random encoder of ``--model tiny``: width 32 (the tiny DiT's text_dim), byte vocabulary, 2 layers
TINY_T5_CONFIG: Dict[str, Any] = dict(vocab=BYTE_VOCAB, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2,
                                      num_buckets=32, shared_pos=False)
#: files a transformers tokenizer folder needs: the config, and one of the vocabularies
TOKENIZER_FILES = ("tokenizer_config.json", ("tokenizer.json", "spiece.model"))

_BLOCK = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
          "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
          "attn.o.weight": "layer.0.SelfAttention.o.weight",
          "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
          "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
          "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}


def original_to_hf_key(key: str) -> Optional[str]:
    """transformers' name for one key of Wan2.1's ``T5Encoder`` state dict (None if it is not one).

    The gated feed-forward ``fc1(x) * gelu(gate(x))`` is transformers' ``wi_1(x) * gelu_new(wi_0(x))``; a shared
    position table (``pos_embedding.embedding``, T5) is block 0's ``relative_attention_bias``.
    """
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    if key == "pos_embedding.embedding.weight":
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _BLOCK:
        return f"encoder.block.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def _check_config(cfg: Dict[str, Any]) -> None:
    for k in ("vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets"):
        v = cfg[k]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"UMT5Encoder config {k} must be a positive int, got {v!r}")
    if cfg["dim_attn"] % cfg["num_heads"]:
        raise ValueError(f"UMT5Encoder config dim_attn={cfg['dim_attn']} must be a multiple of "
                         f"num_heads={cfg['num_heads']}")


def _hf_model(cfg: Dict[str, Any]):
    tf = require("transformers", "UMT5Encoder")
    kw = dict(vocab_size=cfg["vocab"], d_model=cfg["dim"], d_kv=cfg["dim_attn"] // cfg["num_heads"],
              d_ff=cfg["dim_ffn"], num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
              relative_attention_num_buckets=cfg["num_buckets"], relative_attention_max_distance=128,
              dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)
    if cfg["shared_pos"]:
        model = tf.T5EncoderModel(tf.T5Config(**kw))
    else:
        model = tf.UMT5EncoderModel(tf.UMT5Config(**kw))
    return model


def _eager(model: Any) -> Any:
    """T5's unscaled attention with the position bias added to the scores: use transformers' eager path."""
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        model.config._attn_implementation = "eager"
    return model


def _missing_tokenizer_files(folder: Path) -> List[str]:
    need, either = TOKENIZER_FILES
    missing = [] if (folder / need).exists() else [need]
    if not any((folder / f).exists() for f in either):
        missing.append(" or ".join(either))
    return missing


class UMT5Encoder(torch.nn.Module):
    """Wan2.1's text encoder: prompts -> ``[B, text_len, dim]`` embeddings (valid tokens, then zeros).

    Build it with :meth:`from_original`, :meth:`from_pretrained` or :meth:`tiny`. ``self.model`` is the
    transformers encoder; ``dim`` its width; ``text_len`` the rows of every output.

    Args:
        model: a transformers ``UMT5EncoderModel`` (or ``T5EncoderModel``).
        tokenizer: a callable ``prompts -> (ids, mask)`` (e.g. :class:`ByteTokenizer`), a transformers tokenizer,
            a folder of tokenizer files, or None (then ``enc(prompts)`` raises; ``encode_ids`` still works).
        text_len: rows of the output (Wan2.1: 512).
        tokenizer_hint: the folder that was searched, for the error when no tokenizer was found.
    """

    def __init__(self, model: Any, tokenizer: Any = None, text_len: int = 512,
                 tokenizer_hint: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        self.model = _eager(model).eval().requires_grad_(False)
        self.text_len = text_len
        self.dim = int(model.config.d_model)
        self._tokenizer: Optional[Callable] = None
        #: the tokenizer object in use (a transformers tokenizer, a ByteTokenizer, a callable), or None
        self.tokenizer_object: Any = None
        self._tokenizer_hint = tokenizer_hint
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The encoder's device."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer``: a folder of transformers tokenizer files, a transformers tokenizer, or a callable
        ``prompts -> (ids, mask)``."""
        if isinstance(tokenizer, (str, os.PathLike)):
            folder = Path(tokenizer)
            if not folder.is_dir():
                raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
            missing = _missing_tokenizer_files(folder)
            if missing:
                raise FileNotFoundError(f"tokenizer folder {str(folder)!r} lacks {' and '.join(missing)}")
            tf = require("transformers", "UMT5Encoder")
            tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer
            hf = tokenizer
            n = self.text_len

            def tokenize(prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
                out = hf([clean_whitespace(p) for p in prompts], padding="max_length", truncation=True,
                         max_length=n, add_special_tokens=True, return_tensors="pt")
                return out.input_ids, out.attention_mask
            self._tokenizer = tokenize
        elif callable(tokenizer):
            self._tokenizer = tokenizer
        else:
            raise TypeError(f"tokenizer must be a folder, a transformers tokenizer or a callable, "
                            f"got {type(tokenizer).__name__}")
        self.tokenizer_object = tokenizer

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts to ``(ids, mask)`` ``[B, text_len]`` with this encoder's tokenizer."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of str")
        if self._tokenizer is None:
            where = f" ({self._tokenizer_hint})" if self._tokenizer_hint else ""
            raise FileNotFoundError(f"UMT5Encoder has no tokenizer{where}; pass tokenizer=FOLDER with "
                                    "tokenizer_config.json and tokenizer.json or spiece.model")
        return self._tokenizer(prompts)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_original(cls, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]], *,
                      tokenizer: Any = None, text_len: int = 512, dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu", **config: Any) -> "UMT5Encoder":
        """Load Wan2.1's ``models_t5_umt5-xxl-enc-bf16.pth`` (or its state dict).

        Args:
            path_or_state_dict: the ``.pth`` (or ``.safetensors``) file, or its state dict.
            tokenizer: see the class; None looks for ``google/umt5-xxl/`` beside the weights file (Wan2.1's
                folder layout).
            text_len, dtype, device: see the class.
            **config: the original keywords (:data:`UMT5_XXL_CONFIG` by default): vocab, dim, dim_attn, dim_ffn,
                num_heads, num_layers, num_buckets, shared_pos.

        Raises:
            ValueError: keys that do not match (listed), shape mismatches, a transformers-format state dict, bad
                configuration keywords. FileNotFoundError: no such file.
        """
        unknown = set(config) - set(UMT5_XXL_CONFIG)
        if unknown:
            raise TypeError(f"UMT5Encoder.from_original got unknown config keywords {sorted(unknown)}; "
                            f"known: {sorted(UMT5_XXL_CONFIG)}")
        cfg = dict(UMT5_XXL_CONFIG, **config)
        _check_config(cfg)
        hint = None
        if isinstance(path_or_state_dict, Mapping):
            sd = dict(path_or_state_dict)
        else:
            sd = _load_file(path_or_state_dict, "UMT5Encoder.from_original")
            if tokenizer is None:
                guess = Path(path_or_state_dict).parent / "google" / "umt5-xxl"
                if guess.is_dir() and not _missing_tokenizer_files(guess):
                    tokenizer = guess
                else:
                    hint = f"looked for {guess / 'tokenizer_config.json'}"
        if any(k.startswith(("encoder.block.", "shared.")) for k in sd):
            raise ValueError("UMT5Encoder.from_original: these weights are in transformers' layout "
                             "(encoder.block...); load the text_encoder/ folder with UMT5Encoder.from_pretrained")
        with torch.device("meta"):  # no 23 GB float32 model before the real weights arrive
            model = _hf_model(cfg)
        own = model.state_dict()
        tied = "encoder.embed_tokens.weight"
        has_tied = own.pop(tied, None) is not None  # tied to shared.weight
        mapped: Dict[str, torch.Tensor] = {}
        bad: List[str] = []
        for k, v in sd.items():
            nk = original_to_hf_key(k)
            if nk is None or nk not in own:
                bad.append(k)
            else:
                mapped[nk] = v
        missing = sorted(set(own) - set(mapped))
        if bad or missing:
            raise ValueError("UMT5Encoder.from_original: the state dict does not match Wan2.1's T5Encoder "
                             f"(num_layers={cfg['num_layers']}, shared_pos={cfg['shared_pos']}): unexpected "
                             f"({len(bad)}): {_short(sorted(bad))}; missing ({len(missing)}): {_short(missing)}")
        for k, v in mapped.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape):
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"UMT5Encoder.from_original: {k!r} is {got} but the model expects "
                                 f"{list(own[k].shape)} (check vocab / dim / dim_attn / dim_ffn / num_heads)")
        placed = {k: v.to(device=device, dtype=dtype) for k, v in mapped.items()}
        if has_tied:
            placed[tied] = placed["shared.weight"]
        model.load_state_dict(placed, strict=True, assign=True)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"UMT5Encoder.from_original: no weights for {_short(left)}")
        return cls(model, tokenizer=tokenizer, text_len=text_len, tokenizer_hint=hint)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], *, tokenizer: Any = None, text_len: int = 512,
                        dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> "UMT5Encoder":
        """Load a diffusers-format ``text_encoder/`` folder (local files only); the tokenizer comes from
        ``tokenizer/`` beside it unless given. ``folder`` may also be the pipeline folder holding both."""
        p = _diffusers_folder(folder, "text_encoder", "models_t5_umt5-xxl-enc-bf16.pth", "UMT5Encoder")
        tf = require("transformers", "UMT5Encoder")
        try:
            model = tf.UMT5EncoderModel.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"UMT5Encoder.from_pretrained: cannot load {str(p)!r}: {str(e).splitlines()[0]}") from None
        hint = None
        if tokenizer is None:
            tok = p.parent / "tokenizer"
            if tok.is_dir() and not _missing_tokenizer_files(tok):
                tokenizer = tok
            else:
                missing = _missing_tokenizer_files(tok) if tok.is_dir() else ["the folder itself"]
                hint = f"{tok} lacks {' and '.join(missing)}"
        model = model.to(device=device)
        if next(model.parameters()).dtype != dtype:  # transformers < 4.56 reads torch_dtype=, not dtype=
            model = model.to(dtype=dtype)
        return cls(model, tokenizer=tokenizer, text_len=text_len, tokenizer_hint=hint)

    @classmethod
    def tiny(cls, seed: int = 0, *, dim: int = 32, text_len: int = 16, dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu", **config: Any) -> "UMT5Encoder":
        """A random umT5 encoder at tiny size (:data:`TINY_T5_CONFIG`, width ``dim``) with the byte-level
        :class:`ByteTokenizer`; weights from :func:`random_original_state_dict` (seeded)."""
        cfg = dict(TINY_T5_CONFIG, dim=dim, dim_attn=config.pop("dim_attn", dim), **config)
        sd = random_original_state_dict(seed=seed, **cfg)
        return cls.from_original(sd, tokenizer=ByteTokenizer(text_len), text_len=text_len, dtype=dtype,
                                 device=device, **cfg)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask ``[B, L]`` (valid tokens first, L <= text_len) -> ``[B, text_len, dim]``: each row's
        valid tokens' encodings, then zeros (Wan2.1 trims to ``seq_lens`` and zero-pads to ``text_len``)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids must be an integer [B, L] tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(f"mask must have the shape of ids {tuple(ids.shape)}")
        b, n = ids.shape
        if n > self.text_len:
            raise ValueError(f"ids has {n} tokens per row but text_len is {self.text_len}")
        vocab = self.model.get_input_embeddings().num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"ids must lie in [0, {vocab}) (the encoder's vocabulary)")
        p = next(self.model.parameters())
        ids, mask = ids.to(p.device), mask.to(p.device).long()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        seq_lens = mask.gt(0).sum(dim=1)
        out = hidden.new_zeros(b, self.text_len, hidden.shape[-1])
        for i, v in enumerate(seq_lens.tolist()):
            out[i, :v] = hidden[i, :v]
        return out

    def forward(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts -> ``[B, text_len, dim]`` (tokenise, then :meth:`encode_ids`)."""
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask)


def original_state_dict_shapes(*, vocab: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int,
                               num_layers: int, num_buckets: int, shared_pos: bool) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of Wan2.1's ``T5Encoder`` state dict for a configuration."""
    s: Dict[str, Tuple[int, ...]] = {"token_embedding.weight": (vocab, dim)}
    if shared_pos:
        s["pos_embedding.embedding.weight"] = (num_buckets, num_heads)
    for i in range(num_layers):
        p = f"blocks.{i}."
        s[p + "norm1.weight"] = (dim,)
        for n in "qkv":
            s[p + f"attn.{n}.weight"] = (dim_attn, dim)
        s[p + "attn.o.weight"] = (dim, dim_attn)
        s[p + "norm2.weight"] = (dim,)
        s[p + "ffn.gate.0.weight"] = (dim_ffn, dim)
        s[p + "ffn.fc1.weight"] = (dim_ffn, dim)
        s[p + "ffn.fc2.weight"] = (dim, dim_ffn)
        if not shared_pos:
            s[p + "pos_embedding.embedding.weight"] = (num_buckets, num_heads)
    s["norm.weight"] = (dim,)
    return s


def random_original_state_dict(seed: int = 0, **config: Any) -> Dict[str, torch.Tensor]:
    """A random state dict in Wan2.1's ``T5Encoder`` layout, seeded, float32: std as Wan2.1's ``init_weights``
    (q: (dim * dim_attn)^-1/2, k / v / gate / fc1: dim^-1/2, o: (heads * dim_attn)^-1/2 scaled up 8x so attention
    matters at tiny widths, fc2: dim_ffn^-1/2, embeddings 1, position tables 1), norms 1 + N(0, 0.1^2)."""
    cfg = dict(UMT5_XXL_CONFIG, **config)
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    dim, da, df, h = cfg["dim"], cfg["dim_attn"], cfg["dim_ffn"], cfg["num_heads"]
    for k, shape in original_state_dict_shapes(**cfg).items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            out[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
            continue
        if k.endswith("attn.q.weight"):
            std = (dim * da) ** -0.5 * 8
        elif k.endswith("attn.o.weight"):
            std = (h * da) ** -0.5 * 8
        elif k.endswith("fc2.weight"):
            std = df ** -0.5
        elif k.endswith("token_embedding.weight") or "pos_embedding" in k:
            std = 1.0
        else:
            std = dim ** -0.5
        out[k] = std * torch.randn(shape, generator=g)
    return out
