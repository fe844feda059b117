"""The Triton kernels' ``key_bias`` (forward and mass pass) under TRITON_INTERPRET=1, with the small tiles that
run every multi-tile path: the biases of test_key_bias.py against the float64 oracle, on every re-phasing
variant, fp32 / bf16, including rows where the bias removes every key of the first tiles; and gradients."""
import pytest  # noqa: E402
import torch  # noqa: E402
from test_key_bias import KINDS, make_bias, qkv, shift_kw  # noqa: E402
from triton_interp import gpu_like_bf16_casts, small_tiles  # noqa: F401  (first: imports triton under the interpreter)

from deepforcing_kernels import RopeSpec, sink_attention  # noqa: E402
from deepforcing_kernels.testing import assert_within_budget  # noqa: E402

pytestmark = pytest.mark.triton
ROPE = RopeSpec.wan(64)
CASES = [(kind, "sink") for kind in KINDS] + [(kind, s) for kind in ("random", "one-key", "pm1e4")
                                                 for s in ("none", "perkey")]


@pytest.fixture(autouse=True)
def _interpret_small_tiles(small_tiles):  # noqa: F811  (the imported fixture)
    yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,shift", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_triton_biased_attention_within_budget(kind, shift, dtype):
    q, k, v = qkv(B=2, Lq=21, Lk=45, dtype=dtype)
    B, Lq, Hq, _ = q.shape
    Lk = k.shape[1]
    bias, kw = make_bias(kind, B, Hq, Lk), shift_kw(shift, B, Lk)
    res = sink_attention(q, k, v, rope=ROPE, key_bias=bias, return_lse=True, return_mass=True,
                         mass_q_range=(2, 19), backend="triton", **kw)
    assert_within_budget(res, q, k, v, rope=ROPE, key_bias=bias, mass_q_range=(2, 19), **kw)


def test_triton_bias_removing_the_first_tiles():
    # every key but the last is removed: the first two 32-key tiles see only -inf (the running max must not
    # become NaN) and all the weight lands on key Lk - 1
    q, k, v = qkv(B=1, Lq=9, Lk=70)
    bias = torch.full((70,), float("-inf"))
    bias[69] = 0.0
    res = sink_attention(q, k, v, key_bias=bias, return_lse=True, return_mass=True, backend="triton")
    torch.testing.assert_close(res.out, v[:, 69:70].repeat_interleave(2, dim=2).expand(1, 9, 4, 64), atol=0,
                               rtol=0)
    assert torch.equal(res.mass[..., :69], torch.zeros(1, 2, 69))
    torch.testing.assert_close(res.mass[..., 69], torch.full((1, 2), 18.0))


def test_triton_gradients_with_bias():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Lq=8, Lk=16))
    bias = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
    g = torch.Generator().manual_seed(1)
    res = sink_attention(q, k, v, rope=ROPE, sink_len=6, sink_shift=5, key_bias=bias, return_lse=True,
                         backend="triton")
    w_out, w_lse = torch.randn(res.out.shape, generator=g), torch.randn(res.lse.shape, generator=g)
    ((res.out * w_out).sum() + (res.lse * w_lse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    want = sink_attention(q, k, v, rope=ROPE, sink_len=6, sink_shift=5, key_bias=bias, return_lse=True,
                          backend="reference")
    ((want.out * w_out).sum() + (want.lse * w_lse).sum()).backward()
    for a, t in zip(got, (q, k, v, bias)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["sink", "perkey"])
def test_triton_per_head_tables_within_budget(mode, dtype):
    """Per-KV-head rotation tables (a RopeSpec with head_scale at the extremes 0.5 and 2): the forward and the
    mass pass read each KV head's own rows, with and without a bias."""
    rope = RopeSpec.wan(64).with_head_scale([0.5, 2.0])
    q, k, v = qkv(B=2, Lq=21, Lk=45, dtype=dtype)
    kw = dict(sink_len=20, sink_shift=10 ** 9) if mode == "sink" else \
        dict(key_shift=torch.randint(-10 ** 6, 10 ** 6, (2, 45), generator=torch.Generator().manual_seed(2)))
    for bias in (None, make_bias("random", 2, 4, 45)):
        res = sink_attention(q, k, v, rope=rope, key_bias=bias, return_lse=True, return_mass=True, backend="triton",
                             **kw)
        assert_within_budget(res, q, k, v, rope=rope, key_bias=bias, **kw)
