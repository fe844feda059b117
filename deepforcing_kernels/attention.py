"""The fused op: attention over a KV cache whose sink keys are re-phased on load.

Public entry point :func:`sink_attention`: full validation here, then the backend chosen by the registry of
:mod:`deepforcing_kernels.backends`:

* ``"triton"`` and ``"cpp"`` — the registered op ``torch.ops.deepforcing.sink_attention``
  (:mod:`deepforcing_kernels.ops`: Triton kernels for CUDA tensors, the C++ kernel for CPU tensors);
* ``"reference"`` — :mod:`deepforcing_kernels.reference.attention` (any device; the oracle).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._checks import FLOAT_DTYPES, INT64_MAX, INT64_MIN, check_bool, check_int, check_rope, check_tensor
from .backends import available_backends, resolve
from .rope import RopeSpec
from .rotation import normalise_key_shift

FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = ["sink_attention", "SinkAttentionOutput", "available_backends", "normalise_key_bias"]


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
    key_bias: Optional[torch.Tensor] = None,
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
        key_bias: optional additive logit bias per key, a float tensor broadcastable to ``[B, Hq, Lk]`` (shape
            ``[Lk]``, ``[Hq or 1, Lk]`` or ``[B or 1, Hq or 1, Lk]``), taken as float32: the logits are
            ``softmax_scale * q . k + key_bias``, and lse and mass are those of that biased softmax. ``-inf``
            removes a key; NaN, ``+inf`` and a (batch, head) row that removes every key are refused.
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
    args["key_bias"] = None if key_bias is None else normalise_key_bias(key_bias, q.shape[0], q.shape[2],
                                                                        k.shape[1], q.device)
    impl = resolve(backend, q.device, q.shape[-1], q.dtype, features=_features(args))
    if q.shape[1] == 0:  # nothing to attend: empty outputs, zero mass, no kernel launch
        out, lse, mass = _empty_result(q, k, return_lse, return_mass)
    else:
        guard = softmax_scale is not None and _may_overflow(q, k, args["softmax_scale"])
        out, lse, mass = impl.run(q, k, v, **(dict(args, return_lse=True) if guard else args))
        if guard:
            if not bool(torch.isfinite(lse).all()) and bool(torch.isfinite(q).all() and torch.isfinite(k).all()):
                raise ValueError(f"softmax_scale={softmax_scale!r} makes q . k overflow float32 for these inputs "
                                 "(the softmax would be NaN); use a smaller scale")
            lse = lse if return_lse else None
    if not (return_lse or return_mass):
        return out
    return SinkAttentionOutput(out, lse, mass)


def _features(args: dict) -> Tuple[str, ...]:
    """The optional features of the op a call uses (the backend registry checks them)."""
    rope = args["rope"]
    head = ("head_rope",) if rope is not None and rope.head_scale is not None else ()
    return (("key_bias",) if args["key_bias"] is not None else ()) + head


def normalise_key_bias(key_bias: torch.Tensor, batch: int, heads: int, lk: int,
                       device: torch.device, name: str = "key_bias") -> torch.Tensor:
    """The one normalisation of a key bias: a float tensor broadcastable to ``[B, Hq, Lk]`` (last axis exactly
    ``Lk``) becomes a contiguous float32 ``[B or 1, Hq or 1, Lk]`` (broadcast axes stay of size 1: nothing is
    materialised). Refuses NaN, ``+inf`` and rows that are ``-inf`` at every key (a softmax over no key).
    Raises TypeError / ValueError naming ``name``."""
    check_tensor(name, key_bias, dtypes=FLOAT_DTYPES + (torch.float64,))
    if key_bias.device != device:
        raise ValueError(f"{name} is on {key_bias.device} but q is on {device}")
    shape = list(key_bias.shape)
    full = [1] * (3 - len(shape)) + shape if len(shape) <= 3 else shape
    if not (1 <= len(shape) <= 3 and full[2] == lk and full[0] in (1, batch) and full[1] in (1, heads)):
        raise ValueError(f"{name} must be broadcastable to [B, Hq, Lk] = [{batch}, {heads}, {lk}] with its last "
                         f"axis exactly Lk (shape [Lk], [Hq or 1, Lk] or [B or 1, Hq or 1, Lk]), got {shape}")
    b = key_bias.to(torch.float32).reshape(full).contiguous()
    if b.numel():
        nan_or_pos = torch.isnan(b) | (b == float("inf"))
        dead = (b == float("-inf")).all(dim=-1)
        bad, empty = torch.stack([nan_or_pos.any(), dead.any()]).tolist()
        if bad:
            raise ValueError(f"{name} holds NaN or +inf (a finite bias or -inf to remove a key is expected)")
        if empty:
            raise ValueError(f"{name} is -inf at every key of some (batch, head) row: the softmax would be over "
                             "no key")
    return b


def _may_overflow(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether ``scale * q . k`` can leave float32's range (``scale * D * max|q| * max|k|`` bounds it); only then
    is the result checked, so ordinary scales cost two reductions and no check."""
    bound = scale * q.shape[-1] * float(q.abs().amax()) * float(k.abs().amax())
    return not bound < FLOAT32_MAX / 2


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
        rope.check_heads(Hkv, "k")  # per-head temporal scales: one per KV head (or a divisor of them)
    sink_len = check_int("sink_len", sink_len, minimum=0, maximum=Lk)
    sink_shift = check_int("sink_shift", sink_shift, minimum=INT64_MIN, maximum=INT64_MAX)
    if key_shift is not None:
        if isinstance(key_shift, torch.Tensor) and key_shift.dtype in _WIDE_UNSIGNED and key_shift.numel() \
                and int(key_shift.max()) > INT64_MAX:
            raise ValueError("key_shift holds values beyond int64 (the shifts every backend takes)")
        key_shift = normalise_key_shift(key_shift, B, Lk, q.device)
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


_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint64", "uint32") if hasattr(torch, n))


def _empty_result(q, k, return_lse, return_mass):
    B, Lq, Hq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    mass = torch.zeros(B, k.shape[2], k.shape[1], dtype=torch.float32, device=q.device) if return_mass else None
    return out, lse, mass
