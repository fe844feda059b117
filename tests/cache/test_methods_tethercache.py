"""TetherCache (docs/methods.md) against its authors' code: a trace of their patched self-attention module
(my4f175/TetherCache, GRAB admission + TAME AdaIN at the clean pass) over 45 blocks of 3 passes, replayed through
this cache pass by pass on every backend: the windows (which frame each slot holds, at which position), the edited
K/V of every admitted frame, and the outputs against float64 attention over the window their code attended."""
import pytest
import torch
from methods_parity import block_kv, layer_windows, load_trace, rope_of, use_backend, window_attention, window_of
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.presets import make_policy
from deepforcing_kernels.rotation import apply_rope, rotate_at_frames
from deepforcing_kernels.schedule import simulate

TRACE = load_trace("tethercache")
CFG = TRACE["config"]
P, N, F = len(CFG["timesteps"]), CFG["tokens_per_frame"], CFG["block_frames"]
GRID = tuple(CFG["grid"])


def _policy():
    return CachePolicy.tethercache(CFG["window_frames"], CFG["sink_frames"], CFG["recent_frames"], CFG["alpha"],
                                   CFG["score_temperature"], CFG["tau"])


def _cache(backend="reference", dtype=torch.float32, policy=None):
    return StreamingKVCache(policy or _policy(), num_layers=1, batch_size=1, num_heads=CFG["heads"],
                            head_dim=CFG["head_dim"], tokens_per_frame=N, rope=rope_of(TRACE), dtype=dtype,
                            backend=backend, frame_grid=GRID)


