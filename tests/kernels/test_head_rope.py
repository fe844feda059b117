"""Per-head temporal RoPE frequencies (``RopeSpec.head_scale``, LoL's multi-head jitter): the production rotation
against the oracle's independent maths, the identity that re-phasing by d equals rotating at p + d (per head),
the op on every CPU backend under the docs/spec.md section 7 budget at scales 0.5-2 and shifts up to 1e12,
per-head tables in the op's schema (opcheck, gradients), and the validation of the scale."""
import pytest
import torch
from support import cpp_available

from deepforcing_kernels import RopeSpec, sink_attention
from deepforcing_kernels.reference import rope as ref_rope
from deepforcing_kernels.rope import head_jitter
from deepforcing_kernels.rotation import apply_rope, rephase, rotation_tables
from deepforcing_kernels.testing import assert_within_budget

BACKENDS = ["reference"] + (["cpp"] if cpp_available() else [])
SCALED = RopeSpec.wan(64).with_head_scale([0.5, 2.0])  # the extremes the tests promise
JITTER = head_jitter(RopeSpec.wan(64), 2, 0.8, seed=1)


def qkv(B=2, Lq=21, Lk=45, Hq=4, Hkv=2, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, D, generator=g).to(dtype) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))


@pytest.mark.parametrize("spec", [SCALED, JITTER, RopeSpec.llama(64).with_head_scale([1.5, 0.75])], ids=str)
def test_production_rotation_matches_the_oracle_per_head(spec):
    x = torch.randn(1, 2 * 3 * 4, 4, 64, dtype=torch.float64)  # 4 query heads over 2 scaled heads (GQA)
    grid = (2, 3, 4) if spec.num_axes == 3 else (24,)
    torch.testing.assert_close(apply_rope(x, spec, frame_offset=17, grid=grid),
                               ref_rope.apply_rope(x, spec, frame_offset=17, grid=grid), atol=1e-12, rtol=0)
    shift = torch.randint(-10 ** 9, 10 ** 9, (1, 24))
    torch.testing.assert_close(rephase(x[:, :, :2], spec, shift), ref_rope.rephase(x[:, :, :2], spec, shift),
                               atol=1e-12, rtol=0)


