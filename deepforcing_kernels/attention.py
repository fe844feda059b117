"""The fused op: attention over a KV cache whose sink keys are re-phased on load.

Public entry point :func:`sink_attention`; validation here, maths in the backends:

* ``"triton"`` — :mod:`deepforcing_kernels.triton.attention` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``);
* ``"cpp"`` — the compiled CPU kernel in ``csrc/`` (CPU tensors);
* ``"reference"`` — :mod:`deepforcing_kernels.reference.attention` (any device; the oracle).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _ext
from ._checks import FLOAT_DTYPES, check_bool, check_int, check_rope, check_tensor
from .reference.attention import sink_attention_reference
from .rope import RopeSpec

BACKENDS = ("auto", "triton", "cpp", "reference")


class SinkAttentionOutput(NamedTuple):
    """What :func:`sink_attention` returns when an extra output is asked for."""

    out: torch.Tensor
    lse: Optional[torch.Tensor]
    mass: Optional[torch.Tensor]


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: Optional[RopeSpec] = None,
    sink_len: int = 0,
    sink_shift: int = 0,
    key_shift: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    return_mass: bool = False,
    mass_q_range: Optional[Tuple[int, int]] = None,
    backend: str = "auto",
) -> Union[torch.Tensor, SinkAttentionOutput]:
    """Attention of ``q`` over ``k, v`` with the temporal RoPE of sink keys re-phased on load.

    Every query sees every key (no mask). Keys ``[0, sink_len)`` are rotated by ``sink_shift`` temporal
    positions as they are read (or each key by ``key_shift[j]`` when that tensor is given); the stored keys are
    never modified.

    Args:
        q: queries ``[B, Lq, Hq, D]``, float32 / float16 / bfloat16.
        k, v: keys and values ``[B, Lk, Hkv, D]`` with ``Hq % Hkv == 0``; query head ``h`` reads KV head
            ``h // (Hq // Hkv)``. Same dtype and device as ``q``.
        rope: the RoPE layout of the keys; required when any key is re-phased.
        sink_len: number of leading keys to re-phase, ``0 <= sink_len <= Lk``.
        sink_shift: temporal shift applied to the sink keys (any int, negative and huge included).
        key_shift: optional integer tensor ``[Lk]`` or ``[B, Lk]``: a per-key shift that overrides
            ``sink_len`` / ``sink_shift``.
        softmax_scale: multiplier of ``q . k``; default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq, Lq]`` (float32, natural log).
        return_mass: also return the attention mass ``[B, Hkv, Lk]`` (float32): the softmax probability each key
            received, summed over the queries in ``mass_q_range`` and over the query heads of its KV group.
        mass_q_range: ``(start, end)`` query rows counted in the mass; default all rows.
        backend: ``"auto"`` (Triton for CUDA tensors, the C++ kernel for CPU tensors when built, else the
            reference), ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``out [B, Lq, Hq, D]`` in ``q.dtype`` when no extra output is asked for, else
        ``SinkAttentionOutput(out, lse, mass)`` with None for what was not asked.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    args = _validate(q, k, v, rope=rope, sink_len=sink_len, sink_shift=sink_shift, key_shift=key_shift,
                     softmax_scale=softmax_scale, return_lse=return_lse, return_mass=return_mass,
                     mass_q_range=mass_q_range)
    impl = _resolve_backend(backend, q)
    if q.shape[1] == 0:  # nothing to attend: empty outputs, zero mass, no kernel launch
        out, lse, mass = _empty_result(q, k, return_lse, return_mass)
    else:
        out, lse, mass = impl(q, k, v, **args)
    if not (return_lse or return_mass):
        return out
    return SinkAttentionOutput(out, lse, mass)


