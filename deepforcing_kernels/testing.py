"""Test helpers shipped with the package: the float64 oracle and the error budget of docs/spec.md section 7.

A backend passes when ``err_kernel <= 2 * err_torch + atol`` (atol = 1e-5), where errors are max-abs distances
to the float64 oracle and ``err_torch`` is the error of plain PyTorch attention done in the input dtype on keys
re-phased in float64 and then cast. Mass is judged the same way, relative to ``max(1, max mass)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference.attention import key_shifts
from .reference.rope import rephase
from .rope import RopeSpec

ATOL = 1e-5


def _rotated_keys64(k, rope, sink_len, sink_shift, key_shift):
    B, Lk = k.shape[0], k.shape[1]
    shifts = key_shifts(B, Lk, sink_len=sink_len, sink_shift=sink_shift,
                        key_shift=None if key_shift is None else key_shift.to(k.device), device=k.device)
    k64 = k.double()
    return k64 if shifts is None or rope is None else rephase(k64, rope, shifts)


def _attend(q, k, v, scale, mass_q_range, compute_dtype):
    """Plain attention in ``compute_dtype``; returns (out, lse, mass) in that dtype."""
    Hq, Hkv = q.shape[2], k.shape[2]
    group = Hq // Hkv
    qc = q.to(compute_dtype).transpose(1, 2)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    lse = torch.logsumexp(s.float() if compute_dtype != torch.float64 else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, vc).transpose(1, 2)
    m0, m1 = mass_q_range
    B, Lk = q.shape[0], k.shape[1]
    mass = p[:, :, m0:m1].to(torch.float64).sum(dim=2).view(B, Hkv, group, Lk).sum(dim=2)
    return out, lse, mass


def oracle(q, k, v, *, rope: Optional[RopeSpec] = None, sink_len: int = 0, sink_shift: int = 0,
           key_shift: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
           mass_q_range: Optional[Tuple[int, int]] = None):
    """float64 ``(out, lse, mass)`` of the op's contract (keys re-phased in float64)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mr = mass_q_range if mass_q_range is not None else (0, q.shape[1])
    k64 = _rotated_keys64(k, rope, sink_len, sink_shift, key_shift)
    return _attend(q.double(), k64, v.double(), scale, mr, torch.float64)


def torch_in_dtype(q, k, v, *, rope=None, sink_len=0, sink_shift=0, key_shift=None, softmax_scale=None,
                   mass_q_range=None):
    """PyTorch attention in the input dtype on keys re-phased in float64 and cast: the error yardstick."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mr = mass_q_range if mass_q_range is not None else (0, q.shape[1])
    kr = _rotated_keys64(k, rope, sink_len, sink_shift, key_shift).to(q.dtype)
    return _attend(q, kr, v, scale, mr, q.dtype)


def budget_report(result, q, k, v, **kwargs) -> dict:
    """Errors of ``result`` (a tensor or ``SinkAttentionOutput``) and of the yardstick against the oracle."""
    out = result if isinstance(result, torch.Tensor) else result.out
    lse = None if isinstance(result, torch.Tensor) else result.lse
    mass = None if isinstance(result, torch.Tensor) else result.mass
    o_out, o_lse, o_mass = oracle(q, k, v, **kwargs)
    t_out, t_lse, t_mass = torch_in_dtype(q, k, v, **kwargs)
    rep = {
        "out": ((out.double() - o_out).abs().max().item(), (t_out.double() - o_out).abs().max().item()),
    }
    if lse is not None:
        rep["lse"] = ((lse.double() - o_lse).abs().max().item(), (t_lse.double() - o_lse).abs().max().item())
    if mass is not None:
        denom = max(1.0, o_mass.abs().max().item()) if o_mass.numel() else 1.0
        rep["mass"] = ((mass.double() - o_mass).abs().max().item() / denom,
                       (t_mass.double() - o_mass).abs().max().item() / denom)
    return rep


def assert_within_budget(result, q, k, v, *, atol: float = ATOL, **kwargs) -> dict:
    """Assert every returned output obeys ``err_kernel <= 2 * err_torch + atol``; returns the report."""
    rep = budget_report(result, q, k, v, **kwargs)
    for name, (err_kernel, err_torch) in rep.items():
        assert err_kernel <= 2 * err_torch + atol, (
            f"{name}: error {err_kernel:.3e} exceeds budget 2 * {err_torch:.3e} + {atol:g} "
            f"(dtype {q.dtype}, shapes q {list(q.shape)} k {list(k.shape)}, {kwargs})")
    return rep
