"""Every bad input to the public op raises the promised error, naming the argument."""
import pytest
import torch

from deepforcing_kernels import RopeSpec, sink_attention

R = RopeSpec.wan(32)


def qkv(B=1, Lq=4, Lk=6, Hq=4, Hkv=2, D=32, dtype=torch.float32):
    return torch.randn(B, Lq, Hq, D, dtype=dtype), torch.randn(B, Lk, Hkv, D, dtype=dtype), \
        torch.randn(B, Lk, Hkv, D, dtype=dtype)


def call(**over):
    q, k, v = over.pop("q", None), over.pop("k", None), over.pop("v", None)
    dq, dk, dv = qkv()
    return sink_attention(q if q is not None else dq, k if k is not None else dk, v if v is not None else dv,
                          backend=over.pop("backend", "reference"), **over)


BAD = [
    # (id, kwargs, exception, words the message must contain)
    ("q not tensor", dict(q=[[1.0]]), TypeError, "q"),
    ("q 3-D", dict(q=torch.randn(4, 4, 32)), ValueError, "q must be 4-D"),
    ("k 5-D", dict(k=torch.randn(1, 6, 2, 32, 1)), ValueError, "k must be 4-D"),
    ("int dtype", dict(q=torch.ones(1, 4, 4, 32, dtype=torch.int32)), TypeError, "q must have dtype"),
    ("float64", dict(q=torch.randn(1, 4, 4, 32, dtype=torch.float64)), TypeError, "q must have dtype"),
    ("mixed dtypes", dict(k=torch.randn(1, 6, 2, 32).half()), TypeError, "dtype"),
    ("k v shapes", dict(v=torch.randn(1, 7, 2, 32)), ValueError, "k and v"),
    ("batch", dict(k=torch.randn(2, 6, 2, 32), v=torch.randn(2, 6, 2, 32)), ValueError, "batch"),
    ("head_dim", dict(k=torch.randn(1, 6, 2, 16), v=torch.randn(1, 6, 2, 16)), ValueError, "head_dim"),
    ("heads not multiple", dict(k=torch.randn(1, 6, 3, 32), v=torch.randn(1, 6, 3, 32)), ValueError, "multiple"),
    ("no keys", dict(k=torch.randn(1, 0, 2, 32), v=torch.randn(1, 0, 2, 32)), ValueError, "Lk"),
    ("rope wrong type", dict(rope="wan"), TypeError, "rope"),
    ("rope head_dim", dict(rope=RopeSpec.wan(64)), ValueError, "rope.head_dim"),
    ("sink_len negative", dict(rope=R, sink_len=-1), ValueError, "sink_len"),
    ("sink_len too long", dict(rope=R, sink_len=7), ValueError, "sink_len"),
    ("sink_len float", dict(rope=R, sink_len=2.0), TypeError, "sink_len"),
    ("sink_len bool", dict(rope=R, sink_len=True), TypeError, "sink_len"),
    ("sink_shift float", dict(rope=R, sink_len=2, sink_shift=1.5), TypeError, "sink_shift"),
    ("shift without rope", dict(sink_len=2, sink_shift=3), ValueError, "rope"),
    ("key_shift float", dict(rope=R, key_shift=torch.zeros(6)), TypeError, "key_shift"),
    ("key_shift shape", dict(rope=R, key_shift=torch.zeros(5, dtype=torch.long)), ValueError, "key_shift"),
    ("key_shift 3-D", dict(rope=R, key_shift=torch.zeros(1, 1, 6, dtype=torch.long)), ValueError, "key_shift"),
    ("key_shift no rope", dict(key_shift=torch.ones(6, dtype=torch.long)), ValueError, "rope"),
    ("key_shift list", dict(rope=R, key_shift=[0] * 6), TypeError, "key_shift"),
    ("scale zero", dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("scale str", dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("return_lse int", dict(return_lse=1), TypeError, "return_lse"),
    ("return_mass str", dict(return_mass="yes"), TypeError, "return_mass"),
    ("mass range without mass", dict(mass_q_range=(0, 2)), ValueError, "return_mass"),
    ("mass range reversed", dict(return_mass=True, mass_q_range=(3, 1)), ValueError, "mass_q_range"),
    ("mass range past end", dict(return_mass=True, mass_q_range=(0, 5)), ValueError, "mass_q_range"),
    ("mass range negative", dict(return_mass=True, mass_q_range=(-1, 2)), ValueError, "mass_q_range"),
    ("mass range not pair", dict(return_mass=True, mass_q_range=(1,)), TypeError, "mass_q_range"),
    ("mass range floats", dict(return_mass=True, mass_q_range=(0.0, 2.0)), TypeError, "mass_q_range"),
    ("key_bias list", dict(key_bias=[0.0] * 6), TypeError, "key_bias"),
    ("key_bias int", dict(key_bias=torch.zeros(6, dtype=torch.long)), TypeError, "key_bias"),
    ("key_bias wrong Lk", dict(key_bias=torch.zeros(5)), ValueError, "key_bias"),
    ("key_bias Lk broadcast", dict(key_bias=torch.zeros(1, 1, 1)), ValueError, "key_bias"),
    ("key_bias heads", dict(key_bias=torch.zeros(3, 6)), ValueError, "key_bias"),
    ("key_bias 4-D", dict(key_bias=torch.zeros(1, 1, 1, 6)), ValueError, "key_bias"),
    ("key_bias nan", dict(key_bias=torch.tensor([0.0, float("nan"), 0, 0, 0, 0])), ValueError, "key_bias"),
    ("key_bias +inf", dict(key_bias=torch.tensor([0.0, float("inf"), 0, 0, 0, 0])), ValueError, "key_bias"),
    ("key_bias all -inf", dict(key_bias=torch.full((4, 6), float("-inf")).index_fill_(0, torch.tensor([0]), 0.0)),
     ValueError, "every key"),
    ("backend unknown", dict(backend="cuda"), ValueError, "backend"),
    ("backend type", dict(backend=3), TypeError, "backend"),
    ("triton on cpu", dict(backend="triton"), (ValueError, RuntimeError), "triton"),
]


@pytest.mark.parametrize("over,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(over, exc, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(exc, match=words):
        call(**over)


def test_mixed_devices_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        sink_attention(q, k.to("meta"), v.to("meta"), backend="reference")


def test_good_input_variants_accepted():
    """The edges of the valid range work: sink_len 0 and Lk, numpy/0-d ints, [B, Lk] key_shift."""
    import numpy as np

    q, k, v = qkv(B=2)
    for kw in (dict(rope=R, sink_len=0, sink_shift=5), dict(rope=R, sink_len=6, sink_shift=-5),
               dict(rope=R, sink_len=np.int64(3), sink_shift=torch.tensor(4)),
               dict(rope=R, key_shift=torch.arange(12, dtype=torch.int32).view(2, 6)),
               dict(key_shift=torch.zeros(6, dtype=torch.long))):
        out = sink_attention(q, k, v, backend="reference", **kw)
        assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from deepforcing_kernels.backends import _cpp_all_finite as all_finite

    x = torch.randn(3, 50, dtype=dtype)
    assert all_finite(x, x.clone())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 17] = bad
        assert not all_finite(x, y)
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")  # inf - inf: NaN, still caught
    assert not all_finite(both)
    huge = torch.full((4, 4), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    assert all_finite(huge)
    # non-contiguous tensors take the torch path (float32 sums, exact check on failure); contiguous CPU ones the
    # C++ scan when it is built: both must agree
    t = torch.randn(6, 8, dtype=dtype).t()
    assert not t.is_contiguous() and all_finite(t)
    t[3, 1] = float("nan")
    assert not all_finite(t) and not all_finite(t.contiguous())
    assert all_finite(huge.t()) and not all_finite(torch.tensor([float("inf")], dtype=dtype).expand(4))
