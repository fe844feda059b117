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


def _attend(q, k, v, scale, mass_q_range, compute_dtype, key_bias=None):
    """Plain attention in ``compute_dtype`` (``key_bias [B|1, Hq|1, Lk]`` added to the scaled logits, in
    float64 for the oracle and in float32 otherwise: the bias is float32 data); returns (out, lse, mass)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    group = Hq // Hkv
    qc = q.to(compute_dtype).transpose(1, 2)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if key_bias is None:
        lse = torch.logsumexp(s.float() if compute_dtype != torch.float64 else s, dim=-1)
        p = torch.softmax(s, dim=-1)
    else:
        # the bias is float32 data: added in float32 (float64 for the oracle) and the softmax taken there (adding
        # a bias of 1e4 to bf16 logits would round them to steps of 64 and make the yardstick meaningless); P is
        # rounded to the input dtype for P V, as attention in that dtype does
        wide = torch.float64 if compute_dtype == torch.float64 else torch.float32
        s = s.to(wide) + _bias3(key_bias, q.shape[0], Hq, k.shape[1]).to(device=s.device, dtype=wide)[:, :, None]
        lse = torch.logsumexp(s, dim=-1).float() if wide == torch.float32 else torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1)
    out = torch.matmul(p.to(compute_dtype), vc).transpose(1, 2)
    m0, m1 = mass_q_range
    B, Lk = q.shape[0], k.shape[1]
    mass = p[:, :, m0:m1].to(torch.float64).sum(dim=2).view(B, Hkv, group, Lk).sum(dim=2)
    return out, lse, mass


def _bias3(key_bias: torch.Tensor, batch: int, heads: int, lk: int) -> torch.Tensor:
    """A bias broadcastable to ``[B, Hq, Lk]`` as a 3-D tensor (leading axes of size 1 added)."""
    b = key_bias
    while b.dim() < 3:
        b = b[None]
    return b.expand(batch, heads, lk)


def oracle(q, k, v, *, rope: Optional[RopeSpec] = None, sink_len: int = 0, sink_shift: int = 0,
           key_shift: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
           mass_q_range: Optional[Tuple[int, int]] = None, key_bias: Optional[torch.Tensor] = None):
    """float64 ``(out, lse, mass)`` of the op's contract (keys re-phased in float64; ``key_bias`` added to the
    scaled logits)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mr = mass_q_range if mass_q_range is not None else (0, q.shape[1])
    k64 = _rotated_keys64(k, rope, sink_len, sink_shift, key_shift)
    return _attend(q.double(), k64, v.double(), scale, mr, torch.float64, key_bias)


def torch_in_dtype(q, k, v, *, rope=None, sink_len=0, sink_shift=0, key_shift=None, softmax_scale=None,
                   mass_q_range=None, key_bias=None):
    """PyTorch attention in the input dtype on keys re-phased in float64 and cast: the error yardstick."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    mr = mass_q_range if mass_q_range is not None else (0, q.shape[1])
    kr = _rotated_keys64(k, rope, sink_len, sink_shift, key_shift).to(q.dtype)
    return _attend(q, kr, v, scale, mr, q.dtype, key_bias)


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
