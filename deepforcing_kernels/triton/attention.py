"""Fused sink attention in Triton: online softmax, log-sum-exp, temporal RoPE re-phasing of keys on load.

Layout of this module (FlagAttention style): the public function :func:`sink_attention_triton`, its launch-config
heuristic :func:`fwd_config` (replaceable), host helpers that build the re-phasing tables, then the ``@triton.jit``
kernels (``_fwd_kernel`` calls the inner loop ``_attn_inner``, which calls ``_load_rotated_keys``).

Re-phasing. A key rotated at temporal position ``p`` and re-phased by ``d`` equals the key rotated at ``p + d``:
each temporal pair ``(re, im)`` of the key is rotated by the angle ``d * w_j``. The kernel does this to the K tile in
registers, in fp32, right after loading it (the pair partner of each channel comes from a second, permuted load of
the same cache lines, so the rotation is elementwise), then splits the fp32 result into ``hi + lo`` in the input
dtype and runs ``q . hi + q . lo`` on the tensor cores (16-bit inputs; see ``_load_rotated_keys`` for why). The
stored keys are never written. Angles are formed and reduced mod 2*pi on the host in float64 and only their cos / sin are
passed to the kernel in fp32 (SPEC section 7: an fp32 angle ``d * w_j`` is off by ~|d| * 1e-7 rad, which fails the
fp32 budget at |d| = 1e5):

* sink mode (``sink_len`` keys shifted by one ``sink_shift``): a ``[T]`` table (T = ``rope.temporal_pairs``),
  computed once per (rope, shift, device) and cached; the kernel loads it once per program.
* per-key mode (``key_shift`` tensor): a ``[B, Lk, T]`` table built per call with a few float64 torch ops.
  Cost: ``8 * T`` bytes per key (176 B for Wan, T = 22) of extra reads per (query tile, head) program, next to the
  ``2 * D`` bytes (256 B in bf16) of the key itself, plus one small float64 elementwise pass on the host device.
  The alternative, a hi/lo split of the angle inside the kernel, saves that traffic at the price of ~20 extra fp32
  ops per pair and a subtle argument-reduction path; the attention is compute bound, so the table was chosen.

Variants are compile-time flags: ``REPHASE`` 0 (no key moves), 1 (sink keys ``[0, sink_len)``; the key loop is
split in a re-phasing loop over the sink tiles and a plain loop over the rest), 2 (every key, per-key shift).
"""
from __future__ import annotations

import functools
import importlib
import math
import sys
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..rope import RopeSpec

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax_scale * LOG2E lets the kernels use exp2

REPHASE_NONE, REPHASE_SINK, REPHASE_PER_KEY = 0, 1, 2


class FwdConfig(NamedTuple):
    """Launch configuration of the forward kernel (and of the mass kernel, see :mod:`.mass`)."""

    BLOCK_M: int  # query rows per program
    BLOCK_N: int  # keys per inner-loop step over keys that are not re-phased
    num_warps: int
    num_stages: int
    BLOCK_N_ROT: int = 0  # keys per step over re-phased tiles (0: BLOCK_N); the rotation needs registers


