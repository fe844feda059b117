"""The C++ pass helpers (cache/prepared.py, csrc/pass_ops.cpp) against the Python executor, their oracle: the same
stream through a cache that uses them and one whose backend lacks them gives the same outputs and the same state,
bit for bit, after every pass, on random and adversarial inputs (ties in Top-C, the reuse cap, empty caches, full
windows, short first blocks, bf16 / fp16, GQA, more than 16 KV heads, frame-wise carried mass, non-contiguous and
bad inputs)."""
import dataclasses

import pytest
import torch
from support import require_cpp, state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.backends import get_backend

pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = {
    "sliding": CachePolicy.sliding(window_frames=8),
    "frame_sink": CachePolicy.frame_sink(window_frames=8, sink_frames=2),
    "deep_sink": CachePolicy.deep_sink(window_frames=8, sink_frames=3),
    "full": CachePolicy.full(),
    "pc_mass": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                        topc_max_reuse=2),
    "pc_mass_cap1": CachePolicy.deep_forcing(window_frames=12, sink_frames=2, budget_frames=9, recent_frames=4,
                                             topc_max_reuse=1),
    "pc_mass_nocap": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                              topc_max_reuse=None),
    "pc_mass_unify": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=5,
                                              unify_topc_rope=True, sink_gap=1),
    "pc_default": CachePolicy.deep_forcing(),
    "pc_framewise": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                             block_frames=1),
    "pc_logits": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                          score="logits"),
}


def _pair(policy, *, B=2, H=2, Hkv=None, D=16, n=2, dtype=torch.float32, **kw):
    """Two caches of one geometry: the C++ pass helpers, and the Python path (a cpp backend without them)."""
    require_cpp()
    rope = RopeSpec.wan(D)

    def make():
        return StreamingKVCache(policy, num_layers=2, batch_size=B, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                                tokens_per_frame=n, rope=rope, dtype=dtype, backend="cpp", **kw)

    fast, slow = make(), make()
    slow.backend_impl = dataclasses.replace(get_backend("cpp"), pass_ops=lambda: None)
    for layer in slow.layers:  # ... and the storage's torch code for a new block's slots
        layer.storage.slot_ops.write_block = None
    return fast, slow


def _inputs(g, B, L, H, Hkv, D, dtype, mode):
    q = torch.randn(B, L, H, D, generator=g)
    k = torch.randn(B, L, Hkv, D, generator=g)
    v = torch.randn(B, L, Hkv, D, generator=g)
    if mode == "ties":  # every key alike and queries at zero: uniform attention, every candidate's score ties
        q.zero_()
        k[:] = k[:, :1, :, :]
    elif mode == "coarse":  # few distinct values: exact ties between some scores only
        q, k = q.round(), (k * 0.5).round()
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _stream(fast, slow, *, blocks=14, passes=5, first=None, mode="random", seed=0):
    """Drive both caches through the same passes; compare every output and the states after every pass."""
    c = fast
    B, H, Hkv, D, n, F = c.batch_size, c.num_heads, c.num_kv_heads, c.head_dim, c.tokens_per_frame, \
        c.policy.block_frames
    g = torch.Generator().manual_seed(seed)
    f0, hits = 0, 0
    for b in range(blocks):
        frames = first if (b == 0 and first) else F
        for _ in range(passes):
            for li in range(c.num_layers):
                q, k, v = _inputs(g, B, frames * n, H, Hkv, D, c.dtype, mode)
                a = fast.layers[li].attend(q, k, v, start_frame=f0)
                p = fast.layers[li]._prepared
                hits += p is not None and p.state is fast.layers[li].state  # the later passes run in C++
                e = slow.layers[li].attend(q, k, v, start_frame=f0)
                assert torch.equal(a, e), (b, li)
            assert state_equal(fast.state_dict(), slow.state_dict()), b
        f0 += frames
    return hits


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_prepared_passes_equal_the_python_path(name):
    fast, slow = _pair(POLICIES[name])
    hits = _stream(fast, slow)
    if name != "pc_logits":  # the logits score runs in Python (the test would not test anything otherwise)
        assert hits > 0
    else:
        assert hits == 0


@pytest.mark.parametrize("mode", ["ties", "coarse"])
@pytest.mark.parametrize("name", ["pc_mass", "pc_mass_cap1", "pc_mass_nocap", "pc_framewise"])
def test_topc_ties_and_reuse_cap(name, mode):
    fast, slow = _pair(POLICIES[name])
    _stream(fast, slow, blocks=16, mode=mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["pc_mass", "deep_sink", "pc_mass_unify"])