# ---------------------------------------------------------------------------------------------- validation
def _validate(q, k, v, *, rope, sink_len, sink_shift, key_shift, softmax_scale, return_lse, return_mass,
              mass_q_range) -> dict:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Lq, Hq, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {D}")
    Lk, Hkv = k.shape[1], k.shape[2]
    if Lk == 0:
        raise ValueError("k must hold at least one key (Lk >= 1): softmax over no keys is undefined")
    if Hkv == 0 or Hq == 0 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a positive multiple of KV heads ({Hkv})")
    if D == 0:
        raise ValueError("head_dim must be positive")
    if rope is not None:
        check_rope("rope", rope, D)
    sink_len = check_int("sink_len", sink_len, minimum=0, maximum=Lk)
    sink_shift = check_int("sink_shift", sink_shift)
    if key_shift is not None:
        check_tensor("key_shift", key_shift)
        if key_shift.dtype.is_floating_point or key_shift.dtype.is_complex or key_shift.dtype == torch.bool:
            raise TypeError(f"key_shift must be an integer tensor, got dtype {key_shift.dtype}")
        if key_shift.device != q.device:
            raise ValueError(f"key_shift is on {key_shift.device} but q is on {q.device}")
        if not (tuple(key_shift.shape) == (Lk,) or tuple(key_shift.shape) == (B, Lk)):
            raise ValueError(f"key_shift must have shape [{Lk}] or [{B}, {Lk}], got {list(key_shift.shape)}")
        key_shift = key_shift.to(torch.int64).expand(B, Lk).contiguous()
        if rope is None:
            if bool((key_shift != 0).any()):
                raise ValueError("key_shift re-phases keys, so rope must be given")
            key_shift = None  # all zeros: nothing moves
    elif sink_shift != 0 and rope is None:
        raise ValueError("sink_shift re-phases the sink keys, so rope must be given")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    check_bool("return_lse", return_lse)
    check_bool("return_mass", return_mass)
    if mass_q_range is None:
        mass_q_range = (0, Lq)
    else:
        if not return_mass:
            raise ValueError("mass_q_range is given but return_mass=False")
        if not isinstance(mass_q_range, (tuple, list)) or len(mass_q_range) != 2:
            raise TypeError(f"mass_q_range must be a (start, end) pair of ints, got {mass_q_range!r}")
        m0 = check_int("mass_q_range[0]", mass_q_range[0], minimum=0, maximum=Lq)
        m1 = check_int("mass_q_range[1]", mass_q_range[1], minimum=m0, maximum=Lq)
        mass_q_range = (m0, m1)
    return dict(rope=rope, sink_len=sink_len, sink_shift=sink_shift, key_shift=key_shift,
                softmax_scale=softmax_scale, return_lse=return_lse, return_mass=return_mass,
                mass_q_range=mass_q_range)


def _empty_result(q, k, return_lse, return_mass):
    B, Lq, Hq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    mass = torch.zeros(B, k.shape[2], k.shape[1], dtype=torch.float32, device=q.device) if return_mass else None
    return out, lse, mass


# ---------------------------------------------------------------------------------------------- dispatch
_warned_reference = False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: Union[str, torch.device] = "cpu") -> Tuple[str, ...]:
    """Backends that can run on tensors of ``device`` in this process (``"auto"`` excluded)."""
    dev = torch.device(device)
    names = []
    if (dev.type == "cuda" or triton_interpreting()) and _triton_importable():
        names.append("triton")
    if dev.type == "cpu" and _ext.load() is not None and hasattr(_ext.load(), "sink_attention_fwd"):
        names.append("cpp")
    names.append("reference")
    return tuple(names)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _resolve_backend(backend: str, q: torch.Tensor):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.device.type == "cuda" and _triton_importable():
            backend = "triton"
        elif q.device.type == "cpu" and "cpp" in available_backends("cpu"):
            backend = "cpp"
        else:
            global _warned_reference
            if not _warned_reference and q.device.type == "cpu":
                _warned_reference = True
                warnings.warn("deepforcing_kernels: the C++ CPU kernel is not built; using the slower PyTorch "
                              "reference. Build it with `pip install --no-build-isolation -e .`.", stacklevel=3)
            backend = "reference"
    if backend == "reference":
        return sink_attention_reference
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package, which cannot be imported here")
        if q.device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
        from .triton.attention import sink_attention_triton

        return sink_attention_triton
    # cpp
    if q.device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got {q.device}")
    _ext.require()
    from .cpp import sink_attention_cpp

    return sink_attention_cpp
