"""``@triton.jit`` helpers and host constants shared by the forward kernel (:mod:`.attention`) and the mass kernel
(:mod:`.mass`): the key loader that re-phases a K tile in registers, the score dot, and the interpreter switch.

Both kernel modules import from here and never from each other, so the import graph is a tree:
``common <- attention``, ``common <- mass``, ``attention, mass <- op``.
"""
from __future__ import annotations

import functools
import importlib
import sys

import torch
import triton
import triton.language as tl

from . import head_dim_problem, interpreting  # noqa: F401  (defined once, in the package; re-exported here)

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax_scale * LOG2E lets the kernels use exp2

REPHASE_NONE, REPHASE_SINK, REPHASE_PER_KEY = 0, 1, 2

#: Kernel modules rebuilt (in this order) when the interpreter mode changes; see :func:`ensure_kernel_mode`.
KERNEL_MODULES = ("common", "attention", "mass")


@functools.lru_cache(maxsize=16)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device; 0 for CPU tensors (interpreter). Cached per device: no host
    work per launch beyond a dict lookup."""
    if device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())





def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether dots run on fp32 operands: always for fp32 inputs (ieee), and for bf16 under the interpreter,
    which stores bf16 as uint16 and would multiply the raw integers in ``tl.dot`` (docs/spec.md section 7(a))."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def table_strides(cos: torch.Tensor, mode: int):
    """``(stride_cb, stride_cn, stride_ch)`` of the kernels' rotation tables: batch and key strides of per-key
    tables, and the KV-head stride of per-head tables (``[H, T]`` / ``[B, Lk, H, T]``; 0 when the table is shared
    by every head)."""
    if mode == REPHASE_PER_KEY:
        return cos.stride(0), cos.stride(1), (cos.stride(2) if cos.dim() == 4 else 0)
    if mode == REPHASE_SINK and cos.dim() == 2:
        return 0, 0, cos.stride(0)
    return 0, 0, 0


def bias_args(key_bias, placeholder: torch.Tensor):
    """``(pointer, stride_b, stride_h)`` of the kernels' bias arguments: a contiguous float32 ``[B|1, Hq|1, Lk]``
    bias with zero strides on its broadcast axes, or (without a bias) an fp32 placeholder the kernels never read,
    so both variants keep one pointer type."""
    if key_bias is None:
        return placeholder, 0, 0
    sb = 0 if key_bias.shape[0] == 1 else key_bias.stride(0)
    sh = 0 if key_bias.shape[1] == 1 else key_bias.stride(1)
    return key_bias, sb, sh


def ensure_kernel_mode() -> None:
    """Rebuild the kernels if ``TRITON_INTERPRET`` changed since they were created.

    ``@triton.jit`` reads the variable when it decorates (at import), and a ``@triton.jit`` function can only
    call helpers created in the same mode. A test session may import the kernels before setting the variable;
    this reloads :mod:`.common`, then :mod:`.attention` and :mod:`.mass` (those already imported), which re-creates
    every kernel in the current mode. Callers reach kernels through their module (``attention._fwd_kernel``),
    so they see the rebuilt ones.
    """
    from triton.runtime.interpreter import InterpretedFunction

    mine = sys.modules[__name__]
    if isinstance(mine._pair_channels, InterpretedFunction) == interpreting():
        return
    for name in KERNEL_MODULES:
        mod = sys.modules.get(f"{__package__}.{name}")
        if mod is not None:
            importlib.reload(mod)


# ---------------------------------------------------------------------------------------------- jit helpers
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
    ``[B, Lk, T]`` tables at ``cs_base``).

    The pair partner of every channel is loaded as a second, permuted tile (same cache lines, so it hits L1):
    the rotation is then purely elementwise in fp32, with no register shuffles or layout conversions (an earlier
    reshape / split / join version spilled on sm_80).

    Returns ``(k_hi, k_lo)`` in the input dtype with ``k_hi + k_lo`` = the fp32 rotated keys to ~2^-16 relative
    (``k_lo`` is unused, and returned as ``k_hi``, when ``ROTATE == 0``). Rounding the rotated keys to bf16 once
    costs ~4e-3 relative per key, coherent over every query that reads the key, which does not fit the
    docs/spec.md section 7 budget for lse / mass; the second dot ``q . k_lo`` removes it and runs on re-phased tiles only.
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
