"""MemRoPE (docs/methods.md) against its authors' code: a trace of their self-attention module (EMA compression)
over 42 blocks (2 passes each: one denoising, one clean), replayed through this cache pass by pass on every backend.

The trace holds their inputs, their output (rounded to bf16), the window they attended (per frame slot: the frame
whose K/V it held, or -1 / -2 for the long / short EMA memory, and the position it was rotated at) and their EMA
memories after each block's first pass. This file re-derives windows and memories from the inputs alone, in
float64, following their code's rules, and checks the trace, the cache and the outputs against that."""
import pytest
import torch
from methods_parity import drive, load_trace, rope_of, use_backend
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.rotation import apply_rope, rotate_at_frames
from deepforcing_kernels.schedule import simulate

TRACE = load_trace("memrope")
CFG = TRACE["config"]
P, N, F = len(CFG["timesteps"]), CFG["tokens_per_frame"], CFG["block_frames"]
GRID = tuple(CFG["grid"])


def _policy(**kw):
    return CachePolicy.memrope(CFG["window_frames"], CFG["sink_frames"], tuple(CFG["memory_alphas"]), **kw)


def _cache(backend="reference", dtype=torch.float32, policy=None, batch=1):
    return StreamingKVCache(policy or _policy(), num_layers=1, batch_size=batch, num_heads=CFG["heads"],
                            head_dim=CFG["head_dim"], tokens_per_frame=N, rope=rope_of(TRACE), dtype=dtype,
                            backend=backend, frame_grid=GRID)


def _kv(i, j):
    """Un-rotated K, V (float64, ``[n, H, D]``) of local frame ``j`` of pass ``i``."""
    return tuple(TRACE[x][i][0, j * N:(j + 1) * N].double() for x in ("k", "v"))


def rederive(average_first_roll=False):
    """Their code's cache, re-derived in float64 from the trace's inputs: per pass the window (frame or memory code
    -1-i, position) and the memories ``(k, v)`` ``[M, H, D]`` (un-rotated) it attends."""
    W, S, alphas = CFG["window_frames"], CFG["sink_frames"], CFG["memory_alphas"]
    M = len(alphas)
    slots, clean, mem, out = [], {}, None, []
    for b in range(CFG["blocks"]):
        f0, new = b * F, [b * F + j for j in range(F)]
        if len(slots) + F <= W:
            slots = slots + new
        else:
            e = len(slots) + F - W
            lo = S if (mem is None and average_first_roll) else S + M
            ev = [clean[f] for f in slots[lo:S + M + e]]
            km = torch.cat([k for k, _ in ev]).mean(0)  # over every token of the evicted frames
            vm = torch.cat([v for _, v in ev]).mean(0)
            if mem is None:
                mem = [(km, vm) for _ in alphas]
            else:
                mem = [(a * km + (1 - a) * k, a * vm + (1 - a) * v) for a, (k, v) in zip(alphas, mem)]
            slots = slots[:S] + [-1 - i for i in range(M)] + slots[S + M + e:] + new
        base = f0 + F - len(slots)
        window = [(f, base + s) for s, f in enumerate(slots)]
        for p in range(P):
            out.append((window, mem))
        for j in range(F):
            clean[f0 + j] = _kv(b * P + P - 1, j)
    return out


DERIVED = rederive()


def _their_window(i):
    return [(int(f), int(p)) for f, p in TRACE["window"][i].tolist() if f != -100]


def _our_window(layer):
    fr, pos, kinds = layer.frames()[0, ::N].tolist(), layer.positions()[0, ::N].tolist(), layer.kinds()[::N]
    S = CFG["sink_frames"]
    return [(-1 - (s - S) if k == "memory" else f, p) for s, (f, p, k) in enumerate(zip(fr, pos, kinds))]


