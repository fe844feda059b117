"""Python glue of the compiled CPU kernel (``csrc/sink_attention_cpu.cpp``).

The kernel is registered as the PyTorch custom op ``deepforcing::sink_attention`` (with a fake implementation
that gives output shapes), so it traces under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. :func:`sink_attention_cpp` is the backend entry that
:func:`deepforcing_kernels.sink_attention` calls with validated, normalised arguments.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _ext
from .rope import RopeSpec

__all__ = ["sink_attention_cpp", "set_block_rows"]


@torch.library.custom_op("deepforcing::sink_attention", mutates_args=(), device_types="cpu")
def _sink_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_shift: Optional[torch.Tensor],
    temporal_freqs: Optional[torch.Tensor], interleaved: bool, sink_len: int, sink_shift: int,
    softmax_scale: float, return_mass: bool, mass_start: int, mass_end: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sink attention on CPU.

    Args:
        q: ``[B, Lq, Hq, D]``; k, v: ``[B, Lk, Hkv, D]``; one dtype among float32 / bfloat16 / float16.
        key_shift: int64 ``[B, Lk]`` per-key temporal shift, or None (then keys ``[0, sink_len)`` move by
            ``sink_shift``).
        temporal_freqs: float64 ``[T]`` frequencies of the temporal RoPE pairs, or None when no key moves.
        interleaved: pair ``t`` is channels ``(2t, 2t+1)`` if True, else ``(t, t + D/2)``.
        softmax_scale: multiplier of ``q . k``.
        return_mass: compute the attention mass over query rows ``[mass_start, mass_end)``.

    Returns:
        ``out [B, Lq, Hq, D]`` (q.dtype), ``lse [B, Hq, Lq]`` (float32), ``mass [B, Hkv, Lk]`` (float32; shape
        ``[0]`` when ``return_mass`` is False: custom ops cannot return None).
    """
    return _ext.require().sink_attention_fwd(q, k, v, key_shift, temporal_freqs, interleaved, sink_len,
                                             sink_shift, softmax_scale, return_mass, mass_start, mass_end)


@_sink_attention_op.register_fake
def _(q, k, v, key_shift, temporal_freqs, interleaved, sink_len, sink_shift, softmax_scale, return_mass,
      mass_start, mass_end):
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    out = q.new_empty((B, Lq, Hq, D))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    mass = q.new_empty((B, Hkv, Lk) if return_mass else (0,), dtype=torch.float32)
    return out, lse, mass


@functools.lru_cache(maxsize=32)
def _temporal_freqs(rope: RopeSpec) -> torch.Tensor:
    """float64 ``[temporal_pairs]`` frequencies of a spec (cached: specs are frozen dataclasses)."""
    return rope.temporal_freqs().contiguous()


def sink_attention_cpp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope: Optional[RopeSpec], sink_len: int,
    sink_shift: int, key_shift: Optional[torch.Tensor], softmax_scale: float, return_lse: bool,
    return_mass: bool, mass_q_range: Tuple[int, int],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backend entry of :func:`deepforcing_kernels.sink_attention` for CPU tensors (arguments already validated:
    ``key_shift`` is None or int64 ``[B, Lk]``). Returns ``(out, lse or None, mass or None)``."""
    if rope is None:  # validation allows this only when no key moves (all shifts zero)
        key_shift, sink_len, sink_shift = None, 0, 0
    moves = key_shift is not None or (sink_len > 0 and sink_shift != 0)
    freqs = None
    if moves:  # under torch.compile the frequencies are traced as (tiny) graph ops instead of read from the cache
        freqs = rope.temporal_freqs() if torch.compiler.is_compiling() else _temporal_freqs(rope)
    interleaved = rope.interleaved if rope is not None else True
    if key_shift is not None:
        key_shift = key_shift.to(torch.int64).expand(q.shape[0], k.shape[1]).contiguous()
    out, lse, mass = torch.ops.deepforcing.sink_attention(
        q, k, v, key_shift, freqs, interleaved, int(sink_len), int(sink_shift), float(softmax_scale),
        bool(return_mass), int(mass_q_range[0]), int(mass_q_range[1]))
    return out, (lse if return_lse else None), (mass if return_mass else None)


def set_block_rows(rows: int = 0) -> None:
    """Force the kernel's query rows per task (0 restores the automatic choice); for tuning and tests."""
    _ext.require().sink_attention_set_block_rows(int(rows))
