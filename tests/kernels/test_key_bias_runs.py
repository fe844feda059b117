"""The C++ kernel's run-wise key bias: a bias row made of long runs of equal values (a per-frame bias, as Recency
Forcing's chunks: runs of >= 256 keys on average) is applied once per run instead of per key. Held to the float64
oracle under the docs/spec.md section 7 budget, with lse and mass, fp32 / bf16, with and without re-phasing, runs
removed by -inf, per-head runs, and against the per-key path (the same bias with one key's value nudged, so the row
no longer qualifies)."""
import pytest
import torch
from support import require_cpp

from deepforcing_kernels import RopeSpec, sink_attention
from deepforcing_kernels.testing import assert_within_budget

ROPE = RopeSpec.wan(64)
N = 300  # keys per frame: runs long enough for the run-wise path


def _qkv(dtype, frames=7, Lq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, Lq, 4, 64, generator=g).to(dtype), torch.randn(2, frames * N, 2, 64, generator=g).to(dtype),
            torch.randn(2, frames * N, 2, 64, generator=g).to(dtype))


def _bias(kind, frames=7):
    per_frame = {
        "recency": torch.tensor([0.0, -4.0, -3.5652, -3.0314, -2.2974, 0.0, 0.0]),
        "removed": torch.tensor([0.0, float("-inf"), -2.0, 0.0, float("-inf"), -1.0, 0.0]),
        "constant": torch.full((frames,), 1.5),
        "wide": torch.tensor([0.0, -1e4, 3.0, -20.0, 0.0, 5.0, -7.0]),
    }
    if kind == "per-head":
        return torch.stack([torch.tensor([0.0, -1.0 * h, 0.5, -3.0, 0.0, -h / 2, 0.0]) for h in range(4)]
                           ).repeat_interleave(N, dim=-1)
    return per_frame[kind].repeat_interleave(N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["recency", "removed", "constant", "wide", "per-head"])
@pytest.mark.parametrize("shift", [{}, {"sink_len": 3 * N, "sink_shift": 11}])
def test_run_wise_bias_within_budget(dtype, kind, shift):
    require_cpp()
    q, k, v = _qkv(dtype)
    bias = _bias(kind)
    res = sink_attention(q, k, v, rope=ROPE, key_bias=bias, return_lse=True, return_mass=True, mass_q_range=(2, 10),
                         backend="cpp", **shift)
    assert_within_budget(res, q, k, v, rope=ROPE, key_bias=bias, mass_q_range=(2, 10), **shift)
    if kind == "removed":  # removed runs get no mass at all
        assert float(res.mass[..., N:2 * N].abs().max()) == 0.0 and float(res.mass[..., 4 * N:5 * N].abs().max()) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_run_wise_and_per_key_paths_agree(dtype, tol):
    """The same bias through both paths: nudging every other key of one run by 1e-7 leaves the softmax the same
    to rounding but makes the row too fragmented for runs."""
    require_cpp()
    q, k, v = _qkv(dtype, seed=3)
    bias = _bias("recency")
    nudged = bias.clone()
    nudged[N:2 * N:2] += 1e-7
    a = sink_attention(q, k, v, rope=ROPE, key_bias=bias, return_lse=True, backend="cpp")
    b = sink_attention(q, k, v, rope=ROPE, key_bias=nudged, return_lse=True, backend="cpp")
    torch.testing.assert_close(a.out.float(), b.out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(a.lse, b.lse, atol=1e-5, rtol=1e-6)
