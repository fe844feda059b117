"""The compiled CPU kernel (csrc/sink_attention_cpu.cpp) against the float64 oracle, by the docs/spec.md section 7 budget.

Every case goes through the public op with ``backend="cpp"`` (validation included) and is judged on out, lse and
mass at once. bf16 runs on both of its paths: the bf16 micro-kernel (when this CPU has one) and the fp32
fallback. Small query blocks are forced in some cases so that tail blocks, several tasks per head and several
mass flushes per KV group all happen at test sizes.
"""
from __future__ import annotations

import time

import pytest
import torch
from support import require_cpp

from deepforcing_kernels import RopeSpec, available_backends, rephase, sink_attention
from deepforcing_kernels.testing import assert_within_budget

WAN64, WAN128 = RopeSpec.wan(64), RopeSpec.wan(128)
LLAMA64, GPTJ64 = RopeSpec.llama(64), RopeSpec.gptj(64)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _needs_cpp():
    require_cpp()


def _C():
    from deepforcing_kernels import _ext

    return _ext.require()


@pytest.fixture
def block_rows():
    """Force the kernel's query rows per task for one test (restored afterwards)."""
    from deepforcing_kernels.cpp import set_block_rows

    yield set_block_rows
    set_block_rows(0)


@pytest.fixture(params=["bf16-gemm", "fp32-fallback"])
def bf16_path(request):
    """Run a bf16 test on each bf16 path; the micro-kernel one is skipped where the CPU has none."""
    c = _C()
    if request.param == "bf16-gemm":
        c.sink_attention_set_bf16_gemm(True)
        if not c.sink_attention_bf16_gemm_active():
            pytest.skip("no bf16 micro-kernel on this CPU")
    else:
        c.sink_attention_set_bf16_gemm(False)
    yield request.param
    c.sink_attention_set_bf16_gemm(True)


@pytest.fixture(params=["micro-kernel", "blas"])
def f32_path(request):
    """Run an fp32 test with oneDNN's fp32 micro-kernel (when available) and with the BLAS sgemm fallback."""
    c = _C()
    c.sink_attention_set_f32_microkernel(request.param == "micro-kernel")
    if request.param == "micro-kernel" and not c.sink_attention_f32_microkernel_active():
        pytest.skip("no fp32 micro-kernel here")
    yield request.param
    c.sink_attention_set_f32_microkernel(None)  # back to the CPU's own choice


def test_automatic_f32_path_follows_the_cpu():
    """By default fp32 takes oneDNN's micro-kernel on AVX-512 CPUs and BLAS sgemm on AVX2-only ones (measured the
    faster of the two on each); True / False force a path and None restores the CPU's choice."""
    import platform

    c = _C()
    if platform.machine() != "x86_64":
        pytest.skip("the choice is measured on x86-64 only")
    with open("/proc/cpuinfo") as f:
        avx512 = " avx512f" in f.read()
    try:
        c.sink_attention_set_f32_microkernel(True)
        works = c.sink_attention_f32_microkernel_active()
        c.sink_attention_set_f32_microkernel(False)
        assert not c.sink_attention_f32_microkernel_active()
    finally:
        c.sink_attention_set_f32_microkernel(None)
    assert c.sink_attention_f32_microkernel_active() == (works and avx512)
    # short query blocks (fewer than 128 rows) keep the micro-kernel on AVX2 too; tall ones follow the CPU
    assert c.sink_attention_f32_microkernel_for(48) == works
    assert c.sink_attention_f32_microkernel_for(384) == (works and avx512)


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, scale=1.0):
    q = (torch.randn(B, Lq, Hq, D) * scale).to(dtype)
    k = (torch.randn(B, Lk, Hkv, D) * scale).to(dtype)
    v = torch.randn(B, Lk, Hkv, D).to(dtype)
    return q, k, v


def _check(q, k, v, **kw):
    """Run the C++ backend with every output asked for and hold it to the budget; returns the result."""
    mass_q_range = kw.pop("mass_q_range", None)
    res = sink_attention(q, k, v, backend="cpp", return_lse=True, return_mass=True, mass_q_range=mass_q_range,
                         **kw)
    B, Lq, Hq, D = q.shape
    assert res.out.dtype == q.dtype and tuple(res.out.shape) == (B, Lq, Hq, D)
    assert res.lse.dtype == torch.float32 and tuple(res.lse.shape) == (B, Hq, Lq)
    assert res.mass.dtype == torch.float32 and tuple(res.mass.shape) == (B, k.shape[2], k.shape[1])
    oracle_kw = dict(kw)
    if mass_q_range is not None:
        oracle_kw["mass_q_range"] = mass_q_range
    assert_within_budget(res, q, k, v, **oracle_kw)
    return res


