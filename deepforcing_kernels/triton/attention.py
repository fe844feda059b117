"""Fused sink attention forward in Triton: online softmax, log-sum-exp, temporal RoPE re-phasing of keys on load.

Layout (FlagAttention style): the launcher :func:`forward` (called by :func:`deepforcing_kernels.triton.op.
sink_attention_cuda`), then the ``@triton.jit`` kernels (``_fwd_kernel`` calls the inner loop ``_attn_inner``,
which calls the shared key loader ``_load_rotated_keys`` of :mod:`.common`). Launch configurations come from the
tables of :mod:`.configs` (``fwd_config`` here is :func:`.configs.fwd_config`, looked up at every launch).

Re-phasing. A key rotated at temporal position ``p`` and re-phased by ``d`` equals the key rotated at ``p + d``:
each temporal pair ``(re, im)`` of the key is rotated by the angle ``d * w_j``. The kernel does this to the K tile in
registers, in fp32, right after loading it (the pair partner of each channel comes from a second, permuted load of
the same cache lines, so the rotation is elementwise), then splits the fp32 result into ``hi + lo`` in the input
dtype and runs ``q . hi + q . lo`` on the tensor cores (16-bit inputs; see ``_load_rotated_keys`` for why). The
stored keys are never written. The caller passes float32 ``cos`` / ``sin`` tables of the angles (built in float64
by :func:`deepforcing_kernels.rotation.rotation_tables`; docs/spec.md section 7: an fp32 angle is off by ~|d| * 1e-7 rad):

* sink mode: a ``[T]`` table (T = ``rope.temporal_pairs``) for keys ``[0, rot_len)``, loaded once per program;
* per-key mode: a ``[B, Lk, T]`` table. Cost: ``8 * T`` bytes per key (176 B for Wan, T = 22) of extra reads per
  (query tile, head) program, next to the ``2 * D`` bytes (256 B in bf16) of the key itself. The alternative, a
  hi/lo split of the angle inside the kernel, saves that traffic at the price of ~20 extra fp32 ops per pair and
  a subtle argument-reduction path; the attention is compute bound, so the table was chosen.

Variants are compile-time flags: ``REPHASE`` 0 (no key moves), 1 (sink keys ``[0, rot_len)``; the key loop is
split in a re-phasing loop over the sink tiles and a plain loop over the rest), 2 (every key, per-key shift);
``HAS_BIAS`` adds the op's ``key_bias`` (float32 ``[B|1, Hq|1, Lk]``, broadcast by zero strides) to the scaled
logits of each key tile, with the running max guarded against tiles whose keys the bias removes entirely.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (  # noqa: F401
    LOG2E,
    REPHASE_NONE,
    REPHASE_PER_KEY,
    REPHASE_SINK,
    _load_rotated_keys,
    _load_sink_angles,
    _scores,
    bias_args,
    device_arch,
    dot_in_f32,
    ensure_kernel_mode,
    table_strides,
)
from .configs import FwdConfig, fwd_config  # noqa: F401  (re-exported: tests and users patch fwd_config here)

_ensure_kernel_mode = ensure_kernel_mode  # the name the interpreter tests use


# ---------------------------------------------------------------------------------------------- launcher
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
            mode: int, rot_len: int, interleaved: bool, softmax_scale: float, out: torch.Tensor,
            lse: torch.Tensor, stats: Optional[torch.Tensor], config: FwdConfig, launch,
            key_bias: Optional[torch.Tensor] = None) -> None:
    """Launch the forward kernel: writes ``out [B, Lq, Hq, D]``, ``lse [B, Hq, Lq]`` (natural log) and, when
    ``stats`` is given, its planes ``[2, B, Hq, Lq]``: the running max ``m`` (log2 domain) and sum ``l`` of each
    row, for the mass pass (which normalises by ``exp2(s - m) / l``: recomputing ``exp(s - lse)`` would lose
    ``ulp(lse)``, about 1e-3 at logits of 1e4).

    ``cos, sin``: ``[T]`` (mode 1), ``[B, Lk, T]`` (mode 2) or anything fp32 (mode 0: never read). ``launch`` wraps
    the kernel (``torch.library.wrap_triton``). ``key_bias``: None or a contiguous float32 ``[B|1, Hq|1, Lk]``.
    No host sync, no data-dependent branch.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    cfg = config
    n_temporal = cos.shape[-1] if mode != REPHASE_NONE else 0
    stride_cb, stride_cn, stride_ch = table_strides(cos, mode)
    grid = (triton.cdiv(Lq, cfg.BLOCK_M), B * Hq)
    bias, stride_bb, stride_bh = bias_args(key_bias, cos)
    launch(_fwd_kernel)[grid](
        q, k, v, out, lse, stats if stats is not None else cos, cos, sin, bias,  # (Stats unused without stats)
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        stride_cb, stride_cn, stride_ch, stride_bb, stride_bh,
        Hq, Hq // Hkv, Lq, Lk, rot_len if mode == REPHASE_SINK else 0, n_temporal, softmax_scale * LOG2E,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_N_ROT=cfg.BLOCK_N_ROT or cfg.BLOCK_N, BLOCK_D=D,
        REPHASE=mode, INTERLEAVED=interleaved, STORE_LSE=True, STORE_STATS=stats is not None,
        HAS_BIAS=key_bias is not None,
        SPLIT=q.dtype != torch.float32, DOT_F32=dot_in_f32(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _attn_inner(acc, l_i, m_i, q, K, V, start, end, Lk, offs_d, stride_kn, stride_kd, stride_vn,
                stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len, n_temporal, qk_scale, Bias,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr,
                SPLIT: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Online-softmax loop over keys ``[start, end)`` (exp2 domain: scores are pre-multiplied by
    ``scale * log2(e)``, so ``exp2`` replaces ``exp``; ``Bias`` points at this (batch, head)'s bias row)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < Lk
        k_hi, k_lo = _load_rotated_keys(K, offs_n, offs_d, n_mask, stride_kn, stride_kd, Cos, Sin, c_sink, s_sink,
                                        cs_base, stride_cn, sink_len, n_temporal, BLOCK_N, BLOCK_D, ROTATE,
                                        INTERLEAVED)
        qk = _scores(q, k_hi, k_lo, ROTATE, SPLIT, DOT_F32) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))  # tail keys past Lk
        if HAS_BIAS:
            qk += tl.load(Bias + offs_n, mask=n_mask, other=0.0)[None, :] * 1.4426950408889634  # to log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        if HAS_BIAS:
            # a bias of -inf can remove every key seen so far: exp2(-inf - -inf) would be NaN, so such rows
            # subtract 0 instead (their p and alpha are then 0: nothing accumulated yet); m_i stays -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)  # 0 on the first step (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_mask[:, None], other=0.0)
        p = p.to(v.dtype)  # P is rounded to the input dtype for the tensor-core dot, as in flash attention
        if DOT_F32:
            acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Stats, Cos, Sin, Bias,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_cb, stride_cn, stride_ch, stride_bb, stride_bh,
    Hq, group, Lq, Lk, sink_len, n_temporal, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_ROT: tl.constexpr, BLOCK_D: tl.constexpr,
    REPHASE: tl.constexpr, INTERLEAVED: tl.constexpr, STORE_LSE: tl.constexpr, STORE_STATS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One program: ``BLOCK_M`` query rows of one (batch, query head); loops over all keys of its KV head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kv_h = (h // group).to(tl.int64)  # GQA: contiguous groups of query heads share a KV head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq

    Q += b * stride_qb + h.to(tl.int64) * stride_qh
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=m_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # per-head tables (a RopeSpec with head_scale): this KV head's rows; stride_ch is 0 for shared tables
    cs_base = b * stride_cb + kv_h * stride_ch
    Bias += b * stride_bb + h.to(tl.int64) * stride_bh

    if REPHASE == 1:
        # Sink tiles [0, ceil(sink_len / BLOCK_N_ROT) * BLOCK_N_ROT) re-phase on load (the last may straddle
        # sink_len); the rest run the plain loop with the wider BLOCK_N, so the common path pays nothing.
        c_sink, s_sink = _load_sink_angles(Cos + kv_h * stride_ch, Sin + kv_h * stride_ch, n_temporal, BLOCK_D,
                                           INTERLEAVED)
        sink_end = tl.minimum(tl.cdiv(sink_len, BLOCK_N_ROT) * BLOCK_N_ROT, Lk)
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, sink_end, Lk, offs_d, stride_kn, stride_kd,
                                    stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len,
                                    n_temporal, qk_scale, Bias, BLOCK_N_ROT, BLOCK_D, 1, INTERLEAVED, SPLIT, DOT_F32,
                                    HAS_BIAS)
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, sink_end, Lk, Lk, offs_d, stride_kn, stride_kd,
                                    stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len,
                                    n_temporal, qk_scale, Bias, BLOCK_N, BLOCK_D, 0, INTERLEAVED, SPLIT, DOT_F32,
                                    HAS_BIAS)
    else:
        c_sink = tl.full([1, BLOCK_D], 1.0, dtype=tl.float32)  # unused placeholders
        s_sink = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        if REPHASE == 2:
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, Lk, Lk, offs_d, stride_kn, stride_kd,
                                        stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn,
                                        sink_len, n_temporal, qk_scale, Bias, BLOCK_N_ROT, BLOCK_D, 2, INTERLEAVED,
                                        SPLIT, DOT_F32, HAS_BIAS)
        else:
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, Lk, Lk, offs_d, stride_kn, stride_kd,
                                        stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn,
                                        sink_len, n_temporal, qk_scale, Bias, BLOCK_N, BLOCK_D, 0, INTERLEAVED, SPLIT,
                                        DOT_F32, HAS_BIAS)

    # Epilogue. Every row saw at least one key (Lk >= 1), so l_i > 0.
    out = acc / l_i[:, None]
    Out += b * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None])
    if STORE_LSE:
        # m_i + log2(l_i) is the log2-sum-exp2 of the scaled scores; times ln 2 gives the natural-log LSE.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        row = pid_bh.to(tl.int64) * Lq + offs_m
        tl.store(Lse + row, lse, mask=m_mask)
    if STORE_STATS:  # Stats [2, B, Hq, Lq]: max and sum, for the mass pass
        row = pid_bh.to(tl.int64) * Lq + offs_m
        plane = tl.num_programs(1).to(tl.int64) * Lq
        tl.store(Stats + row, m_i, mask=m_mask)
        tl.store(Stats + plane + row, l_i, mask=m_mask)
