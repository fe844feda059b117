"""Reference semantics of the fused op, in plain PyTorch (the oracle every backend is tested against).

``sink_attention_reference`` takes arguments already validated and normalised by
:func:`deepforcing_kernels.sink_attention` and returns ``(out, lse, mass)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..rope import RopeSpec
from ..rotation import key_shifts  # which key moves: the arguments' one expansion (the oracle rotates its own way)
from .rope import rephase

# Query rows processed at once: bounds the fp32 score matrix at Q_CHUNK x Lk per head.
Q_CHUNK = 1024


def effective_keys(k: torch.Tensor, rope: Optional[RopeSpec], shifts: Optional[torch.Tensor]) -> torch.Tensor:
    """Keys as attention sees them, in float32: re-phased by ``shifts`` where given."""
    kf = k.float()
    if shifts is None or rope is None:  # without a rope only all-zero shifts get here (validated upstream)
        return kf
    return rephase(kf, rope, shifts)


def sink_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope: Optional[RopeSpec], sink_len: int,
    sink_shift: int, key_shift: Optional[torch.Tensor], softmax_scale: float, return_lse: bool,
    return_mass: bool, mass_q_range: Tuple[int, int], key_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Attention over re-phased keys; maths in float32, output in ``q.dtype``.

    ``key_bias`` (float32 ``[B or 1, Hq or 1, Lk]``, or None) is added to the scaled logits of every query row of
    its (batch, query head) before the softmax: ``s = softmax_scale * q . k + key_bias``; lse and mass are those
    of that biased softmax.

    Returns ``out [B, Lq, Hq, D]``, ``lse [B, Hq, Lq]`` (float32, natural log) or None, and
    ``mass [B, Hkv, Lk]`` (float32) or None.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    shifts = key_shifts(B, Lk, sink_len=sink_len, sink_shift=sink_shift, key_shift=key_shift, device=k.device)
    kf = effective_keys(k, rope, shifts).transpose(1, 2)  # [B, Hkv, Lk, D]
    vf = v.float().transpose(1, 2)
    qf = q.float().transpose(1, 2)  # [B, Hq, Lq, D]
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    mass = torch.zeros(B, Hkv, Lk, dtype=torch.float32, device=q.device) if return_mass else None
    m0, m1 = mass_q_range
    for g in range(Hkv):
        heads = slice(g * group, (g + 1) * group)
        kg, vg = kf[:, g, None], vf[:, g, None]  # [B, 1, Lk, D]
        for s in range(0, Lq, Q_CHUNK):
            e = min(Lq, s + Q_CHUNK)
            scores = torch.matmul(qf[:, heads, s:e], kg.transpose(-1, -2)) * softmax_scale  # [B, G, c, Lk]
            if key_bias is not None:
                hb = heads if key_bias.shape[1] > 1 else slice(0, 1)
                scores = scores + key_bias[:, hb, None, :].to(scores.dtype)
            # normalise by exp(s - max) / sum, not exp(s - lse): at logits ~1e4 the ulp of lse alone is ~1e-3
            row_max = scores.amax(dim=-1, keepdim=True)
            p = torch.exp(scores - row_max)
            row_sum = p.sum(dim=-1, keepdim=True)
            p = p / row_sum
            out[:, heads, s:e] = torch.matmul(p, vg)
            lse[:, heads, s:e] = (row_max + torch.log(row_sum)).squeeze(-1)
            if mass is not None:
                a, b = max(s, m0), min(e, m1)
                if a < b:
                    mass[:, g] += p[:, :, a - s:b - s].sum(dim=(1, 2))
    return out.transpose(1, 2).to(q.dtype), (lse if return_lse else None), mass


def release_logit_score(q_buffer: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The release's Participative Compression score, ``score[b, j] = sum_h q_sum[b, h] . k[b, j, h // group]``
    with ``q_sum = q_buffer.sum(tokens)``: the oracle's plain float64 einsum (the production scorer,
    :func:`deepforcing_kernels.cache.release_logit_score`, computes it in float32 GEMV chunks). float32 ``[B, Lk]``.
    """
    B, Lk, Hkv, D = k.shape
    Hq = q_buffer.shape[2]
    q_sum = q_buffer.double().sum(dim=1).view(B, Hkv, Hq // Hkv, D).sum(dim=2)  # [B, Hkv, D]
    return torch.einsum("bhd,bjhd->bj", q_sum, k.double()).float()
