"""Infinity-RoPE (docs/methods.md) against its authors' code: a trace of their self-attention module over 42 blocks
(3 passes each: two denoising, one clean) with three prompt switches (kv_flush), two of them scene cuts
(rope_cut), replayed through this cache pass by pass on every backend."""
import pytest
import torch
from methods_parity import drive, layer_windows, load_trace, reference_output, rope_of, use_backend
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.presets import make_policy
from deepforcing_kernels.schedule import simulate

TRACE = load_trace("infinity_rope")
CFG = TRACE["config"]
P, F, n = len(CFG["timesteps"]), CFG["block_frames"], CFG["tokens_per_frame"]
SWITCHES = {f: f in CFG["cut_frames"] for f in CFG["switch_frames"]}
# their windows are relative (slot i at i, the queries at q_pos); attention sees only differences, so with the
# queries at their absolute frame f0 each slot sits at f0 + position - q_pos
ABS = dict(TRACE, window=torch.stack([
    torch.where(w[:, :1] >= 0, torch.stack([w[:, 0], (i // P) * F + w[:, 1] - int(TRACE["q_pos"][i])], 1), w)
    for i, w in enumerate(TRACE["window"].long())]))


def _cache(backend="reference", dtype=torch.float32, policy=None):
    policy = policy or CachePolicy.infinity_rope(CFG["window_frames"], CFG["sink_frames"])
    return StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=CFG["heads"], head_dim=CFG["head_dim"],
                            tokens_per_frame=n, rope=rope_of(TRACE), dtype=dtype, backend=backend)


def _run(cache, start=0, stop=None):
    """The trace's passes [start, stop) with the prompt switches before their blocks (the pipeline's kv_flush)."""
    stop = TRACE["q"].shape[0] if stop is None else stop
    cuts = sorted(f // F * P for f in SWITCHES if start <= f // F * P < stop)
    for a, b in zip([start] + cuts, cuts + [stop]):
        if a in cuts:
            cache.switch(scene_cut=SWITCHES[a // P * F])
        yield from drive(TRACE, cache, a, b)


def _want(i):
    return [(int(f), int(p)) for f, p in ABS["window"][i].tolist() if f >= 0]


def test_the_trace_is_the_authors_method():
    w = TRACE["window"].long()
    assert CFG["blocks"] >= 40 and CFG["window_frames"] == 6 and CFG["sink_frames"] == 1
    steady = w[3 * P]  # block 3: sink 0, then frames 7, 8 and the block 9..11, at positions 0..5
    assert steady[:, 0].tolist() == [0, 7, 8, 9, 10, 11] and steady[:, 1].tolist() == list(range(6))
    cut = w[28 * P]  # the cut block: sink + the last 2 frames kept, the block at 45..47
    assert cut[:, 0].tolist() == [0, 82, 83, 84, 85, 86] and cut[:, 1].tolist() == [0, 1, 2, 45, 46, 47]
    assert int(TRACE["q_pos"][28 * P]) == 45 and int(TRACE["q_pos"][3 * P]) == 3


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_infinity_rope_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    cache = _cache(backend)
    assert cache.backend == backend
    clean, worst, cut_passes = {}, 0.0, 0
    for i, out in _run(cache):
        want = _want(i)
        assert layer_windows(cache.layers[0], n) == want, f"pass {i}: the window differs from the authors'"
        cut_passes += cache.layers[0].state.cut
        ref = reference_output(ABS, i, clean)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"pass {i}: max error {err:.3g} at output scale {scale:.3g}"
        worst = max(worst, err / scale)
        # their own bf16 attention over that window agrees to bf16 precision (the positions are theirs)
        assert (TRACE["out_bf16"][i].double() - ref).abs().max().item() <= 2e-2 * scale
        if i % P == P - 1:
            f0 = (i // P) * F
            for j in range(F):
                clean[f0 + j] = (TRACE["k"][i][:, j * n:(j + 1) * n], TRACE["v"][i][:, j * n:(j + 1) * n])
    assert cut_passes == 2 * P
    print(f"infinity_rope {backend}: worst error / output scale {worst:.2e} over {i + 1} passes")


def test_the_schedule_alone_draws_the_authors_windows():
    for b, blk in enumerate(simulate(CachePolicy.infinity_rope(), CFG["blocks"] * F, n, switches=SWITCHES)):
        got = list(zip(blk.attended.frames[::n], blk.attended.positions[::n]))
        assert got == _want(b * P), f"block {b}"


def test_steady_state_is_deep_sink_with_no_gap():
    a, b = CachePolicy.infinity_rope(), CachePolicy.deep_sink(6, 1, 0)
    for x, y in zip(simulate(a, 90, 2), simulate(b, 90, 2)):
        assert x.attended == y.attended


def test_a_frame_wise_flush_keeps_their_query_offset():
    """One frame per block: after kv_flush the window (sink + 2 + the frame) is shorter than 6, and the authors'
    queries stay at 6 - 1 = 5 while slot i sits at i: the block's own key is 2 positions behind its query."""
    p = CachePolicy.infinity_rope(block_frames=1)
    blocks = simulate(p, 20, 1, switches={12: False})
    assert blocks[12].attended.frames == (0, 10, 11, 12)
    assert [x - 12 for x in blocks[12].attended.positions] == [-5, -4, -3, -2]
    assert [x - 15 for x in blocks[15].attended.positions] == [-5, -4, -3, -2, -1, 0]


@pytest.mark.parametrize("cut", [5, 40, 83, 84, 86, 110])
def test_infinity_rope_resumes_bit_for_bit(cut):
    full = _cache()
    outs = [o for _, o in _run(full)]
    a = _cache()
    list(_run(a, 0, cut))
    if cut == 84:  # a state saved between the switch and its block holds the pending cut
        a.switch(scene_cut=True)
    state = a.state_dict()
    b = _cache()
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    runs = _run(b, cut) if cut != 84 else __import__("methods_parity").drive(TRACE, b, cut)
    for i, o in runs:
        assert torch.equal(o, outs[i]), f"pass {i}"
        if cut == 84 and i == 86:
            break
    if cut != 84:
        assert state_equal(b.state_dict(), full.state_dict())


def test_scene_cut_needs_infinity_rope_and_a_bad_state_is_refused():
    c = StreamingKVCache(CachePolicy.deep_sink(), num_layers=1, batch_size=1, num_heads=1, head_dim=8,
                         tokens_per_frame=1, rope=RopeSpec.gptj(8))
    c.switch()  # a plain switch leaves other policies' caches alone
    with pytest.raises(ValueError, match="scene cut"):
        c.switch(scene_cut=True)
    a = _cache()
    list(_run(a, 0, 30))
    st = a.state_dict()
    st["layers"][0]["schedule"]["pending"] = "later"
    with pytest.raises(ValueError, match="pending"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    st["layers"][0]["schedule"]["sink_start"] = 10 ** 6
    with pytest.raises(ValueError, match="sink_start"):
        _cache().load_state_dict(st)


def test_preset_and_bounded_memory():
    assert make_policy("infinity-rope") == CachePolicy.infinity_rope()
    cache = StreamingKVCache(CachePolicy.infinity_rope(), num_layers=1, batch_size=1, num_heads=1, head_dim=8,
                             tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, ptr = cache.layers[0], cache.layers[0].storage.k.data_ptr()
    for f0 in range(0, 1203, 3):
        if f0 % 120 == 60:
            cache.switch(scene_cut=f0 % 240 == 60)
        q, k, v = torch.randn(3, 1, 3, 1, 8).unbind(0)
        layer.attend(q, k, v, start_frame=f0)
        assert len(layer) <= 6 and layer.storage.k.data_ptr() == ptr
