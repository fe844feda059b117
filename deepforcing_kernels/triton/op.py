"""The CUDA implementation of ``torch.ops.deepforcing.sink_attention``: the Triton forward and mass kernels.

:func:`sink_attention_cuda` has exactly the op's schema (``deepforcing_kernels/ops.py``)::

    (q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_start, mass_end, key_bias=None)
        -> (out [B, Lq, Hq, D] q.dtype, lse [B, Hq, Lq] fp32, mass [B, Hkv, Lk] fp32 or [0])

and launches its kernels through ``torch.library.wrap_triton``, so ``torch.library.triton_op`` can register it and
``torch.compile`` / CUDA graphs see the launches. It does no host sync, no ``.item()``, and branches only on
shapes and Python scalars (never on tensor data). The re-phasing variant follows from the tables' shape: ``[T]``
sink mode (keys ``[0, rot_len)``), ``[B, Lk, T]`` per-key mode, ``[0]`` (or ``rot_len == 0``) none. Under
``TRITON_INTERPRET=1`` it runs on CPU tensors (``wrap_triton`` passes interpreter kernels through).

:func:`sink_attention_triton` is the keyword entry (rope / sink_len / sink_shift / key_shift) used by the tests
and the ``"triton"`` backend: it builds the tables with :func:`deepforcing_kernels.rotation.rotation_tables` and
calls the same launcher, optionally with explicit launch configs. :func:`triton_supports` is the capability check
of the backend registry.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import attention as _attention
from . import mass as _mass
from . import triton_supports  # noqa: F401  (re-exported: the capability check lives in the package)
from .common import REPHASE_NONE, REPHASE_PER_KEY, REPHASE_SINK, device_arch, ensure_kernel_mode
from .configs import FwdConfig

__all__ = ["sink_attention_cuda", "sink_attention_triton", "triton_supports", "launch"]

_MODE_NAMES = {REPHASE_NONE: "none", REPHASE_SINK: "sink", REPHASE_PER_KEY: "perkey"}


def _wrap(kernel):
    return torch.library.wrap_triton(kernel)


def rephase_mode(cos: torch.Tensor, rot_len: int) -> int:
    """The kernels' ``REPHASE`` variant for tables of this shape (a shape, not a data, decision)."""
    if rot_len == 0 or cos.numel() == 0:
        return REPHASE_NONE
    return REPHASE_PER_KEY if cos.dim() in (3, 4) else REPHASE_SINK  # [T] / [H, T] sink; [B, Lk, (H,) T] per key


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_len: int,
           interleaved: bool, softmax_scale: float, return_mass: bool, mass_start: int, mass_end: int,
           key_bias: Optional[torch.Tensor] = None, *, config: Optional[FwdConfig] = None,
           mass_config: Optional[FwdConfig] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sink_attention_cuda` with optional explicit launch configs (default: the tables of
    :mod:`.configs`, looked up through ``attention.fwd_config`` / ``mass.mass_config`` at every call)."""
    ensure_kernel_mode()
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    mode = rephase_mode(cos, rot_len)
    name = _MODE_NAMES[mode]
    arch = device_arch(q.device)
    cfg = config if config is not None else _attention.fwd_config(D, q.dtype, arch, name)
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if mode == REPHASE_NONE:  # never read by the kernels; an fp32 pointer keeps one compiled signature
        cos = sin = torch.empty((1,), dtype=torch.float32, device=q.device)
    stats = (torch.empty((2, B, Hq, Lq), dtype=torch.float32, device=q.device) if return_mass else None)
    _attention.forward(q, k, v, cos, sin, mode=mode, rot_len=rot_len, interleaved=interleaved,
                       softmax_scale=softmax_scale, out=out, lse=lse, stats=stats, config=cfg, launch=_wrap,
                       key_bias=key_bias)
    if not return_mass:
        return out, lse, torch.empty((0,), dtype=torch.float32, device=q.device)
    if mass_end <= mass_start:
        return out, lse, torch.zeros((B, Hkv, Lk), dtype=torch.float32, device=q.device)
    mcfg = mass_config if mass_config is not None else _mass.mass_config(D, q.dtype, arch, name)
    mass = torch.empty((B, Hkv, Lk), dtype=torch.float32, device=q.device)  # every key is written once
    _mass.attention_mass(q, k, stats, cos, sin, mode=mode, rot_len=rot_len, interleaved=interleaved,
                         softmax_scale=softmax_scale, mass_start=mass_start, mass_end=mass_end, mass=mass,
                         config=mcfg, launch=_wrap, key_bias=key_bias)
    return out, lse, mass


def sink_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        rot_len: int, interleaved: bool, softmax_scale: float, return_mass: bool, mass_start: int,
                        mass_end: int, key_bias: Optional[torch.Tensor] = None,
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's CUDA implementation (schema in the module docstring; inputs validated by the caller).

    Args:
        q: ``[B, Lq, Hq, D]`` fp32 / fp16 / bf16, any strides; ``D`` a power of two in [16, 256].
        k, v: ``[B, Lk, Hkv, D]``, same dtype; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        cos, sin: float32 rotation tables over the first ``T`` temporal pairs: ``[T]`` (keys ``[0, rot_len)``),
            ``[B, Lk, T]`` (every key, ``rot_len == Lk``) or ``[0]`` (nothing rotates).
        rot_len: keys re-phased (0: none).
        interleaved: pair ``t`` is channels ``(2t, 2t + 1)`` (else ``(t, t + D/2)``).
        softmax_scale: multiplier of ``q . k``.
        return_mass: compute the mass (second pass) over query rows ``[mass_start, mass_end)``.
        key_bias: None or a contiguous float32 ``[B|1, Hq|1, Lk]`` added to the scaled logits.

    Returns:
        ``(out, lse, mass)``; ``mass`` has shape ``[0]`` when ``return_mass`` is False.
    """
    return launch(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_start, mass_end,
                  key_bias)


def sink_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope, sink_len: int, sink_shift: int,
    key_shift: Optional[torch.Tensor], softmax_scale: float, return_lse: bool, return_mass: bool,
    mass_q_range: Tuple[int, int], config: Optional[FwdConfig] = None, mass_config: Optional[FwdConfig] = None,
    key_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Keyword entry over :func:`sink_attention_cuda`: arguments as validated by
    :func:`deepforcing_kernels.sink_attention` (``key_shift`` None or int64 ``[B, Lk]``); the tables come from
    :func:`deepforcing_kernels.rotation.rotation_tables`. ``config`` / ``mass_config`` override the launch tables.

    Returns:
        ``(out, lse or None, mass or None)``.
    """
    from ..rotation import rotation_tables

    problem = triton_supports(q.shape[-1], q.dtype)
    if problem is not None:
        raise ValueError(f"{problem}; use backend='cpp' or 'reference'")
    cos, sin, rot_len = rotation_tables(rope, sink_len, sink_shift, key_shift, q.shape[0], k.shape[1], q.device,
                                        k.shape[2])
    interleaved = True if rope is None else rope.interleaved
    out, lse, mass = launch(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_q_range[0],
                            mass_q_range[1], key_bias, config=config, mass_config=mass_config)
    return out, (lse if return_lse else None), (mass if return_mass else None)