def _drive(cache, start=0, stop=None):
    """Passes ``[start, stop)`` through layer 0: q, k rotated at absolute frames in float64 (as the model does),
    each pass marked clean or not by its timestep (as the model marks it)."""
    rope, layer = rope_of(TRACE), cache.layers[0]
    stop = TRACE["q"].shape[0] if stop is None else stop
    for i in range(start, stop):
        f0 = (i // P) * F
        q, k, v = (TRACE[x][i].double() for x in ("q", "k", "v"))
        q = apply_rope(q, rope, frame_offset=f0, grid=(F,) + GRID).to(cache.dtype)
        k = apply_rope(k, rope, frame_offset=f0, grid=(F,) + GRID).to(cache.dtype)
        cache.mark_pass(clean=CFG["timesteps"][i % P] == 0)
        yield i, layer.attend(q, k, v.to(cache.dtype), start_frame=f0)


def _known_kv(upto_block, clean_pass):
    """Un-rotated K/V of each frame as the authors' cache held it for a pass of block ``upto_block``: the clean
    pass's K/V of earlier blocks, replaced by TAME's edit for admitted frames (edits of this block only from its
    clean pass on)."""
    kv = {}
    for b in range(upto_block):
        i = b * P + P - 1
        for j in range(F):
            kv[b * F + j] = (TRACE["k"][i][:, j * N:(j + 1) * N].float(), TRACE["v"][i][:, j * N:(j + 1) * N].float())
    for b in range(upto_block + (1 if clean_pass else 0)):
        for j, f in enumerate(TRACE["edit_frames"][b].tolist()):
            if f >= 0:
                kv[f] = (TRACE["edit_k"][b, j][None], TRACE["edit_v"][b, j][None])
    return kv


def _reference(i):
    """float64 attention of pass ``i`` over the exact window the authors' code attended (their K/V, each slot's
    key rotated at its position)."""
    kv = _known_kv(i // P, i % P == P - 1)
    kv.update(block_kv(TRACE, i, TRACE["k"][i], TRACE["v"][i]))
    return window_attention(TRACE, i, kv)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_tethercache_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    assert CFG["blocks"] >= 40
    cache = _cache(backend)
    layer = cache.layers[0]
    assert cache.backend == backend
    worst, worst_kv, admitted = 0.0, 0.0, 0
    for i, out in _drive(cache):
        assert layer_windows(layer, N) == window_of(TRACE, i), f"pass {i}: the window differs from the authors'"
        ref = _reference(i)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"pass {i}: max error {err:.3g} at output scale {scale:.3g}"
        worst = max(worst, err / scale)
        # their own bf16 attention over that window agrees to bf16 precision (the window and edits are theirs)
        assert (TRACE["out_bf16"][i].double() - ref).abs().max().item() <= 2e-2 * scale
        if i % P == P - 1:  # the cache's contents: every slot's un-rotated K and V equal the authors'
            kv = _known_kv(i // P + 1, False)
            fr = layer.frames()[0, ::N]
            raw = rotate_at_frames(layer.keys().double(), rope_of(TRACE), fr[None], GRID, inverse=True)
            for s, f in enumerate(fr.tolist()):
                kk, vv = kv[f]
                e = max((raw[:, s * N:(s + 1) * N] - kk.double()).abs().max().item(),
                        (layer.values()[:, s * N:(s + 1) * N].double() - vv.double()).abs().max().item())
                assert e <= 1e-5 * max(1.0, kk.abs().max().item()), f"pass {i}, slot {s} (frame {f}): K/V differ"
                worst_kv = max(worst_kv, e)
            admitted += int((TRACE["edit_frames"][i // P] >= 0).sum())
    assert admitted > 40  # GRAB admitted (and TAME edited) frames all along the stream
    print(f"tethercache {backend}: worst error / output scale {worst:.2e}, worst K/V error {worst_kv:.2e} over "
          f"{i + 1} passes, {admitted} frames admitted")


def test_the_schedule_alone_draws_the_authors_positions():
    for b, blk in enumerate(simulate(_policy(), CFG["blocks"] * F, N)):
        want = window_of(TRACE, b * P)
        got = list(zip(blk.attended.frames[::N], blk.attended.positions[::N]))
        assert [p for _, p in got] == [p for _, p in want], f"block {b}"
        assert [f for (f, _), (g, _) in zip(got, want) if f != g and f != -2] == [], f"block {b}"


@pytest.mark.parametrize("cut", [5, 63, 64, 100])
def test_tethercache_resumes_bit_for_bit(cut):
    """Cut anywhere, including between a roll and its clean pass (frames set aside, waiting for admission)."""
    full = _cache()
    outs = [o for _, o in _drive(full, 0, 120)]
    a = _cache()
    list(_drive(a, 0, cut))
    state = a.state_dict()
    torch.save(state, "/dev/null")
    b = _cache()
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    for i, o in _drive(b, cut, 120):
        assert torch.equal(o, outs[i]), f"pass {i}"
    assert state_equal(b.state_dict(), full.state_dict())


def test_a_damaged_tethercache_state_is_refused():
    a = _cache()
    list(_drive(a, 0, 64))  # block 21, first pass: frames set aside
    st = a.state_dict()
    assert st["layers"][0]["stash_k"].shape[1] == F * N
    st["layers"][0]["stash_frames"] = st["layers"][0]["stash_frames"] + 1
    with pytest.raises(ValueError, match="set-aside"):
        _cache().load_state_dict(st)
    st = a.state_dict()
    del st["layers"][0]["stash_v"]
    with pytest.raises(ValueError, match="malformed"):
        _cache().load_state_dict(st)


def test_the_clean_pass_must_be_known():
    cache = _cache()
    q = torch.zeros(1, F * N, CFG["heads"], CFG["head_dim"])
    with pytest.raises(ValueError, match="clean"):
        cache.layers[0].attend(q, q, q, start_frame=0)
    cache.layers[0].attend(q, q, q, start_frame=0, clean=True)  # an explicit mark works without the cache's


def test_memory_is_flat_over_a_1203_frame_stream():
    cache = StreamingKVCache(CachePolicy.tethercache(), num_layers=1, batch_size=2, num_heads=2, head_dim=8,
                             tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, ptr = cache.layers[0], cache.layers[0].storage.k.data_ptr()
    for f0 in range(0, 1203, 3):
        for clean in (False, True):
            q, k, v = torch.randn(3, 2, 3, 2, 8).unbind(0)
            layer.attend(q, k, v, start_frame=f0, clean=clean)
        assert len(layer) <= 21
    assert layer.storage.k.data_ptr() == ptr and layer.admission.k.shape[1] == 3
    fr = layer.frames()
    assert not torch.equal(fr[0], fr[1])  # each video admits its own memory
    _cache_copy = StreamingKVCache(CachePolicy.tethercache(), num_layers=1, batch_size=2, num_heads=2, head_dim=8,
                                   tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    _cache_copy.load_state_dict(cache.state_dict())


def test_tethercache_policy_defaults_and_checks():
    p = make_policy("tethercache")
    assert (p.window_frames, p.sink_frames, p.tether_frames, p.recent_frames) == (21, 3, 14, 4)
    assert (p.grab_alpha, p.grab_temperature, p.tame_tau) == (0.35, 1.0, 0.35)
    assert CachePolicy.from_dict(p.to_dict()) == p
    for bad in ({"tame_tau": 1.5}, {"grab_alpha": -1}, {"grab_temperature": 0}, {"recent_frames": 2},
                {"sink_frames": 18}):
        with pytest.raises(ValueError):
            CachePolicy.tethercache(**bad)
    with pytest.raises(ValueError, match="frame_grid"):
        StreamingKVCache(p, num_layers=1, batch_size=1, num_heads=1, head_dim=12, tokens_per_frame=4,
                         rope=RopeSpec.wan(12))