# ------------------------------------------------------------------------------------------ shapes and GQA
# (B, Lq, Lk, Hq, Hkv, D): odd lengths both ways, Lq > Lk, a single query / key, GQA groups of 3 and 4, B > 1
SHAPES = [
    (1, 37, 101, 4, 4, 64),
    (2, 53, 29, 6, 2, 64),      # Lq > Lk, GQA 3
    (1, 1, 77, 12, 4, 128),     # one query, GQA 3
    (1, 19, 1, 4, 1, 64),       # one key
    (2, 45, 130, 12, 3, 128),   # GQA 4, B > 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_with_sink(shape, dtype, block_rows):
    B, Lq, Lk, Hq, Hkv, D = shape
    block_rows(16)  # tail blocks and several tasks per head even at these sizes
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D, dtype)
    rope = RopeSpec.wan(D)
    _check(q, k, v, rope=rope, sink_len=(Lk + 1) // 2, sink_shift=9)


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=lambda s: "x".join(map(str, s)))
def test_bf16_paths(shape, bf16_path, block_rows):
    B, Lq, Lk, Hq, Hkv, D = shape
    block_rows(16)
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, D, torch.bfloat16)
    _check(q, k, v, rope=RopeSpec.wan(D), sink_len=Lk // 3, sink_shift=-4, mass_q_range=(0, Lq // 2 + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_f32_paths(dtype, f32_path, block_rows):
    """Both fp32 product paths (fp16 inputs ride them too): sink, per-key shifts, GQA, tails, odd lengths."""
    block_rows(16)
    q, k, v = _inputs(2, 37, 1100, 6, 2, 64, dtype)  # Lk > one 512-key chunk, with a tail chunk
    _check(q, k, v, rope=WAN64, sink_len=700, sink_shift=5, mass_q_range=(3, 30))
    _check(q, k, v, rope=LLAMA64, key_shift=torch.randint(-10**6, 10**6, (2, 1100)))


def test_bf16_long_keys(bf16_path):
    """bf16 with Lk across several 512-key chunks and odd (the VNNI pad row of V)."""
    q, k, v = _inputs(1, 40, 1101, 4, 4, 128, torch.bfloat16)
    _check(q, k, v, rope=WAN128, sink_len=640, sink_shift=21)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_not_multiple_of_16(dtype, block_rows):
    """D = 40: the packing transposes run their scalar remainder (channels past the last 16-wide block)."""
    block_rows(8)
    q, k, v = _inputs(1, 21, 83, 4, 2, 40, dtype)
    _check(q, k, v, rope=RopeSpec.gptj(40), sink_len=35, sink_shift=-12)
    _check(q, k, v, rope=RopeSpec.wan(40), key_shift=torch.randint(-10**5, 10**5, (83,)))


def test_automatic_blocks_many_rows():
    """The automatic block choice with Lq spanning several full blocks and a tail."""
    q, k, v = _inputs(1, 300, 257, 4, 2, 64, torch.float32)
    _check(q, k, v, rope=WAN64, sink_len=64, sink_shift=21)


# ------------------------------------------------------------------------------------------ the sink
@pytest.mark.parametrize("sink", ["none", "partial", "all", "zero-shift"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sink_lengths(sink, dtype):
    Lk = 67
    q, k, v = _inputs(1, 23, Lk, 4, 2, 64, dtype)
    sink_len, shift = {"none": (0, 0), "partial": (40, 12), "all": (Lk, -7), "zero-shift": (40, 0)}[sink]
    _check(q, k, v, rope=WAN64, sink_len=sink_len, sink_shift=shift)


@pytest.mark.parametrize("shift", [123_457, -300_001, 10**9 + 7], ids=["1e5", "-3e5", "1e9"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_sink_shift(shift, dtype):
    """fp32 angles fail the budget at |shift| ~ 1e5 (docs/spec.md section 7); fp64 angles pass at any shift."""
    q, k, v = _inputs(1, 31, 70, 4, 4, 128, dtype)
    _check(q, k, v, rope=WAN128, sink_len=50, sink_shift=shift)


@pytest.mark.parametrize("shift", [10**15, -(2**62), 2**63 - 1], ids=["1e15", "-2^62", "2^63-1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_shifts_within_budget(shift, dtype):
    """Any int64 shift: the rotation tables are formed once on the host from the raw float64 angle (as the oracle
    forms it), so the kernel only rotates in fp32. Sink mode and per-key mode; bf16 on both of its paths."""
    q, k, v = _inputs(1, 31, 70, 4, 4, 128, dtype)
    ks = torch.randint(-10**6, 10**6, (70,))
    ks[::3] = shift
    ks[1::7] = -shift
    c = _C()
    try:
        for bf16_gemm in ([True, False] if dtype == torch.bfloat16 else [True]):
            c.sink_attention_set_bf16_gemm(bf16_gemm)
            _check(q, k, v, rope=WAN128, sink_len=50, sink_shift=shift)
            _check(q, k, v, rope=WAN128, key_shift=ks)
    finally:
        c.sink_attention_set_bf16_gemm(True)


@pytest.mark.parametrize("per", ["Lk", "B,Lk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_key_shift(per, dtype, block_rows):
    B, Lk = 2, 61
    block_rows(8)
    q, k, v = _inputs(B, 29, Lk, 6, 3, 64, dtype)
    shape = (Lk,) if per == "Lk" else (B, Lk)
    ks = torch.randint(-200_000, 200_000, shape)
    ks[..., ::5] = 0  # some keys stay
    ks[..., 1] = 3 * 10**8
    _check(q, k, v, rope=WAN64, key_shift=ks)


def test_key_shift_int32_and_overrides_sink():
    q, k, v = _inputs(1, 17, 40, 4, 2, 64, torch.float32)
    ks = torch.randint(-50, 50, (40,), dtype=torch.int32)
    res = _check(q, k, v, rope=WAN64, key_shift=ks, sink_len=10, sink_shift=1000)
    ref = sink_attention(q, k, v, rope=WAN64, key_shift=ks.long(), backend="reference")
    torch.testing.assert_close(res.out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ RoPE layouts
@pytest.mark.parametrize("rope", [WAN64, LLAMA64, GPTJ64], ids=["wan", "llama", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(rope, dtype):
    q, k, v = _inputs(1, 33, 90, 4, 2, 64, dtype)
    _check(q, k, v, rope=rope, sink_len=30, sink_shift=77)
    _check(q, k, v, rope=rope, key_shift=torch.randint(-10**6, 10**6, (90,)))


@pytest.mark.parametrize("rope", [WAN128, LLAMA64, GPTJ64], ids=["wan128", "llama64", "gptj64"])
def test_rephase_hook_matches_reference(rope):
    """The re-phase step alone: the kernel's fp32 keys against the reference rotation done in float64."""
    from deepforcing_kernels.rotation import rotation_tables

    D = rope.head_dim
    k = torch.randn(2, 50, 3, D)
    ks = torch.randint(-10**7, 10**7, (2, 50))
    cos, sin, rot_len = rotation_tables(rope, 0, 0, ks, 2, 50, k.device)
    assert tuple(cos.shape) == (2, 50, rope.temporal_pairs) and rot_len == 50
    got = _C().sink_rephase_keys(k, cos, sin, rot_len, rope.interleaved)
    want = rephase(k.double(), rope, ks)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    cos, sin, rot_len = rotation_tables(rope, 20, 123_456, None, 2, 50, k.device)
    assert tuple(cos.shape) == (rope.temporal_pairs,) and rot_len == 20
    got = _C().sink_rephase_keys(k, cos, sin, rot_len, rope.interleaved)
    want = rephase(k.double(), rope, torch.tensor([123_456] * 20 + [0] * 30))
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    assert torch.equal(got[:, 20:], k[:, 20:])  # resting keys untouched
    empty = torch.empty(0)
    assert torch.equal(_C().sink_rephase_keys(k, empty, empty, 0, rope.interleaved), k)


def test_rephase_hook_applies_tables_exactly():
    """The kernel rotates by the tables it is given, whatever they hold: (re, im) -> (re*c - im*s, re*s + im*c)
    in float32 on the first T pairs, every other channel copied; per-key rows index [b, j]."""
    # the half layout (as RopeSpec.llama): pair t = channels (t, t + 8)
    B, Lk, H, D, T = 2, 5, 3, 16, 3
    k = torch.randn(B, Lk, H, D)
    cos, sin = torch.randn(B, Lk, T), torch.randn(B, Lk, T)
    got = _C().sink_rephase_keys(k, cos, sin, Lk, False)
    want = k.clone()
    re, im = k[..., :T], k[..., 8:8 + T]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    want[..., :T], want[..., 8:8 + T] = re * c - im * s, re * s + im * c
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    got = _C().sink_rephase_keys(k, cos[0, 0], sin[0, 0], 2, True)  # sink mode, interleaved, 2 keys
    want = k.clone()
    re, im = k[:, :2, :, 0:2 * T:2], k[:, :2, :, 1:2 * T:2]
    want[:, :2, :, 0:2 * T:2] = re * cos[0, 0] - im * sin[0, 0]
    want[:, :2, :, 1:2 * T:2] = re * sin[0, 0] + im * cos[0, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[:, 2:], k[:, 2:])


# ------------------------------------------------------------------------------------------ mass
@pytest.mark.parametrize("rng", [(0, 29), (5, 17), (28, 29), (11, 11), (0, 0), (29, 29)],
                         ids=["all", "middle", "last", "empty-mid", "empty-start", "empty-end"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mass_ranges(rng, dtype, block_rows):
    block_rows(8)
    q, k, v = _inputs(2, 29, 45, 6, 2, 64, dtype)
    res = _check(q, k, v, rope=WAN64, sink_len=20, sink_shift=3, mass_q_range=rng)
    # every counted query row hands out probability 1, over the 3 query heads of each group
    total = res.mass.sum(dim=-1)
    torch.testing.assert_close(total, torch.full_like(total, 3.0 * (rng[1] - rng[0])), atol=1e-3, rtol=1e-4)
    if rng[0] == rng[1]:
        assert torch.count_nonzero(res.mass) == 0


def test_mass_only_and_plain_output():
    """The op's return shapes when only some extras are asked for, and agreement with the all-extras call."""
    q, k, v = _inputs(1, 20, 33, 4, 2, 64, torch.float32)
    full = sink_attention(q, k, v, rope=WAN64, sink_len=10, sink_shift=5, return_lse=True, return_mass=True,
                          backend="cpp")
    plain = sink_attention(q, k, v, rope=WAN64, sink_len=10, sink_shift=5, backend="cpp")
    mass_only = sink_attention(q, k, v, rope=WAN64, sink_len=10, sink_shift=5, return_mass=True, backend="cpp")
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, full.out)
    assert mass_only.lse is None and torch.allclose(mass_only.mass, full.mass)


# ------------------------------------------------------------------------------------------ strides, scale
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    B, Lq, Lk, Hq, Hkv, D = 2, 21, 48, 6, 3, 64
    q = torch.randn(B, Hq, Lq, D).to(dtype).transpose(1, 2)          # [B, Lq, Hq, D] view of a BHLD tensor
    kbig = torch.randn(B, 2 * Lk, Hkv, 2 * D).to(dtype)
    k = kbig[:, ::2, :, :D]                                           # strided rows, sliced channels
    v = torch.randn(B, Hkv, Lk, D).to(dtype).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ks = torch.randint(-1000, 1000, (B, 2 * Lk))[:, ::2]              # non-contiguous per-key shifts
    _check(q, k, v, rope=WAN64, key_shift=ks)
    _check(q, k, v, rope=WAN64, sink_len=17, sink_shift=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_scale_and_peaked_scores(dtype):
    """Large logits (a near one-hot softmax) and an explicit scale."""
    q, k, v = _inputs(1, 25, 60, 4, 4, 64, dtype, scale=3.0)
    _check(q, k, v, rope=WAN64, sink_len=12, sink_shift=2, softmax_scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates(dtype, where):
    """A NaN input is not hidden by the vectorised exp / max: the rows that read it come out NaN."""
    q, k, v = _inputs(1, 5, 40, 2, 2, 64, dtype)
    {"q": q, "k": k, "v": v}[where][0, 1, 0, 3] = float("nan")
    res = sink_attention(q, k, v, rope=WAN64, sink_len=8, sink_shift=3, return_lse=True, backend="cpp")
    if where == "q":
        assert torch.isnan(res.out[0, 1, 0]).all() and torch.isnan(res.lse[0, 0, 1])
    else:
        assert torch.isnan(res.out[0, :, 0]).any(dim=-1).all()
    assert torch.isfinite(res.out[0, :, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_identical_run_to_run(dtype, block_rows):
    """Dynamic scheduling must not leak into the numbers: out, lse and mass repeat bit for bit (mass-mode Top-C
    picks and stream resume depend on it), at 1 and 2 threads."""
    block_rows(8)
    q, k, v = _inputs(2, 45, 300, 6, 2, 64, dtype)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            first = sink_attention(q, k, v, rope=WAN64, sink_len=100, sink_shift=7, return_lse=True,
                                   return_mass=True, backend="cpp")
            for _ in range(5):
                again = sink_attention(q, k, v, rope=WAN64, sink_len=100, sink_shift=7, return_lse=True,
                                       return_mass=True, backend="cpp")
                assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(saved)


def test_auto_picks_cpp_for_cpu():
    assert "cpp" in available_backends("cpu")
    q, k, v = _inputs(1, 9, 14, 2, 1, 64, torch.float32)
    auto = sink_attention(q, k, v, rope=WAN64, sink_len=4, sink_shift=3)
    cpp = sink_attention(q, k, v, rope=WAN64, sink_len=4, sink_shift=3, backend="cpp")
    assert torch.equal(auto, cpp)


def test_cpp_entry_checks_its_assumptions():
    """The C++ entry re-checks what it relies on (the Python op validates first; this is the second line)."""
    c = _C()
    q, k, v = _inputs(1, 4, 5, 2, 1, 64, torch.float32)
    e = torch.empty(0)
    cos, sin = torch.ones(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="share one dtype"):
        c.sink_attention_fwd(q, k.double(), v, e, e, 0, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        c.sink_attention_fwd(q, torch.randn(1, 5, 3, 64), torch.randn(1, 5, 3, 64), e, e, 0, True, 0.125, False,
                             0, 4)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        c.sink_attention_fwd(q, k, v, cos.double(), sin.double(), 2, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="shapes differ"):
        c.sink_attention_fwd(q, k, v, cos, torch.zeros(4), 2, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="rot_len must be in"):
        c.sink_attention_fwd(q, k, v, cos, sin, 6, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="rot_len must be 0"):
        c.sink_attention_fwd(q, k, v, e, e, 2, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="rot_len must be Lk"):
        c.sink_attention_fwd(q, k, v, torch.ones(1, 5, 3), torch.zeros(1, 5, 3), 4, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match=r"must have shape \[T\], \[H, T\], \[B, Lk, T\]"):
        c.sink_attention_fwd(q, k, v, torch.ones(1, 5, 1, 1, 3), torch.zeros(1, 5, 1, 1, 3), 5, True, 0.125, False,
                             0, 4)
    with pytest.raises(RuntimeError, match="per-head tables have 5 heads but k has 1 KV heads"):
        c.sink_attention_fwd(q, k, v, torch.ones(5, 3), torch.zeros(5, 3), 5, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="has only 32"):
        c.sink_attention_fwd(q, k, v, torch.ones(33), torch.zeros(33), 2, True, 0.125, False, 0, 4)
    with pytest.raises(RuntimeError, match="mass range"):
        c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, True, 3, 9)
    with pytest.raises(RuntimeError, match="sink_rephase_keys: rot_len"):
        c.sink_rephase_keys(k, cos, sin, 9, True)
    # identity tables rotate nothing: the same output as no tables
    out, lse, _ = c.sink_attention_fwd(q, k, v, cos, sin, 5, True, 0.125, False, 0, 4)
    out0, lse0, _ = c.sink_attention_fwd(q, k, v, e, e, 0, True, 0.125, False, 0, 4)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


# ------------------------------------------------------------------------------------------ torch.library
def _op_args(dtype, key_shift: bool, mass: bool):
    q, k, v = _inputs(1, 13, 24, 4, 2, 64, dtype)
    from deepforcing_kernels.ops import sink_attention_op  # noqa: F401  (defines the op)
    from deepforcing_kernels.rotation import rotation_tables

    ks = torch.randint(-99, 99, (1, 24)) if key_shift else None
    cos, sin, rot_len = rotation_tables(WAN64, 8, 5, ks, 1, 24, q.device)
    return (q, k, v, cos, sin, rot_len, True, 0.125, mass, 2, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key_shift", [False, True], ids=["sink", "key_shift"])
@pytest.mark.parametrize("mass", [False, True], ids=["no-mass", "mass"])
def test_opcheck(dtype, key_shift, mass):
    args = _op_args(dtype, key_shift, mass)  # first: it defines the op that the next line looks up
    torch.library.opcheck(torch.ops.deepforcing.sink_attention.default, args)


def test_torch_compile_fullgraph():
    """The custom op traces into one graph (no break) and gives the eager result."""
    from deepforcing_kernels.backends import get_backend

    q, k, v = _inputs(1, 16, 40, 4, 2, 64, torch.float32)
    run = get_backend("cpp").run

    def f(q, k, v):
        out, lse, mass = run(q, k, v, rope=WAN64, sink_len=10, sink_shift=6, key_shift=None, softmax_scale=0.125,
                             return_lse=True, return_mass=True, mass_q_range=(0, 16))
        return out * 2, lse, mass

    t0 = time.perf_counter()
    try:
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # inductor would add ~40 s of C++ builds
        got = compiled(q, k, v)
    except Exception as e:  # noqa: BLE001 - a missing toolchain piece is a skip, a graph break is not
        if "graph break" in str(e).lower() or "Unsupported" in type(e).__name__:
            raise
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {str(e)[:200]}")
    want = f(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert time.perf_counter() - t0 < 120
