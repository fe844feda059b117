"""One op, one registry: the registered op's checks, gradients, backend choice, and shifts at the int64 edges."""
import pytest
import torch

from deepforcing_kernels import RopeSpec, sink_attention
from deepforcing_kernels.backends import available_backends, get_backend, resolve
from deepforcing_kernels.ops import sink_attention_op  # noqa: F401  (defines the op)
from deepforcing_kernels.rotation import rotation_tables
from deepforcing_kernels.testing import assert_within_budget

ROPE = RopeSpec.wan(64)
CPP = "cpp" in available_backends("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="C++ extension not built")


def _qkv(B=1, Lq=6, Lk=14, Hq=4, Hkv=2, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, D, generator=g).to(dtype) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))


# ---------------------------------------------------------------------------------------------- the torch op
@needs_cpp
@pytest.mark.parametrize("mode", ["none", "sink", "perkey"])
@pytest.mark.parametrize("mass", [False, True])
def test_opcheck_public_op_on_cpu(mode, mass):
    q, k, v = _qkv()
    ks = torch.randint(-50, 50, (1, 14), generator=torch.Generator().manual_seed(2)) if mode == "perkey" else None
    cos, sin, rot = rotation_tables(ROPE if mode != "none" else None, 5 if mode == "sink" else 0, 7, ks, 1, 14,
                                    q.device)
    torch.library.opcheck(torch.ops.deepforcing.sink_attention.default,
                          (q, k, v, cos, sin, rot, True, 0.125, mass, 1, 5))


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP else []))
@pytest.mark.parametrize("shift", [dict(sink_len=6, sink_shift=9), dict(key_shift="perkey"), dict()])
def test_gradients_agree_with_the_oracle(backend, shift):
    """Every backend differentiates (the op's one autograd rule) and matches autograd through the oracle."""
    if shift.get("key_shift") == "perkey":
        shift = dict(key_shift=torch.randint(-30, 30, (14,), generator=torch.Generator().manual_seed(3)))
    q, k, v = (t.double().float().requires_grad_() for t in _qkv())
    res = sink_attention(q, k, v, rope=ROPE, backend=backend, return_lse=True, **shift)
    g = torch.Generator().manual_seed(5)
    w_out, w_lse = torch.randn(res.out.shape, generator=g), torch.randn(res.lse.shape, generator=g)
    ((res.out * w_out).sum() + (res.lse * w_lse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    # the oracle in float64, differentiated by autograd
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = sink_attention(qd.float(), kd.float(), vd.float(), rope=ROPE, backend="reference", return_lse=True,
                          **shift)
    ((want.out * w_out).sum() + (want.lse * w_lse).sum()).backward()
    for a, b in zip(got, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=1e-4)


@needs_cpp
def test_opcheck_covers_the_autograd_rule():
    q, k, v = (t.requires_grad_() for t in _qkv())
    cos, sin, rot = rotation_tables(ROPE, 5, 3, None, 1, 14, q.device)
    torch.library.opcheck(torch.ops.deepforcing.sink_attention.default,
                          (q, k, v, cos, sin, rot, True, 0.125, False, 0, 6))


# ---------------------------------------------------------------------------------------------- the registry
def test_auto_falls_back_when_a_capability_check_refuses():
    # a CUDA call with head_dim 48 (the tiny model's): Triton cannot take it, so auto picks the next backend
    b = resolve("auto", "cuda", 48, torch.bfloat16)
    assert b.name == "reference"
    assert resolve("auto", "cpu", 48, torch.float32).name == ("cpp" if CPP else "reference")
    with pytest.raises(ValueError, match="backend='triton'.*(head_dim|CUDA)"):
        resolve("triton", "cpu", 48, torch.float32)
    with pytest.raises(ValueError, match="backend='cpp'.*CPU"):
        resolve("cpp", "cuda", 64, torch.float32)
    with pytest.raises(ValueError, match="one of"):
        resolve("bogus", "cpu")


def test_cache_with_an_impossible_backend_fails_at_construction():
    from deepforcing_kernels import CachePolicy, StreamingKVCache

    with pytest.raises(ValueError, match="backend='triton'"):
        StreamingKVCache(CachePolicy.sliding(), num_layers=1, batch_size=1, num_heads=2, head_dim=48,
                         tokens_per_frame=1, rope=RopeSpec.wan(48), dtype=torch.float32, backend="triton")


@needs_cpp
def test_reference_backend_runs_no_cpp(monkeypatch):
    """backend="reference" is pure PyTorch all the way: the cache's host helpers do not touch _C either."""
    from deepforcing_kernels import CachePolicy, StreamingKVCache, _ext

    monkeypatch.setattr(_ext, "require", lambda: (_ for _ in ()).throw(AssertionError("_C was used")))
    cache = StreamingKVCache(CachePolicy.deep_forcing(score="logits"), num_layers=1, batch_size=1, num_heads=2,
                             head_dim=16, tokens_per_frame=1, rope=RopeSpec.wan(16), dtype=torch.float32,
                             backend="reference")
    g = torch.Generator().manual_seed(0)
    for f0 in range(0, 30, 3):
        q, k, v = (torch.randn(1, 3, 2, 16, generator=g) for _ in range(3))
        for _ in range(2):
            cache.layers[0].attend(q, k, v, start_frame=f0)
    assert cache.layers[0].state.compressed


# ---------------------------------------------------------------------------------------------- shifts and scale
@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP else []))
@pytest.mark.parametrize("bad", [2 ** 63, -(2 ** 63) - 1, 10 ** 30])
def test_shifts_outside_int64_are_one_value_error(backend, bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sink_shift"):
        sink_attention(q, k, v, rope=ROPE, sink_len=4, sink_shift=bad, backend=backend)


@needs_cpp
@pytest.mark.parametrize("shift", [10 ** 12, 10 ** 15, -(10 ** 15), 2 ** 62, 2 ** 63 - 1, -(2 ** 63)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_agrees_with_the_oracle_at_any_int64_shift(shift, dtype):
    q, k, v = _qkv(dtype=dtype, seed=4)
    got = sink_attention(q, k, v, rope=ROPE, sink_len=9, sink_shift=shift, backend="cpp", return_lse=True,
                         return_mass=True)
    assert_within_budget(got, q, k, v, rope=ROPE, sink_len=9, sink_shift=shift)


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP else []))
def test_a_scale_that_overflows_the_logits_is_rejected(backend):
    q, k, v = (t * 100 for t in _qkv())
    with pytest.raises(ValueError, match="softmax_scale"):
        sink_attention(q, k, v, softmax_scale=1e36, backend=backend)
    out = sink_attention(q, k, v, softmax_scale=1e-3, backend=backend)  # a large but safe product is fine
    assert torch.isfinite(out).all()


def test_trusted_entry_equals_the_public_op():
    b = get_backend("cpp" if CPP else "reference")
    q, k, v = _qkv(seed=7)
    want = sink_attention(q, k, v, rope=ROPE, sink_len=5, sink_shift=4, return_mass=True, backend=b.name)
    out, lse, mass = b.run(q, k, v, rope=ROPE, sink_len=5, sink_shift=4, key_shift=None, softmax_scale=0.125,
                           return_lse=False, return_mass=True, mass_q_range=(0, 6))
    assert torch.equal(out, want.out) and torch.equal(mass, want.mass) and lse is None



@pytest.mark.parametrize("D", [1, 3, 15])
def test_auto_takes_the_reference_for_a_head_dim_the_cpp_kernel_cannot(D):
    """An odd head_dim under backend="auto" is the reference's call (no error, no "not built" warning, the
    oracle's answer); naming backend="cpp" is one ValueError that says why."""
    import warnings

    from deepforcing_kernels.reference import sink_attention_reference

    q, k, v = _qkv(D=D)
    assert resolve("auto", "cpu", D, torch.float32).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sink_attention(q, k, v)
    want = sink_attention_reference(q, k, v, rope=None, sink_len=0, sink_shift=0, key_shift=None,
                                    softmax_scale=D ** -0.5, return_lse=False, return_mass=False,
                                    mass_q_range=(0, q.shape[1]))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if CPP:
        with pytest.raises(ValueError, match="even head_dim"):
            sink_attention(q, k, v, backend="cpp")
