"""Triton sink attention (forward, LSE, attention mass) under TRITON_INTERPRET=1 on CPU tensors.

Every output is judged by the docs/spec.md section 7 budget against the float64 oracle
(``deepforcing_kernels.testing.assert_within_budget``). Tiles are small (16 / 32) so the multi-tile paths run on
small shapes: a tail key tile, a sink tile straddling ``sink_len``, re-phased tiles narrower than plain ones.
"""
import pytest
import torch

# first, before anything Triton: imports triton and the kernels under the interpreter (see triton_interp)
from triton_interp import gpu_like_bf16_casts, small_tiles  # noqa: E402,F401  (fixtures)

triton = pytest.importorskip("triton")
from deepforcing_kernels import RopeSpec, sink_attention  # noqa: E402
from deepforcing_kernels.testing import assert_within_budget  # noqa: E402
from deepforcing_kernels.triton import attention as triton_attention  # noqa: E402
from deepforcing_kernels.triton import mass as triton_mass  # noqa: E402
from deepforcing_kernels.triton.configs import FwdConfig  # noqa: E402
from deepforcing_kernels.triton.op import sink_attention_triton  # noqa: E402

pytestmark = pytest.mark.triton

# Query tiles 32 (Lq = 37: a full and a tail tile); plain key tiles 32 wide, re-phased ones 16: with Lk = 53 and
# sink_len = 20 this runs a full re-phased tile, one that straddles sink_len, a plain tile and a plain tail tile.
# The mass kernel uses 16 x 16 tiles so its query loop runs more than one tile over the mass range.
SMALL_FWD = FwdConfig(32, 32, 4, 1, BLOCK_N_ROT=16)
SMALL_MASS = FwdConfig(16, 16, 4, 1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REAL_FWD_CONFIG = triton_attention.fwd_config
REAL_MASS_CONFIG = triton_mass.mass_config


@pytest.fixture(autouse=True)
def _interpret_small_tiles(small_tiles):  # noqa: F811  (the imported fixture)
    assert small_tiles == (SMALL_FWD, SMALL_MASS)  # the tiles these tests' shapes were chosen for


def _qkv(B, Lq, Lk, Hq, Hkv, D, dtype, scale=1.0):
    q = (torch.randn(B, Lq, Hq, D) * scale).to(dtype)
    k = (torch.randn(B, Lk, Hkv, D) * scale).to(dtype)
    v = torch.randn(B, Lk, Hkv, D).to(dtype)
    return q, k, v


def _check(q, k, v, *, mass_q_range=None, **kw):
    """Run the triton backend with every output and hold each to the budget; returns the result."""
    k_before = k.clone()
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, mass_q_range=mass_q_range,
                         backend="triton", **kw)
    assert res.out.dtype == q.dtype and res.out.shape == q.shape
    assert res.lse.dtype == torch.float32 and res.lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert res.mass.dtype == torch.float32 and res.mass.shape == (k.shape[0], k.shape[2], k.shape[1])
    assert torch.equal(k, k_before), "the keys must never be written back"
    assert_within_budget(res, q, k, v, mass_q_range=mass_q_range, **kw)
    return res


# ------------------------------------------------------------------------------------------- the budget
# (name, rope factory or None, kwargs builder(B, Lk)). Shapes: B 2, Lq 37, Lk 53, GQA 4 query heads on 2 KV heads.
SCENARIOS = [
    ("plain", None, lambda B, Lk: {}),
    ("wan_sink_straddles", RopeSpec.wan, lambda B, Lk: dict(sink_len=20, sink_shift=3)),
    ("wan_sink_all_keys", RopeSpec.wan, lambda B, Lk: dict(sink_len=Lk, sink_shift=-7)),
    ("wan_sink_len_0", RopeSpec.wan, lambda B, Lk: dict(sink_len=0, sink_shift=0)),
    ("llama_sink_large", RopeSpec.llama, lambda B, Lk: dict(sink_len=40, sink_shift=123457)),
    ("gptj_sink_negative_large", RopeSpec.gptj, lambda B, Lk: dict(sink_len=17, sink_shift=-250001)),
    ("wan_key_shift_1d", RopeSpec.wan,
     lambda B, Lk: dict(key_shift=torch.randint(-200_000, 200_000, (Lk,)))),
    ("llama_key_shift_2d", RopeSpec.llama,
     lambda B, Lk: dict(key_shift=torch.randint(-300_000, 300_000, (B, Lk)))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,rope_fn,kw_fn", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_budget_d64(name, rope_fn, kw_fn, dtype):
    B, Lq, Lk = 2, 37, 53
    q, k, v = _qkv(B, Lq, Lk, 4, 2, 64, dtype)
    rope = rope_fn(64) if rope_fn else None
    _check(q, k, v, rope=rope, mass_q_range=(3, 30), **kw_fn(B, Lk))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_budget_d128_wan_production_layout(dtype):
    # Wan head_dim 128: 22 temporal pairs (44 channels) move, the 42 + 42 spatial channels do not. 12 heads, no GQA.
    B, Lq, Lk = 1, 19, 45
    q, k, v = _qkv(B, Lq, Lk, 12, 12, 128, dtype)
    _check(q, k, v, rope=RopeSpec.wan(128), sink_len=30, sink_shift=100_003)


def test_budget_d128_half_key_shift_fp16():
    B, Lq, Lk = 2, 17, 33
    q, k, v = _qkv(B, Lq, Lk, 2, 1, 128, torch.float16)
    _check(q, k, v, rope=RopeSpec.llama(128), key_shift=torch.randint(-150_000, 150_000, (B, Lk)),
           mass_q_range=(5, 6))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 40), (16, 16), (33, 32), (5, 64)])
