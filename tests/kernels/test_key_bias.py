"""The op's ``key_bias`` (an additive float32 logit bias per key, broadcast over batch and query heads) on the
reference and C++ backends: agreement with the float64 oracle under the docs/spec.md section 7 budget on random
and adversarial biases (rows that remove every key but one, +/-1e4), with and without re-phasing, fp32 / bf16;
the LSE identity the fused call replaces (one call per bias group merged by log-sum-exp); gradients (the bias
included); opcheck; and the registry's feature check. The Triton kernels are held to the same cases in
test_triton_key_bias.py."""
import types

import pytest
import torch
from support import cpp_available

from deepforcing_kernels import RopeSpec, backends, sink_attention
from deepforcing_kernels.attention import normalise_key_bias
from deepforcing_kernels.ops import sink_attention_op  # noqa: F401  (defines torch.ops.deepforcing.sink_attention)
from deepforcing_kernels.rotation import rotation_tables
from deepforcing_kernels.testing import assert_within_budget

ROPE = RopeSpec.wan(64)
CPP = cpp_available()
BACKENDS = ["reference"] + (["cpp"] if CPP else [])
needs_cpp = pytest.mark.skipif(not CPP, reason="C++ extension not built")


def qkv(B=2, Lq=29, Lk=70, Hq=4, Hkv=2, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, D, generator=g).to(dtype) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))


def make_bias(kind: str, B: int, Hq: int, Lk: int, seed: int = 1) -> torch.Tensor:
    """The biases every backend is held to: random (full and broadcast shapes) and adversarial."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(B, Hq, Lk, generator=g) * 3
    if kind == "per-head":
        return torch.randn(Hq, Lk, generator=g)
    if kind == "per-batch":
        return torch.randn(B, 1, Lk, generator=g)
    if kind == "per-key":
        return torch.randn(Lk, generator=g)
    if kind == "one-key":  # every row -inf except one key (a different one per row; the last key for row 0)
        keep = torch.randint(0, Lk, (B, Hq, 1), generator=g)
        keep[0, 0, 0] = Lk - 1
        return torch.full((B, Hq, Lk), float("-inf")).scatter_(2, keep, 0.5)
    if kind == "pm1e4":  # keys pushed to +1e4 or -1e4: the softmax is over the +1e4 keys alone
        return (torch.randint(0, 2, (B, 1, Lk), generator=g).float() * 2 - 1) * 1e4
    if kind == "recency":  # Recency-Forcing-like: 0 on the sink and the newest keys, -4 * dt^gamma between
        frames = torch.arange(Lk) // 7
        d = (frames.max() - frames).float()
        b = -4 * (torch.clamp(d - 1, min=0) / 4).clamp(max=1) ** 0.4
        b[:14] = 0.0
        return b
    raise ValueError(kind)


KINDS = ["random", "per-head", "per-batch", "per-key", "one-key", "pm1e4", "recency"]
SHIFTS = {"none": {}, "sink": dict(sink_len=21, sink_shift=9), "perkey": "perkey"}


def shift_kw(name, B, Lk):
    kw = SHIFTS[name]
    if name == "sink":
        kw = dict(sink_len=min(21, Lk // 2), sink_shift=9)
    if kw == "perkey":
        kw = dict(key_shift=torch.randint(-10 ** 5, 10 ** 5, (B, Lk), generator=torch.Generator().manual_seed(4)))
    return dict(kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", list(SHIFTS))
def test_biased_attention_within_budget(backend, dtype, kind, shift):
    q, k, v = qkv(dtype=dtype)
    B, Lq, Hq, _ = q.shape
    Lk = k.shape[1]
    bias, kw = make_bias(kind, B, Hq, Lk), shift_kw(shift, B, Lk)
    res = sink_attention(q, k, v, rope=ROPE, key_bias=bias, return_lse=True, return_mass=True,
                         mass_q_range=(3, 25), backend=backend, **kw)
    assert res.out.dtype == dtype and res.lse.shape == (B, Hq, Lq) and res.mass.shape == (B, 2, Lk)
    assert_within_budget(res, q, k, v, rope=ROPE, key_bias=bias, mass_q_range=(3, 25), **kw)
    if kind == "one-key":  # exactly the kept key's value, and all the mass on it
        keep = bias.isfinite()
        assert torch.equal(res.mass > 0, keep.view(B, 2, 2, Lk).any(dim=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_changes_lse_by_the_softmax_identity(backend):
    # a constant bias c shifts every logit by c: out unchanged, lse + c; and the bias really reaches the kernel
    q, k, v = qkv(seed=2)
    base = sink_attention(q, k, v, rope=ROPE, return_lse=True, backend=backend)
    c = sink_attention(q, k, v, rope=ROPE, key_bias=torch.full((k.shape[1],), 2.5), return_lse=True,
                       backend=backend)
    torch.testing.assert_close(c.out, base.out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(c.lse, base.lse + 2.5, atol=2e-6, rtol=1e-6)
    other = sink_attention(q, k, v, rope=ROPE, key_bias=make_bias("random", 2, 4, 70), backend=backend)
    assert (other - base.out).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_bias_equals_group_and_merge(backend):
    """One biased call equals the approach it replaces: one unbiased call per group of keys sharing a bias,
    merged by log-sum-exp with the group's bias added to its lse."""
    q, k, v = qkv(B=1, Lk=60, seed=3)
    groups = [(0, 12, 0.0), (12, 40, -1.7), (40, 60, -0.3)]
    bias = torch.cat([torch.full((e - s,), b) for s, e, b in groups])
    fused = sink_attention(q, k, v, key_bias=bias, return_lse=True, backend=backend)
    outs, lses = [], []
    for s, e, b in groups:
        r = sink_attention(q, k[:, s:e], v[:, s:e], return_lse=True, backend=backend)
        outs.append(r.out.float())
        lses.append(r.lse + b)
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # [B, H, Lq]
    w = torch.exp(torch.stack(lses) - lse).permute(0, 1, 3, 2)[..., None]  # [G, B, Lq, H, 1]
    merged = (w * torch.stack(outs)).sum(dim=0)
    torch.testing.assert_close(fused.out, merged, atol=3e-6, rtol=1e-5)
    torch.testing.assert_close(fused.lse, lse, atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", ["sink", "perkey"])
def test_gradients_agree_with_the_oracle(backend, shift):
    """Gradients of q, k, v and of the bias itself (broadcast axes summed) through the op's one autograd rule
    agree with autograd through the float64 reference."""
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Lq=6, Lk=14))
    bias = torch.randn(4, 14, generator=torch.Generator().manual_seed(6)).requires_grad_()
    kw = shift_kw(shift, 1, 14)
    res = sink_attention(q, k, v, rope=ROPE, key_bias=bias, return_lse=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(5)
    w_out, w_lse = torch.randn(res.out.shape, generator=g), torch.randn(res.lse.shape, generator=g)
    ((res.out * w_out).sum() + (res.lse * w_lse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v, bias)]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    from deepforcing_kernels.testing import oracle

    out, lse, _ = oracle(*leaves[:3], rope=ROPE, key_bias=leaves[3], **kw)
    ((out * w_out.double()).sum() + (lse * w_lse.double()).sum()).backward()
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad.float(), atol=2e-5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 24), (1, 1, 24), (2, 1, 24)], ids=str)
@pytest.mark.parametrize("mass", [False, True], ids=["no-mass", "mass"])
def test_opcheck_with_key_bias(dtype, shape, mass):
    q, k, v = qkv(B=shape[0], Lq=13, Lk=24, dtype=dtype)
    cos, sin, rot = rotation_tables(ROPE, 8, 5, None, shape[0], 24, q.device)
    bias = torch.randn(shape).requires_grad_()
    torch.library.opcheck(torch.ops.deepforcing.sink_attention.default,
                          (q, k, v, cos, sin, rot, True, 0.125, mass, 2, 11, bias))