# ---------------------------------------------------------------------------------------------- public op
def sink_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope: Optional[RopeSpec], sink_len: int,
    sink_shift: int, key_shift: Optional[torch.Tensor], softmax_scale: float, return_lse: bool,
    return_mass: bool, mass_q_range: Tuple[int, int], config: Optional[FwdConfig] = None,
    mass_config: Optional[FwdConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Attention of ``q`` over ``k, v`` with the temporal RoPE band of sink keys re-phased in registers.

    Arguments arrive validated and normalised by :func:`deepforcing_kernels.sink_attention` (``backend="triton"``).

    Args:
        q: ``[B, Lq, Hq, D]`` fp32 / fp16 / bf16, any strides; ``D`` a power of two in [16, 256].
        k, v: ``[B, Lk, Hkv, D]``, same dtype; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        rope: RoPE layout of the keys (``layout`` and ``temporal_pairs`` are read); None when nothing moves.
        sink_len, sink_shift: keys ``[0, sink_len)`` are re-phased by ``sink_shift`` positions.
        key_shift: None or int64 ``[B, Lk]`` contiguous: a per-key shift that overrides the two above.
        softmax_scale: multiplier of ``q . k``.
        return_lse: return the log-sum-exp ``[B, Hq, Lq]`` (fp32, natural log).
        return_mass: return the attention mass ``[B, Hkv, Lk]`` (fp32), summed over query rows
            ``mass_q_range`` and the query heads of each KV group (second pass, :mod:`.mass`).
        mass_q_range: ``(start, end)`` query rows counted in the mass.
        config: forward launch config; default :func:`fwd_config` (looked up at call time, so it can be replaced).
        mass_config: mass-kernel launch config; default :func:`deepforcing_kernels.triton.mass.mass_config`.

    Returns:
        ``(out [B, Lq, Hq, D] in q.dtype, lse or None, mass or None)``.
    """
    _ensure_kernel_mode()
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    _check_head_dim(D)
    arch = device_arch(q.device)
    cfg = config if config is not None else fwd_config(D, q.dtype, arch)
    mode, cos, sin, stride_cb, stride_cn = rephase_tables(rope, sink_len, sink_shift, key_shift, q.device)
    interleaved = True if rope is None else rope.interleaved
    n_temporal = 0 if rope is None else rope.temporal_pairs

    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    need_lse = return_lse or return_mass
    # Row statistics, three planes [B, Hq, Lq]: natural-log lse, and (for the mass pass) the running max m (log2
    # domain) and the sum l. The mass pass normalises by exp2(s - m) / l: recomputing exp(s - lse) would lose
    # ulp(lse), about 1e-3 at logits of 1e4.
    stats = torch.empty((3 if return_mass else 1, B, Hq, Lq), dtype=torch.float32, device=q.device) \
        if need_lse else out  # dummy if unused
    grid = (triton.cdiv(Lq, cfg.BLOCK_M), B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, stats, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        stride_cb, stride_cn,
        Hq, Hq // Hkv, Lq, Lk, sink_len, n_temporal, softmax_scale * LOG2E,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_N_ROT=cfg.BLOCK_N_ROT or cfg.BLOCK_N, BLOCK_D=D,
        REPHASE=mode, INTERLEAVED=interleaved, STORE_LSE=need_lse, STORE_STATS=return_mass,
        SPLIT=q.dtype != torch.float32, DOT_F32=_dot_in_f32(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    mass = None
    if return_mass:
        from .mass import attention_mass

        mass = attention_mass(q, k, stats[1:], cos, sin, stride_cb, stride_cn, mode=mode, interleaved=interleaved,
                              n_temporal=n_temporal, sink_len=sink_len, softmax_scale=softmax_scale,
                              mass_q_range=mass_q_range, config=mass_config)
    return out, (stats[0] if return_lse else None), mass


# ---------------------------------------------------------------------------------------------- launch heuristic
def fwd_config(head_dim: int, dtype: torch.dtype, arch: int) -> FwdConfig:
    """Forward launch config for ``(head_dim, dtype, arch)``; ``arch`` is ``major * 10 + minor`` (0: interpreter).

    A small explicit table, no autotuning: the production variants (D = 128, fp16 / bf16, sm_80 and sm_90) were
    checked for zero register spills with ``python -m deepforcing_kernels.triton.aot``. Replace this function
    (``attention.fwd_config = my_fn``) or pass ``config=`` to override.
    """
    if arch == 0:  # interpreter: fewer, larger programs run faster in numpy; tests pass small tiles explicitly
        return FwdConfig(32, 32, 4, 1)
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the key tile
        return FwdConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return FwdConfig(128, 64, 8, 3, BLOCK_N_ROT=32)  # 4 warps: 255 registers, spills in per-key mode
    if head_dim <= 128:
        # Re-phased tiles run 32 keys wide: at 64 the fp32 rotation pushes sm_80 / sm_90 past 255 registers.
        if arch >= 90:
            return FwdConfig(128, 64, 8, 3, BLOCK_N_ROT=32)
        return FwdConfig(128, 64, 8, 2, BLOCK_N_ROT=32)  # 3 stages spill on sm_80
    return FwdConfig(64, 32, 8, 2)


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device; 0 for CPU tensors (interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# ---------------------------------------------------------------------------------------------- host helpers
def rephase_tables(rope: Optional[RopeSpec], sink_len: int, sink_shift: int, key_shift: Optional[torch.Tensor],
                   device: torch.device):
    """``(mode, cos, sin, stride_cb, stride_cn)`` for the kernels.

    Angles ``shift * w_j`` are formed and reduced mod 2*pi in float64, then cos / sin are stored in fp32.
    Sink mode: ``[T]`` tables (cached). Per-key mode: ``[B, Lk, T]`` tables. No re-phasing: 1-element dummies.
    """
    if key_shift is not None and rope is not None:  # (rope None: validation proved every shift is 0)
        w = rope.temporal_freqs().to(device=device)  # float64 [T]
        ang = torch.remainder(key_shift.to(torch.float64)[..., None] * w, 2.0 * math.pi)  # [B, Lk, T]
        cos = torch.cos(ang).to(torch.float32).contiguous()
        sin = torch.sin(ang).to(torch.float32).contiguous()
        return REPHASE_PER_KEY, cos, sin, cos.stride(0), cos.stride(1)
    if sink_len > 0 and sink_shift != 0:
        cos, sin = _sink_table(rope, int(sink_shift), device)
        return REPHASE_SINK, cos, sin, 0, 0
    dummy = _dummy(device)
    return REPHASE_NONE, dummy, dummy, 0, 0


@functools.lru_cache(maxsize=128)
def _sink_table(rope: RopeSpec, shift: int, device: torch.device):
    # float64 on the host: the angle shift * w_j and its reduction mod 2*pi are exact to ~1e-16 relative.
    ang = [math.fmod(shift * w, 2.0 * math.pi) for w in rope.temporal_freqs().tolist()]
    cos = torch.tensor([math.cos(a) for a in ang], dtype=torch.float32).to(device)
    sin = torch.tensor([math.sin(a) for a in ang], dtype=torch.float32).to(device)
    return cos, sin


@functools.lru_cache(maxsize=8)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _check_head_dim(d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"the triton backend needs head_dim a power of two in [16, 256], got {d}; "
                         "use backend='cpp' or 'reference'")


def _dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether dots run on fp32 operands: always for fp32 inputs (ieee), and for bf16 under the interpreter,
    which stores bf16 as uint16 and would multiply the raw integers in ``tl.dot`` (SPEC section 7(a))."""
    from triton import knobs

    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(knobs.runtime.interpret))