def test_odd_and_tile_aligned_lengths(Lq, Lk):
    q, k, v = _qkv(1, Lq, Lk, 2, 2, 64, torch.float32)
    _check(q, k, v, rope=RopeSpec.wan(64), sink_len=min(Lk, 17), sink_shift=11)


def test_large_logits_fp32():
    # Scores of several hundred: the online softmax must rescale without overflow.
    q, k, v = _qkv(1, 20, 50, 2, 1, 64, torch.float32, scale=4.0)
    _check(q, k, v, rope=RopeSpec.gptj(64), sink_len=25, sink_shift=9, softmax_scale=0.5)


def test_non_contiguous_inputs():
    B, Lq, Lk, H, D = 2, 21, 37, 2, 64
    q = torch.randn(B, H, Lq, D).transpose(1, 2)  # [B, Lq, H, D] with a head-major memory layout
    kv = torch.randn(B, Lk, 2, H, 2 * D)
    k, v = kv[:, :, 0, :, :D], kv[:, :, 1, :, D:]  # strided views into one buffer
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, rope=RopeSpec.llama(D), sink_len=10, sink_shift=-5, mass_q_range=(0, 7))


# ------------------------------------------------------------------------------------------- re-phasing
def test_key_shift_1d_equals_sink_form():
    # key_shift = [s] * sink_len + [0] * rest is the sink form: both variants must agree to fp32 rounding.
    q, k, v = _qkv(1, 24, 50, 2, 1, 64, torch.float32)
    rope = RopeSpec.wan(64)
    ks = torch.zeros(50, dtype=torch.int64)
    ks[:21] = 12345
    a = sink_attention(q, k, v, rope=rope, key_shift=ks, return_lse=True, backend="triton")
    b = sink_attention(q, k, v, rope=rope, sink_len=21, sink_shift=12345, return_lse=True, backend="triton")
    torch.testing.assert_close(a.out, b.out, rtol=0, atol=2e-6)
    torch.testing.assert_close(a.lse, b.lse, rtol=0, atol=2e-6)


def test_zero_key_shift_without_rope():
    # Validation lets an all-zero key_shift through without a RopeSpec: nothing moves, no table is needed.
    # (The oracle itself cannot take key_shift without a rope, so compare with the unshifted problem.)
    q, k, v = _qkv(2, 10, 20, 2, 1, 64, torch.float16)
    res = sink_attention(q, k, v, key_shift=torch.zeros(2, 20, dtype=torch.int32), return_lse=True,
                         return_mass=True, backend="triton")
    assert_within_budget(res, q, k, v)


def test_rephasing_changes_the_result():
    # Guard against a kernel that silently ignores the shift: the shifted result must differ from the plain one
    # by far more than the budget.
    q, k, v = _qkv(1, 16, 40, 1, 1, 64, torch.float32)
    rope = RopeSpec.wan(64)
    plain = sink_attention(q, k, v, rope=rope, backend="triton")
    moved = sink_attention(q, k, v, rope=rope, sink_len=40, sink_shift=5, backend="triton")
    assert (plain - moved).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------------------- mass and lse
def test_mass_empty_range_and_deterministic():
    q, k, v = _qkv(1, 30, 45, 4, 2, 64, torch.float16)
    rope = RopeSpec.wan(64)
    empty = sink_attention(q, k, v, rope=rope, sink_len=20, sink_shift=6, return_mass=True, mass_q_range=(7, 7),
                           backend="triton")
    assert torch.count_nonzero(empty.mass) == 0 and empty.lse is None
    a = sink_attention(q, k, v, rope=rope, sink_len=20, sink_shift=6, return_mass=True, backend="triton").mass
    b = sink_attention(q, k, v, rope=rope, sink_len=20, sink_shift=6, return_mass=True, backend="triton").mass
    assert torch.equal(a, b), "mass must be bit-for-bit deterministic (no atomics)"
    # every query row spreads probability 1 over the keys: total = rows x heads per group
    torch.testing.assert_close(a.sum(dim=-1), torch.full((1, 2), 30.0 * 2), rtol=1e-3, atol=0)


