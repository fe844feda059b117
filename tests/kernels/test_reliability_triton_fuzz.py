"""Reliability: a handful of hypothesis examples drive the Triton backend under TRITON_INTERPRET=1 (slow: kept tiny).

Random shapes, GQA groups, sink lengths, shifts (0, negative, > 10^5), per-key shifts, mass ranges (empty
included), dtypes and non-contiguous layouts, each judged by the docs/spec.md section 7 budget. 16 x 16 tiles make tiny
shapes run the multi-tile paths (tail tiles, a sink tile straddling sink_len). The Triton owner's own suite is
tests/kernels/test_triton_attention.py; this adds randomised combinations.
"""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# first, before anything Triton: imports triton and the kernels under the interpreter (see triton_interp)
from triton_interp import gpu_like_bf16_casts, interpreter_rounds_bf16  # noqa: E402,F401

triton = pytest.importorskip("triton")
from test_reliability_op_fuzz import SHIFTS, _make  # noqa: E402

from deepforcing_kernels import RopeSpec, sink_attention  # noqa: E402
from deepforcing_kernels.testing import assert_within_budget  # noqa: E402
from deepforcing_kernels.triton import attention as triton_attention  # noqa: E402
from deepforcing_kernels.triton import mass as triton_mass  # noqa: E402
from deepforcing_kernels.triton.attention import FwdConfig  # noqa: E402

pytestmark = pytest.mark.triton

TINY = FwdConfig(16, 16, 4, 1, BLOCK_N_ROT=16)


@pytest.fixture(autouse=True)
def _interpret_tiny_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_attention._ensure_kernel_mode()  # before patching: a rebuild would drop the patches
    monkeypatch.setattr(triton_attention, "fwd_config", lambda *a: TINY)
    monkeypatch.setattr(triton_mass, "mass_config", lambda *a: FwdConfig(16, 16, 4, 1))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@st.composite
def tiny_cases(draw, dtypes):
    B = draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(1, 20)), draw(st.integers(1, 40))
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([16, 32]))
    dtype = draw(st.sampled_from(dtypes))
    rope = draw(st.sampled_from([RopeSpec.wan(D), RopeSpec.llama(D), RopeSpec.gptj(D)]))
    kw = dict(rope=rope)
    if draw(st.booleans()):
        kw.update(sink_len=draw(st.integers(0, Lk)), sink_shift=draw(SHIFTS))
    else:
        shape = draw(st.sampled_from([(Lk,), (B, Lk)]))
        vals = draw(st.lists(SHIFTS, min_size=shape[-1] * (B if len(shape) == 2 else 1),
                             max_size=shape[-1] * (B if len(shape) == 2 else 1)))
        kw["key_shift"] = torch.tensor(vals, dtype=torch.int64).view(shape)
    m0 = draw(st.integers(0, Lq))
    kw["mass_q_range"] = (m0, draw(st.integers(m0, Lq)))
    if draw(st.booleans()):
        kw["softmax_scale"] = draw(st.sampled_from([0.1, 1.0]))
    layouts = draw(st.lists(st.sampled_from(["contiguous", "heads_major", "strided_dim", "token_slice", "broadcast"]),
                            min_size=3, max_size=3))
    return (B, Lq, Lk, Hkv * group, Hkv, D, dtype, layouts, draw(st.integers(0, 2**31 - 1))), kw


# no shrinking: under the interpreter every example costs ~0.1-1 s, and a failing example is printed as generated
FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(case=tiny_cases([torch.float32, torch.float16]))
def test_fuzz_triton_within_budget(case):
    _fuzz_case(case)


def test_gpu_like_bf16_casts_round_to_nearest(gpu_like_bf16_casts):  # noqa: F811  (the imported fixture)
    """The fixture really makes the interpreter round fp32 to bf16 to nearest even."""
    assert interpreter_rounds_bf16()


@FUZZ
@given(case=tiny_cases([torch.bfloat16]))
def test_fuzz_triton_bf16_within_budget(gpu_like_bf16_casts, case):  # noqa: F811  (the imported fixture)
    _fuzz_case(case)


def _fuzz_case(case):
    (B, Lq, Lk, Hq, Hkv, D, dtype, layouts, seed), kw = case
    gen = torch.Generator().manual_seed(seed)
    q = _make((B, Lq, Hq, D), dtype, layouts[0], gen)
    k = _make((B, Lk, Hkv, D), dtype, layouts[1], gen)
    v = _make((B, Lk, Hkv, D), dtype, layouts[2], gen)
    k0 = k.clone()
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, backend="triton", **kw)
    assert res.out.shape == q.shape and res.out.dtype == dtype
    assert torch.isfinite(res.out.float()).all() and torch.isfinite(res.lse).all()
    m0, m1 = kw["mass_q_range"]
    if m0 == m1:
        assert torch.equal(res.mass, torch.zeros_like(res.mass)), "empty mass range must give zeros"
    assert torch.equal(k, k0), "keys must never be written back"
    assert_within_budget(res, q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_huge_logits_finite(dtype):
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 5, 2, 16, generator=g) * 25).to(dtype)
    k = (torch.randn(1, 19, 2, 16, generator=g) * 25).to(dtype)
    v = torch.randn(1, 19, 2, 16, generator=g).to(dtype)
    kw = dict(rope=RopeSpec.gptj(16), sink_len=6, sink_shift=100_003, softmax_scale=1.0)
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, backend="triton", **kw)
    assert torch.isfinite(res.out.float()).all() and torch.isfinite(res.lse).all() and torch.isfinite(res.mass).all()
    assert res.lse.abs().max() > 1e3
    assert_within_budget(res, q, k, v, **kw)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_triton_nan_input_is_never_hidden(where):
    """As for the CPU backends: no NaN check in the op, but a NaN must reach the outputs that read it."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 21, 2, 16, generator=g), \
        torch.randn(1, 21, 2, 16, generator=g)
    {"q": q, "k": k, "v": v}[where][0, 1, 0, 3] = float("nan")
    out = sink_attention(q, k, v, rope=RopeSpec.wan(16), sink_len=5, sink_shift=40, backend="triton")
    if where == "q":
        assert torch.isnan(out[0, 1, 0]).all() and torch.isfinite(out[0, [0, 2, 3]]).all()
    else:
        assert torch.isnan(out[0, :, 0]).any(dim=-1).all()
    assert torch.isfinite(out[0, :, 1]).all()


# padded key lanes of the last tile score 0, far above a row max of -1e4: exp2 overflows there (never stored)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("logit", [-1e4, 1e4])
def test_triton_equal_huge_logits_give_uniform_softmax(logit):
    B, Lq, Lk, Hq, Hkv, D = 1, 3, 37, 4, 2, 16
    q = torch.zeros(B, Lq, Hq, D)
    q[..., 0] = 100.0 if logit > 0 else -100.0
    k = torch.zeros(B, Lk, Hkv, D)
    k[..., 0] = 100.0
    v = torch.randn(B, Lk, Hkv, D)
    res = sink_attention(q, k, v, softmax_scale=1.0, return_lse=True, return_mass=True, backend="triton")
    assert_within_budget(res, q, k, v, softmax_scale=1.0)
    torch.testing.assert_close(res.mass, torch.full((B, Hkv, Lk), Lq * (Hq // Hkv) / Lk), atol=1e-5, rtol=0)