def reference_output(i):
    """float64 attention of pass ``i``'s queries (at their absolute frames) over the re-derived window: each slot's
    un-rotated K (its frame's clean pass, this pass for the current block, or a memory) rotated at the slot's
    position (and its tokens' rows and columns), and its V."""
    rope = rope_of(TRACE)
    f0 = (i // P) * F
    window, mem = DERIVED[i]
    ks, vs = [], []
    for f, p in window:
        if f < 0:
            k, v = (x[None].expand(N, -1, -1) for x in mem[-1 - f])
        elif f >= f0:
            k, v = _kv(i, f - f0)
        else:
            k, v = _kv((f // F) * P + P - 1, f % F)
        ks.append(apply_rope(k[None], rope, frame_offset=p, grid=(1,) + GRID))
        vs.append(v[None])
    q = apply_rope(TRACE["q"][i].double(), rope, frame_offset=f0, grid=(F,) + GRID)
    K, V = torch.cat(ks, 1), torch.cat(vs, 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, K) / CFG["head_dim"] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)


def test_the_rederivation_is_their_code():
    """Windows exactly, memories to float32 rounding, outputs to their bf16 rounding: the rules above are what
    their module did (first roll: the memories start from the mean of frames 5..7, frames 3 and 4 dropped)."""
    assert CFG["blocks"] >= 40
    rolls = 0
    for i, (window, mem) in enumerate(DERIVED):
        assert _their_window(i) == window, f"pass {i}"
        if mem is not None and i % P == 0:
            rolls += 1
            b = i // P
            for m, (k, v) in enumerate(mem):
                for got, want in ((TRACE["ema_k"][b, m], k), (TRACE["ema_v"][b, m], v)):
                    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max(), f"block {b} memory {m}"
        ref = reference_output(i)
        err = (TRACE["out_bf16"][i].double() - ref).abs()
        assert bool((err <= 2.0 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all()), f"pass {i}"
    assert rolls == CFG["blocks"] - 4
    first = DERIVED[4 * P][1][0][0]
    want = torch.cat([_kv(b * P + P - 1, j)[0] for b, j in ((1, 2), (2, 0), (2, 1))]).mean(0)  # frames 5, 6, 7
    assert torch.allclose(first, want)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_memrope_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    cache = _cache(backend)
    assert cache.backend == backend
    layer, worst = cache.layers[0], 0.0
    for i, out in drive(TRACE, cache):
        window, mem = DERIVED[i]
        assert _our_window(layer) == _their_window(i), f"pass {i}: the window differs from the authors'"
        if mem is not None:
            k, v = layer.memories()
            for m, (mk, mv) in enumerate(mem):
                assert (k[0, m].double() - mk).abs().max() <= 1e-5 * mk.abs().max(), f"pass {i} memory {m}"
                assert (v[0, m].double() - mv).abs().max() <= 1e-5 * mv.abs().max(), f"pass {i} memory {m}"
        ref = reference_output(i)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"pass {i}: max error {err:.3g} at output scale {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"memrope {backend}: worst error / output scale {worst:.2e} over {i + 1} passes")


def test_memory_slots_are_the_memories_rotated_at_their_positions():
    """What attention sees in the memory slots: the EMA key rotated at the authors' contiguous position and at
    each token's own row and column (the kernel's re-phasing of the stored slot)."""
    cache = _cache()
    list(drive(TRACE, cache, 0, 30 * P + 1))
    layer, S, rope = cache.layers[0], CFG["sink_frames"], rope_of(TRACE)
    k, _ = layer.memories()
    pos = layer.positions()[0, ::N]
    eff = layer.effective_keys()
    for m in range(2):
        x = k[:, m:m + 1].double().expand(1, N, -1, -1)
        want = rotate_at_frames(x, rope, pos[S + m:S + m + 1], GRID)
        assert (eff[:, (S + m) * N:(S + m + 1) * N].double() - want).abs().max() < 1e-5


def test_the_schedule_alone_draws_the_authors_windows():
    for b, blk in enumerate(simulate(_policy(), CFG["blocks"] * F, N)):
        got = [(f if f >= 0 else -1 - (s - CFG["sink_frames"]), p) for s, (f, p) in
               enumerate(zip(blk.attended.frames[::N], blk.attended.positions[::N]))]
        assert got == _their_window(b * P), f"block {b}"


def test_average_first_roll_folds_the_displaced_frames_too():
    cache = _cache(policy=_policy(average_first_roll=True))
    derived = rederive(average_first_roll=True)
    for i, out in drive(TRACE, cache, 0, 6 * P):
        mem = derived[i][1]
        if mem is not None:
            k, _ = cache.layers[0].memories()
            assert (k[0, 0].double() - mem[0][0]).abs().max() <= 1e-5 * mem[0][0].abs().max()
    first = derived[4 * P][1][0][0]
    assert not torch.allclose(first, DERIVED[4 * P][1][0][0])  # the flag changes the memories


@pytest.mark.parametrize("cut", [5, 8, 9, 30, 61])
def test_memrope_resumes_bit_for_bit(cut):
    full = _cache(dtype=torch.bfloat16)
    outs = [o for _, o in drive(TRACE, full, 0, 70)]
    a = _cache(dtype=torch.bfloat16)
    list(drive(TRACE, a, 0, cut))
    state = a.state_dict()
    b = _cache(dtype=torch.bfloat16)
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    for i, o in drive(TRACE, b, cut, 70):
        assert torch.equal(o, outs[i]), f"pass {i}"
    assert state_equal(b.state_dict(), full.state_dict())


def test_a_damaged_memrope_state_is_refused():
    a = _cache()
    list(drive(TRACE, a, 0, 40))
    st = a.state_dict()
    st["layers"][0]["memory_v"] = st["layers"][0]["memory_v"] + 1
    with pytest.raises(ValueError, match="memory"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    st["layers"][0]["frames"][0, 3 * N:4 * N] = 2
    with pytest.raises(ValueError, match="frames"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    del st["layers"][0]["memory_k"]
    with pytest.raises(ValueError, match="malformed"):
        _cache().load_state_dict(st)
    b = _cache()
    list(drive(TRACE, b, 0, 4))  # before the first roll the memories are empty
    st = b.state_dict()
    st["layers"][0]["memory_k"][0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="before the first roll"):
        _cache().load_state_dict(st)
    with pytest.raises(ValueError, match="frame_grid"):  # saved with another grid
        StreamingKVCache(_policy(), num_layers=1, batch_size=1, num_heads=CFG["heads"], head_dim=CFG["head_dim"],
                         tokens_per_frame=N, rope=rope_of(TRACE), frame_grid=(1, N),
                         dtype=torch.float32).load_state_dict(a.state_dict())


def test_memory_is_flat_over_a_1203_frame_stream():
    cache = StreamingKVCache(CachePolicy.memrope(), num_layers=1, batch_size=1, num_heads=1, head_dim=8,
                             tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, ptr = cache.layers[0], cache.layers[0].storage.k.data_ptr()
    for f0 in range(0, 1203, 3):
        q, k, v = torch.randn(3, 1, 3, 1, 8).unbind(0)
        layer.attend(q, k, v, start_frame=f0)
        assert len(layer) <= 12
    assert layer.storage.k.data_ptr() == ptr and layer.storage.capacity == 15
    assert layer.positions()[0].tolist() == list(range(1203 - 12, 1203))


def test_memrope_needs_the_frame_grid_of_a_3d_rope():
    kw = dict(num_layers=1, batch_size=1, num_heads=1, head_dim=16, tokens_per_frame=4, rope=RopeSpec.wan(16))
    with pytest.raises(ValueError, match="frame_grid"):
        StreamingKVCache(CachePolicy.memrope(), **kw)
    with pytest.raises(ValueError, match="frame_grid"):
        StreamingKVCache(CachePolicy.memrope(), frame_grid=(3, 2), **kw)
    StreamingKVCache(CachePolicy.sliding(), **kw)  # other policies do not need it


def test_memrope_policy_checks():
    assert CachePolicy.memrope() == CachePolicy.from_dict(CachePolicy.memrope().to_dict())
    d = CachePolicy.memrope().to_dict()
    d["memory_alphas"] = list(d["memory_alphas"])  # as JSON gives it back
    assert CachePolicy.from_dict(d) == CachePolicy.memrope()
    with pytest.raises(ValueError, match="memory_alphas"):
        CachePolicy.memrope(memory_alphas=())
    with pytest.raises(ValueError, match="memory_alphas"):
        CachePolicy.memrope(memory_alphas=(0.0,))
    with pytest.raises(ValueError, match="window_frames"):
        CachePolicy.memrope(window_frames=7)
    with pytest.raises(ValueError, match="memory_alphas"):
        CachePolicy.sliding().__class__("sliding", window_frames=21, memory_alphas=(0.1,))


def test_a_memrope_stream_cannot_skip_frames():
    cache = _cache()
    q = torch.zeros(1, F * N, CFG["heads"], CFG["head_dim"])
    cache.layers[0].attend(q, q, q, start_frame=0)
    with pytest.raises(ValueError, match="start_frame must be 3"):
        cache.layers[0].attend(q, q, q, start_frame=6)