@needs_cpp
def test_cpp_entry_checks_the_bias():
    from deepforcing_kernels import _ext

    c = _ext.require()
    q, k, v = qkv(B=1, Lq=4, Lk=5)
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="key_bias must be a 3-D float32"):
        c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, False, 0, 4, torch.zeros(1, 1, 5).double())
    with pytest.raises(RuntimeError, match=r"key_bias must have shape \[B or 1, Hq or 1, Lk\]"):
        c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, False, 0, 4, torch.zeros(1, 3, 5))
    out0, lse0, _ = c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, False, 0, 4)
    out1, lse1, _ = c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, False, 0, 4, None)
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


def test_normalised_bias_keeps_broadcast_axes():
    b = normalise_key_bias(torch.zeros(7, dtype=torch.bfloat16), 3, 4, 7, torch.device("cpu"))
    assert b.shape == (1, 1, 7) and b.dtype == torch.float32 and b.is_contiguous()
    assert normalise_key_bias(torch.zeros(4, 7), 3, 4, 7, torch.device("cpu")).shape == (1, 4, 7)
    assert normalise_key_bias(torch.zeros(3, 1, 7), 3, 4, 7, torch.device("cpu")).shape == (3, 1, 7)


def test_registry_feature_check(monkeypatch):
    """A backend says whether it takes key_bias: an extension built before the option is refused for biased
    calls only (auto then falls back to the reference), with the reason named."""
    assert all(backends.get_backend(n).takes("key_bias") is None for n in ("reference", "triton"))
    assert backends.get_backend("reference").takes("warp_drive") is not None
    old = types.SimpleNamespace(sink_attention_fwd=None, TABLES_API=True)  # no KEY_BIAS_API
    monkeypatch.setattr(backends._ext, "load", lambda: old)
    assert backends.resolve("cpp", "cpu", 64, torch.float32).name == "cpp"
    with pytest.raises(ValueError, match="no key_bias"):
        backends.resolve("cpp", "cpu", 64, torch.float32, features=("key_bias",))
    with pytest.warns(UserWarning) if not backends._warned_reference else _nothing():
        assert backends.resolve("auto", "cpu", 64, torch.float32, features=("key_bias",)).name == "reference"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_group_and_merge_baseline_is_the_same_attention(backend):
    """The cost figures compare the fused biased call with a correct unfused computation of the same thing."""
    from deepforcing_kernels.bench.ops import group_and_merge, recency_frame_bias

    q, k, v = qkv(B=1, Lq=12, Lk=21 * 4, seed=8)
    fb = recency_frame_bias(21, 3)  # Recency Forcing's reading: a 3-frame sink and the newest 18 frames
    assert fb.unique().numel() == 5 and float(fb[:3].abs().max()) == 0.0 and float(fb[-6:].abs().max()) == 0.0
    kw = dict(rope=ROPE, sink_len=12, sink_shift=12)
    fused = sink_attention(q, k, v, key_bias=fb.repeat_interleave(4), backend=backend, **kw)
    merged = group_and_merge(q, k, v, fb, 4, backend=backend, **kw)
    torch.testing.assert_close(fused, merged, atol=3e-6, rtol=1e-5)