def _ensure_kernel_mode() -> None:
    """Rebuild the kernels if ``TRITON_INTERPRET`` changed since this module was imported.

    ``@triton.jit`` reads the variable when it decorates (at import), and a ``@triton.jit`` function can only
    call helpers created in the same mode. A test session may import this module before setting the variable;
    reloading this module and :mod:`.mass` re-creates every kernel in the current mode.
    """
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_fwd_kernel, InterpretedFunction) == bool(knobs.runtime.interpret):
        return
    importlib.reload(sys.modules[__name__])
    if __package__ + ".mass" in sys.modules:
        importlib.reload(sys.modules[__package__ + ".mass"])


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair_channels(offs_d, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per channel ``d``: its pair index, its partner channel, and the sign of the partner's sin term.

    A pair ``(re, im)`` rotates as ``re' = re*c - im*s``, ``im' = im*c + re*s``, so every channel is
    ``x[d] * c[pair(d)] + x[partner(d)] * sign(d) * s[pair(d)]`` with ``sign = -1`` on the real channel.
    """
    if INTERLEAVED:  # pair i = channels (2i, 2i+1)
        pair = offs_d // 2
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:  # pair i = channels (i, i + D/2)
        pair = offs_d % (BLOCK_D // 2)
        partner = (offs_d + BLOCK_D // 2) % BLOCK_D
        sign = tl.where(offs_d < BLOCK_D // 2, -1.0, 1.0)
    return pair, partner, sign


@triton.jit
def _load_rotated_keys(K, offs_n, offs_d, n_mask, stride_kn, stride_kd, Cos, Sin, c_sink, s_sink, cs_base,
                       stride_cn, sink_len, n_temporal, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load a ``[BLOCK_N, BLOCK_D]`` key tile (rows ``offs_n``; zeros past ``Lk``) and re-phase it in registers.

    ``ROTATE``: 0 none; 1 sink (keys ``< sink_len`` by the per-channel ``c_sink, s_sink`` of
    :func:`_load_sink_angles`; a tile may straddle ``sink_len``); 2 per key (angles gathered from the
    ``[B, Lk, T]`` tables at ``cs_base``). Shared with :mod:`.mass`.

    The pair partner of every channel is loaded as a second, permuted tile (same cache lines, so it hits L1):
    the rotation is then purely elementwise in fp32, with no register shuffles or layout conversions (an earlier
    reshape / split / join version spilled on sm_80).

    Returns ``(k_hi, k_lo)`` in the input dtype with ``k_hi + k_lo`` = the fp32 rotated keys to ~2^-16 relative
    (``k_lo`` is unused, and returned as ``k_hi``, when ``ROTATE == 0``). Rounding the rotated keys to bf16 once
    costs ~4e-3 relative per key, coherent over every query that reads the key, which does not fit the
    SPEC section 7 budget for lse / mass; the second dot ``q . k_lo`` removes it and runs on re-phased tiles only.
    For fp32 inputs ``k_lo`` is exactly zero and the callers skip it (``SPLIT``).
    """
    k_ptrs = K + offs_n[:, None] * stride_kn
    k = tl.load(k_ptrs + offs_d[None, :] * stride_kd, mask=n_mask[:, None], other=0.0)
    if ROTATE == 0:
        k_hi = k
        k_lo = k
    else:
        pair, partner, sign = _pair_channels(offs_d, INTERLEAVED, BLOCK_D)
        k_partner = tl.load(k_ptrs + partner[None, :] * stride_kd, mask=n_mask[:, None], other=0.0)
        if ROTATE == 1:
            in_sink = (offs_n < sink_len)[:, None]
            c = tl.where(in_sink, c_sink, 1.0)
            s = tl.where(in_sink, s_sink, 0.0)
        else:
            cs_mask = n_mask[:, None] & (pair < n_temporal)[None, :]
            cs_off = cs_base + offs_n[:, None].to(tl.int64) * stride_cn + pair[None, :]
            c = tl.load(Cos + cs_off, mask=cs_mask, other=1.0)
            s = tl.load(Sin + cs_off, mask=cs_mask, other=0.0) * sign[None, :]
        kf = k.to(tl.float32) * c + k_partner.to(tl.float32) * s
        k_hi = kf.to(k.dtype)
        k_lo = (kf - k_hi.to(tl.float32)).to(k.dtype)
    return k_hi, k_lo


@triton.jit
def _load_sink_angles(Cos, Sin, n_temporal, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per-channel ``[1, BLOCK_D]`` cos and signed sin of the sink shift (1 / 0 on non-temporal channels)."""
    offs_d = tl.arange(0, BLOCK_D)
    pair, partner, sign = _pair_channels(offs_d, INTERLEAVED, BLOCK_D)
    p_mask = pair < n_temporal
    c = tl.load(Cos + pair, mask=p_mask, other=1.0)[None, :]
    s = (tl.load(Sin + pair, mask=p_mask, other=0.0) * sign)[None, :]
    return c, s


@triton.jit
def _qk_dot(q, k, DOT_F32: tl.constexpr):
    """``q @ k^T``; fp32 operands use IEEE fp32 (the GPU would use TF32 otherwise)."""
    if DOT_F32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _scores(q, k_hi, k_lo, ROTATE: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    """``q @ (k_hi + k_lo)^T``: the low part only for re-phased tiles of 16-bit inputs."""
    qk = _qk_dot(q, k_hi, DOT_F32)
    if ROTATE != 0:
        if SPLIT:
            qk += _qk_dot(q, k_lo, DOT_F32)
    return qk


@triton.jit
def _attn_inner(acc, l_i, m_i, q, K, V, start, end, Lk, offs_d, stride_kn, stride_kd, stride_vn,
                stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len, n_temporal, qk_scale,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr,
                SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax loop over keys ``[start, end)`` (exp2 domain: scores are pre-multiplied by
    ``scale * log2(e)``, so ``exp2`` replaces ``exp``)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < Lk
        k_hi, k_lo = _load_rotated_keys(K, offs_n, offs_d, n_mask, stride_kn, stride_kd, Cos, Sin, c_sink, s_sink,
                                        cs_base, stride_cn, sink_len, n_temporal, BLOCK_N, BLOCK_D, ROTATE,
                                        INTERLEAVED)
        qk = _scores(q, k_hi, k_lo, ROTATE, SPLIT, DOT_F32) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))  # tail keys past Lk
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first step (m_i = -inf)
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
    Q, K, V, Out, Lse, Cos, Sin,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_cb, stride_cn,
    Hq, group, Lq, Lk, sink_len, n_temporal, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_ROT: tl.constexpr, BLOCK_D: tl.constexpr,
    REPHASE: tl.constexpr, INTERLEAVED: tl.constexpr, STORE_LSE: tl.constexpr, STORE_STATS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
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
    cs_base = b * stride_cb

    if REPHASE == 1:
        # Sink tiles [0, ceil(sink_len / BLOCK_N_ROT) * BLOCK_N_ROT) re-phase on load (the last may straddle
        # sink_len); the rest run the plain loop with the wider BLOCK_N, so the common path pays nothing.
        c_sink, s_sink = _load_sink_angles(Cos, Sin, n_temporal, BLOCK_D, INTERLEAVED)
        sink_end = tl.minimum(tl.cdiv(sink_len, BLOCK_N_ROT) * BLOCK_N_ROT, Lk)
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, sink_end, Lk, offs_d, stride_kn, stride_kd,
                                    stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len,
                                    n_temporal, qk_scale, BLOCK_N_ROT, BLOCK_D, 1, INTERLEAVED, SPLIT, DOT_F32)
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, sink_end, Lk, Lk, offs_d, stride_kn, stride_kd,
                                    stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn, sink_len,
                                    n_temporal, qk_scale, BLOCK_N, BLOCK_D, 0, INTERLEAVED, SPLIT, DOT_F32)
    else:
        c_sink = tl.full([1, BLOCK_D], 1.0, dtype=tl.float32)  # unused placeholders
        s_sink = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        if REPHASE == 2:
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, Lk, Lk, offs_d, stride_kn, stride_kd,
                                        stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn,
                                        sink_len, n_temporal, qk_scale, BLOCK_N_ROT, BLOCK_D, 2, INTERLEAVED, SPLIT,
                                        DOT_F32)
        else:
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K, V, 0, Lk, Lk, offs_d, stride_kn, stride_kd,
                                        stride_vn, stride_vd, Cos, Sin, c_sink, s_sink, cs_base, stride_cn,
                                        sink_len, n_temporal, qk_scale, BLOCK_N, BLOCK_D, 0, INTERLEAVED, SPLIT,
                                        DOT_F32)

    # Epilogue. Every row saw at least one key (Lk >= 1), so l_i > 0.
    out = acc / l_i[:, None]
    Out += b * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None])
    if STORE_LSE:
        # m_i + log2(l_i) is the log2-sum-exp2 of the scaled scores; times ln 2 gives the natural-log LSE.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        row = Lse + pid_bh.to(tl.int64) * Lq + offs_m
        tl.store(row, lse, mask=m_mask)
        if STORE_STATS:  # planes 1 and 2: max and sum, for the mass pass
            plane = tl.num_programs(1).to(tl.int64) * Lq
            tl.store(row + plane, m_i, mask=m_mask)
            tl.store(row + 2 * plane, l_i, mask=m_mask)