def test_rephasing_equals_rotating_later_per_head_and_heads_differ():
    x = torch.randn(1, 12, 2, 64, dtype=torch.float64)
    at_5 = apply_rope(x, SCALED, frame_offset=5, grid=(1, 3, 4))
    at_12 = apply_rope(x, SCALED, frame_offset=12, grid=(1, 3, 4))
    torch.testing.assert_close(rephase(at_5, SCALED, 7), at_12, atol=1e-12, rtol=0)
    # head 0 (scale 0.5) at frame 10 equals the unscaled rotation at frame 5; head 1 (scale 2) at frame 20
    plain = RopeSpec.wan(64)
    base = apply_rope(x, SCALED, frame_offset=10, grid=(1, 3, 4))
    torch.testing.assert_close(base[:, :, 0, :44], apply_rope(x, plain, frame_offset=5, grid=(1, 3, 4))[:, :, 0, :44])
    torch.testing.assert_close(base[:, :, 1, :44], apply_rope(x, plain, frame_offset=20, grid=(1, 3, 4))[:, :, 1, :44])
    torch.testing.assert_close(base[..., 44:], apply_rope(x, plain, frame_offset=10, grid=(1, 3, 4))[..., 44:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", [SCALED, JITTER], ids=["0.5-2", "jitter0.8"])
@pytest.mark.parametrize("mode", ["sink", "perkey", "huge"])
def test_per_head_rephasing_within_budget(backend, dtype, spec, mode):
    q, k, v = qkv(dtype=dtype)
    kw = {"sink": dict(sink_len=20, sink_shift=-9),
          "perkey": dict(key_shift=torch.randint(-10 ** 6, 10 ** 6, (2, 45), generator=torch.Generator().manual_seed(3))),
          "huge": dict(sink_len=31, sink_shift=10 ** 12)}[mode]
    bias = torch.randn(45, generator=torch.Generator().manual_seed(9)) if mode == "sink" else None  # with a bias too
    res = sink_attention(q, k, v, rope=spec, return_lse=True, return_mass=True, backend=backend, key_bias=bias, **kw)
    assert_within_budget(res, q, k, v, rope=spec, key_bias=bias, **kw)
    shared = sink_attention(q, k, v, rope=RopeSpec.wan(64), backend=backend, key_bias=bias, **kw)
    assert (shared.float() - res.out.float()).abs().max() > 1e-2  # the heads' own frequencies reach the kernel


def test_tables_are_per_head_only_when_scaled():
    c, s, r = rotation_tables(RopeSpec.wan(64), 10, 3, None, 2, 30, torch.device("cpu"), heads=2)
    assert c.shape == (12,)  # T = 12 temporal pairs at head_dim 64
    c, s, r = rotation_tables(SCALED, 10, 3, None, 2, 30, torch.device("cpu"), heads=2)
    assert c.shape == (2, 12) and c.dtype == torch.float32 and r == 10
    ks = torch.randint(-5, 5, (2, 30))
    c, s, r = rotation_tables(SCALED, 0, 0, ks, 2, 30, torch.device("cpu"), heads=2)
    assert c.shape == (2, 30, 2, 12) and r == 30
    # float32 tables of float64 angles: head 1 (scale 2) at shift 3 is head 0 (scale 0.5) at shift 12
    c12, _, _ = rotation_tables(SCALED, 10, 12, None, 2, 30, torch.device("cpu"), heads=2)
    c3, _, _ = rotation_tables(SCALED, 10, 3, None, 2, 30, torch.device("cpu"), heads=2)
    torch.testing.assert_close(c12[0], c3[1], atol=0, rtol=0)


@pytest.mark.skipif(not cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("key_shift", [False, True], ids=["sink", "perkey"])
def test_opcheck_per_head_tables(key_shift):
    from deepforcing_kernels.ops import sink_attention_op  # noqa: F401  (defines the op)

    q, k, v = qkv(B=1, Lq=13, Lk=24)
    ks = torch.randint(-99, 99, (1, 24)) if key_shift else None
    cos, sin, rot = rotation_tables(SCALED, 8, 5, ks, 1, 24, q.device, heads=2)
    assert cos.dim() == (4 if key_shift else 2)
    torch.library.opcheck(torch.ops.deepforcing.sink_attention.default,
                          (q.requires_grad_(), k, v, cos, sin, rot, True, 0.125, True, 2, 11))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_with_per_head_tables(backend):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Lq=6, Lk=14))
    res = sink_attention(q, k, v, rope=SCALED, sink_len=6, sink_shift=9, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    w_out, w_lse = torch.randn(res.out.shape, generator=g), torch.randn(res.lse.shape, generator=g)
    ((res.out * w_out).sum() + (res.lse * w_lse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    from deepforcing_kernels.testing import oracle

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse, _ = oracle(*leaves, rope=SCALED, sink_len=6, sink_shift=9)
    ((out * w_out.double()).sum() + (lse * w_lse.double()).sum()).backward()
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad.float(), atol=2e-5, rtol=1e-4)


def test_head_scale_validation():
    with pytest.raises(ValueError, match="head_scale"):
        RopeSpec.wan(64).with_head_scale([1.0, 0.0])
    with pytest.raises(ValueError, match="head_scale"):
        RopeSpec.wan(64).with_head_scale([float("nan")])
    with pytest.raises(ValueError, match="head_scale"):
        RopeSpec.wan(64).with_head_scale("fast")
    with pytest.raises(ValueError, match="strength"):
        head_jitter(RopeSpec.wan(64), 4, 2.5)
    assert head_jitter(RopeSpec.wan(64), 4, 0.0) == RopeSpec.wan(64)
    j = head_jitter(RopeSpec.wan(64), 12, 0.8, seed=3)
    assert len(j.head_scale) == 12 and abs(max(j.head_scale) - min(j.head_scale) - 0.8) < 1e-12
    assert j == head_jitter(RopeSpec.wan(64), 12, 0.8, seed=3) != head_jitter(RopeSpec.wan(64), 12, 0.8, seed=4)
    q, k, v = qkv(Hq=3, Hkv=3)
    with pytest.raises(ValueError, match="head_scale has 2 heads but k has 3"):
        sink_attention(q, k, v, rope=SCALED, sink_len=3, sink_shift=2)
    with pytest.raises(ValueError, match="head_scale has 2 heads"):
        apply_rope(torch.randn(1, 12, 3, 64), SCALED, frame_offset=0, grid=(1, 3, 4))
