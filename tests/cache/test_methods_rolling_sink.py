"""Rolling Sink (docs/methods.md) against its authors' code: a trace of their self-attention module over 45 blocks
(3 passes each: two denoising, one clean), replayed through this cache pass by pass on every backend."""
import pytest
import torch
from methods_parity import drive, layer_windows, load_trace, reference_output, rope_of, use_backend, window_of
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.schedule import simulate, tape_frames_at

TRACE = load_trace("rolling_sink")
CFG = TRACE["config"]
P = len(CFG["timesteps"])


def _cache(backend="reference", dtype=torch.float32, policy=None):
    policy = policy or CachePolicy.rolling_sink(CFG["window_frames"], frame_tokens=None)
    return StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=CFG["heads"], head_dim=CFG["head_dim"],
                            tokens_per_frame=CFG["tokens_per_frame"], rope=rope_of(TRACE), dtype=dtype,
                            backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_rolling_sink_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    assert CFG["blocks"] >= 40
    cache, n = _cache(backend), CFG["tokens_per_frame"]
    assert cache.backend == backend
    clean, tapes, worst = {}, 0, 0.0
    for i, out in drive(TRACE, cache):
        want = window_of(TRACE, i)
        assert layer_windows(cache.layers[0], n) == want, f"pass {i}: the window differs from the authors'"
        tapes += sum(f != p for f, p in want)
        ref = reference_output(TRACE, i, clean)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"pass {i}: max error {err:.3g} at output scale {scale:.3g}"
        worst = max(worst, err / scale)
        # the authors' own bf16 attention over that window agrees to bf16 precision (the window is theirs)
        assert (TRACE["out_bf16"][i].double() - ref).abs().max().item() <= 2e-2 * scale
        if i % P == P - 1:  # the clean pass: its K/V is what later blocks (and the tape) hold
            f0 = (i // P) * CFG["block_frames"]
            for j in range(CFG["block_frames"]):
                clean[f0 + j] = (TRACE["k"][i][:, j * n:(j + 1) * n], TRACE["v"][i][:, j * n:(j + 1) * n])
    assert tapes > 100  # the tape was exercised (both directions: see the schedule test)
    print(f"rolling_sink {backend}: worst error / output scale {worst:.2e} over {i + 1} passes")


def test_the_schedule_alone_draws_the_authors_windows():
    n = CFG["tokens_per_frame"]
    policy = CachePolicy.rolling_sink(CFG["window_frames"], frame_tokens=None)
    for b, blk in enumerate(simulate(policy, CFG["blocks"] * CFG["block_frames"], n)):
        want = window_of(TRACE, b * P)
        got = list(zip(blk.attended.frames[::n], blk.attended.positions[::n]))
        assert got == want, f"block {b}"


def test_tape_runs_back_and_forth():
    p = CachePolicy.rolling_sink(frame_tokens=None)
    laps = [tape_frames_at(p, r) for r in range(18, 18 + 13 * 3, 3)]
    assert laps[0] == (17, 16, 15) and laps[5] == (2, 1, 0) and laps[6] == (0, 1, 2) and laps[11] == (15, 16, 17)
    assert laps[12] == (17, 16, 15)


def test_frame_tokens_is_the_authors_1560_token_frames():
    p = CachePolicy.rolling_sink()
    assert p.frame_tokens == 1560 and p.for_tokens_per_frame(1560) is p
    q = p.for_tokens_per_frame(780)  # 21 x 1560 tokens = 42 frames of 780, the tape 3 frames shorter
    assert (q.window_frames, q.tape_frames, q.frame_tokens) == (42, 39, None)
    assert (p.for_tokens_per_frame(16).window_frames, p.for_tokens_per_frame(16).tape_frames) == (2047, 2043)
    assert _cache(policy=p).policy.window_frames == 21 * 1560 // CFG["tokens_per_frame"]
    with pytest.raises(ValueError, match="frame_tokens"):
        CachePolicy.rolling_sink(frame_tokens=1).for_tokens_per_frame(16)


@pytest.mark.parametrize("cut", [5, 22, 70, 100])
def test_rolling_sink_resumes_bit_for_bit(cut):
    full = _cache()
    outs = [o for _, o in drive(TRACE, full, 0, 120)]
    a = _cache()
    list(drive(TRACE, a, 0, cut))
    state = a.state_dict()
    b = _cache()
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    for (i, o) in drive(TRACE, b, cut, 120):
        assert torch.equal(o, outs[i]), f"pass {i}"
    assert state_equal(b.state_dict(), full.state_dict())


def test_a_damaged_rolling_sink_state_is_refused():
    a = _cache()
    list(drive(TRACE, a, 0, 90))
    st = a.state_dict()
    lay = st["layers"][0]
    lay["pos"] = lay["pos"].clone()
    lay["pos"][0, 0] += 1
    with pytest.raises(ValueError, match="positions"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    st["layers"][0]["frames"][0, :2] = 40  # a replayed slot from outside the tape
    with pytest.raises(ValueError, match="tape"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    del st["layers"][0]["bank_k"]
    with pytest.raises(ValueError, match="malformed"):
        _cache().load_state_dict(st)


def test_memory_is_flat_over_a_1203_frame_stream():
    n = 1
    cache = StreamingKVCache(CachePolicy.rolling_sink(frame_tokens=None), num_layers=1, batch_size=1, num_heads=1,
                             head_dim=8, tokens_per_frame=n, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, ptr = cache.layers[0], cache.layers[0].storage.k.data_ptr()
    for f0 in range(0, 1203, 3):
        q, k, v = torch.randn(3, 1, 3, 1, 8).unbind(0)
        layer.attend(q, k, v, start_frame=f0)
        assert len(layer) <= 21 * n
    assert layer.storage.k.data_ptr() == ptr and layer.bank.k.shape[1] == 18 * n


def test_rolling_sink_needs_rope():
    with pytest.raises(ValueError, match="rope"):
        StreamingKVCache(CachePolicy.rolling_sink(), num_layers=1, batch_size=1, num_heads=1, head_dim=8,
                         tokens_per_frame=1560, rope=None)


def test_a_rolling_sink_stream_cannot_skip_frames():
    cache = _cache()
    q = torch.zeros(1, 3 * CFG["tokens_per_frame"], CFG["heads"], CFG["head_dim"])
    cache.layers[0].attend(q, q, q, start_frame=0)
    with pytest.raises(ValueError, match="start_frame must be 3"):
        cache.layers[0].attend(q, q, q, start_frame=6)


def test_a_one_frame_first_block_shifts_the_tape_grid():
    """An image as its own first block: the laps count from the first whole block, the tape stays in 0..5."""
    pol = CachePolicy.rolling_sink(9, frame_tokens=None)
    cache = StreamingKVCache(pol, num_layers=1, batch_size=1, num_heads=1, head_dim=8, tokens_per_frame=2,
                             rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, replayed = cache.layers[0], set()
    for f0 in [0] + list(range(1, 1 + 3 * 20, 3)):
        F = 1 if f0 == 0 else 3
        for _ in range(2):
            q, k, v = torch.randn(3, 1, 2 * F, 1, 8).unbind(0)
            layer.attend(q, k, v, start_frame=f0)
        fr, pos = layer.frames()[0, ::2].tolist(), layer.positions()[0, ::2].tolist()
        assert pos == list(range(f0 + F - len(pos), f0 + F))
        replayed |= {f for f, p in zip(fr, pos) if f != p}
        copy = StreamingKVCache(pol, num_layers=1, batch_size=1, num_heads=1, head_dim=8, tokens_per_frame=2,
                                rope=RopeSpec.gptj(8), dtype=torch.float32)
        copy.load_state_dict(cache.state_dict())  # every state of the stream passes the checks
    assert replayed == set(range(6))
