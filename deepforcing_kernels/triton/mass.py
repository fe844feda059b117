"""Per-key attention mass: the softmax probability each key receives, summed over a range of query rows and the
query heads of its KV group. ``mass[b, g, j] = sum_{h in group g} sum_{i in [m0, m1)} P[b, h, i, j]``.

Two-pass design. The forward kernel (:mod:`.attention`) stores the running max ``m`` and sum ``l`` of every query
row; this kernel then recomputes ``P = exp2(s - m) / l`` tile by tile (exact where ``exp(s - lse)`` would lose
``ulp(lse)``, about 1e-3 at logits of 1e4). One program owns one tile of keys of one (batch, KV head): it loads
and re-phases its K tile once, loops over the query heads of the group and the query tiles of ``[m0, m1)``, and sums
``P`` over the query axis in registers. Each key is written by exactly one program, in a fixed loop order: no
atomics, bit-for-bit deterministic. Cost: one more ``Q K^T`` over the counted rows (``2 * Hq * (m1 - m0) * Lk * D``
FLOPs), no ``P V``.

Layout (FlagAttention style): the launcher :func:`attention_mass`, then the ``@triton.jit`` kernel, which shares the
key loader of :mod:`.common` with the forward. Launch configurations come from :mod:`.configs` (``mass_config``
here is :func:`.configs.mass_config`, looked up at every launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    REPHASE_SINK,
    _load_rotated_keys,
    _load_sink_angles,
    _scores,
    bias_args,
    dot_in_f32,
    table_strides,
)
from .configs import FwdConfig, mass_config  # noqa: F401  (re-exported: tests and users patch mass_config here)


def attention_mass(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                   mode: int, rot_len: int, interleaved: bool, softmax_scale: float, mass_start: int,
                   mass_end: int, mass: torch.Tensor, config: FwdConfig, launch,
                   key_bias=None) -> None:
    """Write the attention mass ``mass [B, Hkv, Lk]`` (fp32, zero-initialised by the caller) from the forward's
    row statistics ``stats [2, B, Hq, Lq]`` (contiguous): plane 0 the running max ``m`` of the log2-scaled scores,
    plane 1 the sum ``l``.

    ``cos, sin, mode, rot_len, key_bias`` are the forward's (so both passes see identical logits). ``config.BLOCK_N`` is the
    key tile owned by one program, ``config.BLOCK_M`` the query tile of the inner loop. Launches nothing when
    ``mass_end <= mass_start``. No host sync.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if mass_end <= mass_start:
        return
    cfg = config
    n_temporal = cos.shape[-1] if mode != 0 else 0
    stride_cb, stride_cn, stride_ch = table_strides(cos, mode)
    grid = (triton.cdiv(Lk, cfg.BLOCK_N), B * Hkv)
    bias, stride_bb, stride_bh = bias_args(key_bias, cos)
    launch(_mass_kernel)[grid](
        q, k, stats, mass, cos, sin, bias,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        stride_cb, stride_cn, stride_ch, stride_bb, stride_bh,
        Hq, Hkv, Hq // Hkv, Lq, Lk, mass_start, mass_end, rot_len if mode == REPHASE_SINK else 0, n_temporal,
        softmax_scale * LOG2E,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=D,
        REPHASE=mode, INTERLEAVED=interleaved, SPLIT=q.dtype != torch.float32,
        DOT_F32=dot_in_f32(q.dtype), HAS_BIAS=key_bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


@triton.jit
def _mass_kernel(
    Q, K, Stats, Mass, Cos, Sin, Bias,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_cb, stride_cn, stride_ch, stride_bb, stride_bh,
    Hq, Hkv, group, Lq, Lk, m0, m1, sink_len, n_temporal, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    REPHASE: tl.constexpr, INTERLEAVED: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One program: ``BLOCK_N`` keys of one (batch, KV head); sums ``P`` over the group's heads and rows
    ``[m0, m1)``."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // Hkv).to(tl.int64)
    g = pid_bg % Hkv

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < Lk

    K += b * stride_kb + g.to(tl.int64) * stride_kh
    if REPHASE == 1:
        c_sink, s_sink = _load_sink_angles(Cos + g.to(tl.int64) * stride_ch, Sin + g.to(tl.int64) * stride_ch,
                                           n_temporal, BLOCK_D, INTERLEAVED)
    else:
        c_sink = tl.full([1, BLOCK_D], 1.0, dtype=tl.float32)  # unused placeholders
        s_sink = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    # Loaded and re-phased once, reused for every query tile and head of the group.
    k_hi, k_lo = _load_rotated_keys(K, offs_n, offs_d, n_mask, stride_kn, stride_kd, Cos, Sin, c_sink, s_sink,
                                    b * stride_cb + g.to(tl.int64) * stride_ch, stride_cn, sink_len, n_temporal, BLOCK_N, BLOCK_D, REPHASE,
                                    INTERLEAVED)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for hh in range(0, group):
        h = g * group + hh
        Qh = Q + b * stride_qb + h.to(tl.int64) * stride_qh
        Mh = Stats + (b * Hq + h) * Lq  # plane 0: row max (log2 domain); plane 1: row sum
        plane = (tl.num_programs(1) // Hkv).to(tl.int64) * Hq * Lq
        if HAS_BIAS:  # this head's bias of the key tile, in log2 units (-inf: the key gets no mass)
            bias = tl.load(Bias + b * stride_bb + h.to(tl.int64) * stride_bh + offs_n, mask=n_mask,
                           other=0.0) * 1.4426950408889634
        for start_m in range(m0, m1, BLOCK_M):
            offs_m = start_m + offs_m0
            m_mask = offs_m < m1
            q = tl.load(Qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=m_mask[:, None],
                        other=0.0)
            # Rows outside [m0, m1) get m = +inf, hence P = 0; no extra select needed.
            m_row = tl.load(Mh + offs_m, mask=m_mask, other=float("inf"))
            inv_l = 1.0 / tl.load(Mh + plane + offs_m, mask=m_mask, other=1.0)
            qk = _scores(q, k_hi, k_lo, REPHASE, SPLIT, DOT_F32) * qk_scale
            if HAS_BIAS:
                qk += bias[None, :]
            p = tl.math.exp2(qk - m_row[:, None]) * inv_l[:, None]
            acc += tl.sum(p, 0)
    tl.store(Mass + pid_bg.to(tl.int64) * Lk + offs_n, acc, mask=n_mask)