def test_lse_only_and_plain_output():
    q, k, v = _qkv(2, 9, 20, 2, 2, 64, torch.float32)
    res = sink_attention(q, k, v, return_lse=True, backend="triton")
    assert res.mass is None
    assert_within_budget(res, q, k, v)
    out = sink_attention(q, k, v, backend="triton")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, res.out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- configuration
def test_config_kwarg_and_replaceable_heuristic(monkeypatch):
    q, k, v = _qkv(1, 40, 70, 2, 1, 64, torch.bfloat16)
    rope = RopeSpec.wan(64)
    kw = dict(rope=rope, sink_len=45, sink_shift=77, key_shift=None, softmax_scale=0.125, return_lse=True,
              return_mass=True, mass_q_range=(0, 40))
    out, lse, mass = sink_attention_triton(q, k, v, config=FwdConfig(32, 64, 4, 1, BLOCK_N_ROT=16),
                                           mass_config=FwdConfig(32, 32, 4, 1), **kw)
    from deepforcing_kernels.attention import SinkAttentionOutput

    kw.pop("key_shift"), kw.pop("return_lse"), kw.pop("return_mass")
    assert_within_budget(SinkAttentionOutput(out, lse, mass), q, k, v, **kw)

    seen = []
    monkeypatch.setattr(triton_attention, "fwd_config",
                        lambda d, dt, arch, mode: seen.append((d, dt, arch, mode)) or SMALL_FWD)
    sink_attention(q, k, v, backend="triton")
    sink_attention(q, k, v, rope=rope, sink_len=3, sink_shift=2, backend="triton")
    sink_attention(q, k, v, rope=rope, key_shift=torch.ones(70, dtype=torch.int64), backend="triton")
    assert seen == [(64, torch.bfloat16, 0, m) for m in ("none", "sink", "perkey")]


def test_production_heuristics_are_sane():
    for arch in (80, 90):
        for dtype in (torch.float16, torch.bfloat16):
            cfg = REAL_FWD_CONFIG(128, dtype, arch)
            rot = cfg.BLOCK_N_ROT or cfg.BLOCK_N
            assert cfg.BLOCK_M % 16 == 0 and cfg.BLOCK_N % 16 == 0 and rot % 16 == 0  # tl.dot needs >= 16
            assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4
            m = REAL_MASS_CONFIG(128, dtype, arch)
            assert m.BLOCK_M % 16 == 0 and m.BLOCK_N % 16 == 0
    assert REAL_FWD_CONFIG(128, torch.bfloat16, 0).BLOCK_M <= 64  # interpreter: small default tiles


def test_production_tiles_under_the_interpreter():
    # The sm_90 launch config itself (128-row query tiles, 64-wide plain and 32-wide re-phased key tiles,
    # 128-key mass tiles) on a shape with tails everywhere.
    q, k, v = _qkv(1, 150, 230, 2, 1, 128, torch.bfloat16)
    kw = dict(rope=RopeSpec.wan(128), sink_len=100, sink_shift=54321, softmax_scale=128 ** -0.5,
              mass_q_range=(10, 140))
    out, lse, mass = sink_attention_triton(q, k, v, key_shift=None, return_lse=True, return_mass=True,
                                           config=REAL_FWD_CONFIG(128, torch.bfloat16, 90),
                                           mass_config=REAL_MASS_CONFIG(128, torch.bfloat16, 90), **kw)
    from deepforcing_kernels.attention import SinkAttentionOutput

    assert_within_budget(SinkAttentionOutput(out, lse, mass), q, k, v, **kw)


def test_bad_head_dim_raises():
    q, k, v = _qkv(1, 4, 4, 1, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        sink_attention(q, k, v, backend="triton")


def test_kernels_rebuild_when_interpret_mode_changes(monkeypatch):
    # Simulate a session that imported the kernels with the interpreter off, then switched it on.
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    triton_attention._ensure_kernel_mode()
    assert not isinstance(triton_attention._fwd_kernel, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _qkv(1, 8, 8, 1, 1, 64, torch.float32)
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, backend="triton")
    assert isinstance(triton_attention._fwd_kernel, InterpretedFunction)
    assert isinstance(triton_mass._mass_kernel, InterpretedFunction)
    assert_within_budget(res, q, k, v)