def test_half_precision(name, dtype):
    fast, slow = _pair(POLICIES[name], dtype=dtype)
    _stream(fast, slow, blocks=10)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (20, 20), (34, 17), (3, 1)])
def test_heads_gqa_and_many_kv_heads(H, Hkv):
    """GQA, and more than 16 KV heads (the head sum then follows torch's own cascade)."""
    fast, slow = _pair(POLICIES["pc_mass"], B=1, H=H, Hkv=Hkv, D=8, n=3)
    _stream(fast, slow, blocks=9, passes=3)


@pytest.mark.parametrize("name", ["pc_mass", "sliding", "full"])
def test_short_first_block_and_no_finite_check(name):
    fast, slow = _pair(POLICIES[name], check_finite=False)
    _stream(fast, slow, blocks=10, first=1)


def test_head_sum_is_torch_sum():
    require_cpp()
    from deepforcing_kernels import _ext

    mod = _ext.require()
    g = torch.Generator().manual_seed(1)
    for H in (1, 2, 3, 12, 16, 17, 33):
        m = torch.rand(2, H, 37, generator=g) * torch.randint(0, 4, (2, H, 37), generator=g) ** 3
        for start, n in ((0, 37), (5, 20)):
            out = torch.full((2, 40), 0.25)
            mod.head_sum(m, start, n, out, False)
            assert torch.equal(out[:, :n], m[:, :, start:start + n].sum(dim=1)), H
            base = torch.rand(2, 40, generator=g)
            acc = base.clone()
            mod.head_sum(m, start, n, acc, True)
            assert torch.equal(acc[:, :n], base[:, :n] + m[:, :, start:start + n].sum(dim=1)), H


def test_bad_and_strided_inputs_take_the_python_path():
    """An overwrite pass whose inputs do not fit the prepared call raises the Python path's error with the cache
    unchanged, or (strided k / v, which are valid) gives the Python path's result."""
    fast, slow = _pair(POLICIES["pc_mass"])
    _stream(fast, slow, blocks=6)
    layer, ref = fast.layers[0], slow.layers[0]
    f0 = layer.state.block_start
    g = torch.Generator().manual_seed(3)
    q, k, v = _inputs(g, 2, 6, 2, 2, 16, torch.float32, "random")
    before = fast.state_dict()
    for bad, err in (((q, k.double(), v), TypeError), ((q[:, :4], k, v), ValueError)):
        with pytest.raises(err):
            layer.attend(*bad, start_frame=f0)
        assert state_equal(fast.state_dict(), before)
    nan = q.clone()
    nan[1, 2, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.attend(nan, k, v, start_frame=f0)
    assert state_equal(fast.state_dict(), before)
    ks = torch.randn(2, 2, 6, 16, generator=g).transpose(1, 2)  # valid, not contiguous
    qs = torch.randn(2, 2, 6, 16, generator=g).transpose(1, 2)
    assert torch.equal(layer.attend(qs, ks, v, start_frame=f0), ref.attend(qs, ks, v, start_frame=f0))
    assert state_equal(fast.state_dict(), slow.state_dict())


def test_reset_load_and_backend_swap_drop_the_prepared_pass():
    fast, slow = _pair(POLICIES["pc_mass"])
    _stream(fast, slow, blocks=5)
    saved = slow.state_dict()
    fast.reset()
    slow.reset()
    _stream(fast, slow, blocks=3)
    fast.load_state_dict(saved)
    slow.load_state_dict(saved)
    f0 = fast.layers[0].state.block_start
    g = torch.Generator().manual_seed(4)
    for li in range(2):
        q, k, v = _inputs(g, 2, 6, 2, 2, 16, torch.float32, "random")
        assert torch.equal(fast.layers[li].attend(q, k, v, start_frame=f0),
                           slow.layers[li].attend(q, k, v, start_frame=f0))
    assert state_equal(fast.state_dict(), slow.state_dict())
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        raise RuntimeError("backend down")

    fast.backend_impl = dataclasses.replace(get_backend("cpp"), run=failing)
    with pytest.raises(RuntimeError, match="backend down"):
        fast.layers[0].attend(q, k, v, start_frame=f0)
    assert calls
