"""The commit rule (docs/methods.md) against its authors' code, and on every other policy against a brute force.

The trace (data/commit_rule.pt) is Rolling Sink's self-attention module with the authors' commit-rule patch
(``Dwell-Jing/commit-forcing`` integrations/rolling_sink/commit_rule.patch) run on the inputs of data/rolling_sink.pt
(45 blocks, 3 passes each: two denoising, one clean); it holds the module's bf16 outputs and the window each pass
attended (the clean passes: the real committed frames)."""
import hashlib

import pytest
import torch
from methods_parity import load_trace, reference_output, rope_of, use_backend, window_of
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.presets import make_policy
from deepforcing_kernels.rotation import apply_rope

INPUTS, RULE = load_trace("rolling_sink"), load_trace("commit_rule")
TRACE = dict(INPUTS, out_bf16=RULE["out_bf16"], window=RULE["window"])  # their inputs, the patched module's reads
CFG = INPUTS["config"]
P, F, N_TOK = len(CFG["timesteps"]), CFG["block_frames"], CFG["tokens_per_frame"]


def _cache(policy, backend="reference", dtype=torch.float32, n=N_TOK, heads=CFG["heads"], dim=CFG["head_dim"]):
    return StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=heads, head_dim=dim, tokens_per_frame=n,
                            rope=RopeSpec.wan(dim), dtype=dtype, backend=backend, frame_grid=(1, n))


def _rs(rule=True):
    return CachePolicy.rolling_sink(CFG["window_frames"], frame_tokens=None, commit_rule=rule)


def _drive(cache, start=0, stop=None):
    """The trace's passes through layer 0, each marked clean or not as the model marks it."""
    (h, w), rope, layer = CFG["grid"], rope_of(INPUTS), cache.layers[0]
    for i in range(start, INPUTS["q"].shape[0] if stop is None else stop):
        f0 = (i // P) * F
        q, k, v = (INPUTS[x][i].double() for x in ("q", "k", "v"))
        q = apply_rope(q, rope, frame_offset=f0, grid=(F, h, w)).to(cache.dtype)
        k = apply_rope(k, rope, frame_offset=f0, grid=(F, h, w)).to(cache.dtype)
        cache.mark_pass(clean=i % P == P - 1)
        yield i, layer.attend(q, k, v.to(cache.dtype), start_frame=f0)


def _sha(t):
    return hashlib.sha256(t.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()


def test_the_trace_was_run_on_the_rolling_sink_inputs():
    assert RULE["config"]["inputs_sha256"] == {x: _sha(INPUTS[x]) for x in ("q", "k", "v")}
    assert RULE["config"]["blocks"] == CFG["blocks"] >= 30
    # their counters: every clean pass read the real history; the replays ran from the 8th block on
    assert RULE["config"]["real_commits"] == CFG["blocks"] and RULE["config"]["replays"] == CFG["blocks"] - 7


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_the_commit_rule_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    cache, n = _cache(_rs(), backend), N_TOK
    assert cache.backend == backend and cache.wants_pass_marks
    layer, clean, worst, real_reads = cache.layers[0], {}, 0.0, 0
    for i, out in _drive(cache):
        want = window_of(TRACE, i)
        if i % P == P - 1:  # the clean pass read the shadow: real frames at their own positions
            got = [(f, f) for f in layer.shadow.frames()[0, ::n].tolist()]
            real_reads += any(f != p for f, p in window_of(INPUTS, i))  # ... where the cache held replays
        else:
            got = list(zip(layer.frames()[0, ::n].tolist(), layer.positions()[0, ::n].tolist()))
        assert got == want, f"pass {i}: the window differs from the authors'"
        ref = reference_output(TRACE, i, clean)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"pass {i}: max error {err:.3g} at output scale {scale:.3g}"
        worst = max(worst, err / scale)
        assert (TRACE["out_bf16"][i].double() - ref).abs().max().item() <= 2e-2 * scale  # their bf16, same window
        if i % P == P - 1:
            f0 = (i // P) * F
            for j in range(F):
                clean[f0 + j] = (INPUTS["k"][i][:, j * n:(j + 1) * n], INPUTS["v"][i][:, j * n:(j + 1) * n])
    assert real_reads >= 30  # the rule changed what most clean passes read
    print(f"commit rule on rolling_sink, {backend}: worst error / output scale {worst:.2e} over {i + 1} passes")


def test_rule_on_and_off_agree_until_the_first_replay():
    """Their README: before the first replay both caches hold the same K/V, so the rule changes nothing there. The
    first replay is written after the clean pass of block 7 (frames 21..23); block 8's clean pass is the first to
    read differently. True of their module (the two traces) and of this cache, bit for bit."""
    first = 8 * P + P - 1
    same = [torch.equal(RULE["out_bf16"][i], INPUTS["out_bf16"][i]) for i in range(INPUTS["q"].shape[0])]
    assert all(same[:first]) and not same[first]
    assert all(same[i] for i in range(len(same)) if i % P != P - 1)  # the denoising passes never change
    on = [o for _, o in _drive(_cache(_rs()))]
    off = [o for _, o in _drive(_cache(_rs(None)))]
    ours = [torch.equal(a, b) for a, b in zip(on, off)]
    assert all(ours[:first]) and not ours[first]
    assert all(ours[i] for i in range(len(ours)) if i % P != P - 1)


def test_the_model_gives_the_same_first_nine_blocks_with_the_rule():
    """The README's claim end to end (tiny random Wan DiT): the first 9 blocks are the same with and without the
    rule, the 10th differs (block 8's clean pass wrote other K/V)."""
    from deepforcing_kernels.driver import generate
    from deepforcing_kernels.models import CausalWanModel, WanConfig

    m = CausalWanModel(WanConfig.tiny())
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    txt = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(latent_size=(4, 4), progress=False)
    on = generate(m.eval(), txt, 33, _rs(), 3, **kw).run()
    off = generate(m, txt, 33, _rs(None), 3, **kw).run()
    assert torch.equal(on[:, :27], off[:, :27])
    assert not torch.equal(on[:, 27:30], off[:, 27:30])


TETHER, TETHER_RULE = load_trace("tethercache"), load_trace("commit_rule_tethercache")


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_the_commit_rule_matches_the_authors_tethercache_integration(backend, monkeypatch):
    """Their TetherCache patch: once the 21-frame cache is full (block 6 on), the clean pass reads only the recent
    region (the newest 4 frames, the block included); before, the whole cache. The trace holds their clean passes
    on the inputs of data/tethercache.pt (whose denoising passes, and cache contents, the rule does not change)."""
    use_backend(backend, monkeypatch)
    c = TETHER["config"]
    assert TETHER_RULE["config"]["inputs_sha256"] == {x: _sha(TETHER[x]) for x in ("q", "k", "v")}
    assert TETHER_RULE["config"]["rule_reads"] == c["blocks"] - 6  # their counters: 30 layers x (B - 6) at 30 layers
    assert TETHER_RULE["config"]["frames_read"] == 4 * (c["blocks"] - 6)
    n, Pt, grid = c["tokens_per_frame"], len(c["timesteps"]), tuple(c["grid"])
    pol = CachePolicy.tethercache(c["window_frames"], c["sink_frames"], c["recent_frames"], c["alpha"],
                                  c["score_temperature"], c["tau"], commit_rule=True)
    cache = StreamingKVCache(pol, num_layers=1, batch_size=1, num_heads=c["heads"], head_dim=c["head_dim"],
                             tokens_per_frame=n, rope=rope_of(TETHER), dtype=torch.float32, backend=backend,
                             frame_grid=grid)
    window = TETHER["window"].clone()
    window[Pt - 1::Pt] = TETHER_RULE["window"]
    trace = dict(TETHER, window=window)
    rope, layer, clean, worst = rope_of(TETHER), cache.layers[0], {}, 0.0
    for i in range(TETHER["q"].shape[0]):
        f0, is_clean = (i // Pt) * c["block_frames"], i % Pt == Pt - 1
        q, k, v = (TETHER[x][i].double() for x in ("q", "k", "v"))
        q = apply_rope(q, rope, frame_offset=f0, grid=(c["block_frames"],) + grid).float()
        k = apply_rope(k, rope, frame_offset=f0, grid=(c["block_frames"],) + grid).float()
        cache.mark_pass(clean=is_clean)
        out = layer.attend(q, k, v.float(), start_frame=f0)
        if not is_clean:
            continue
        b = i // Pt
        if b >= 6:  # the rule's read: the shadow's frames are their window's, at their own positions
            assert [(f, f) for f in layer.shadow.frames()[0, ::n].tolist()] == window_of(trace, i), f"block {b}"
        ref = reference_output(trace, i, clean)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"block {b}: max error {err:.3g} at output scale {scale:.3g}"
        assert (TETHER_RULE["out_bf16"][b].double() - ref).abs().max().item() <= 2e-2 * scale
        worst = max(worst, err / scale)
        for j in range(c["block_frames"]):
            clean[f0 + j] = (TETHER["k"][i][:, j * n:(j + 1) * n], TETHER["v"][i][:, j * n:(j + 1) * n])
    print(f"commit rule on tethercache, {backend}: worst error / output scale {worst:.2e} over 45 clean passes")


# ---------------------------------------------------------------------------------------------- every policy
POLICIES = {
    "deep_forcing_mass": CachePolicy.deep_forcing(commit_rule=True),
    "deep_forcing_logits_6": CachePolicy.deep_forcing(score="logits", commit_rule=6),
    "sliding": CachePolicy.sliding(commit_rule=True),
    "longlive": CachePolicy.frame_sink(12, 3, commit_rule=True),
    "deep_sink_9": CachePolicy.deep_sink(commit_rule=9),
    "memrope": CachePolicy.memrope(commit_rule=True),
    "infinity_rope": CachePolicy.infinity_rope(commit_rule=True),
    "tethercache": CachePolicy.tethercache(commit_rule=True),
    "rolling_sink_12": CachePolicy.rolling_sink(frame_tokens=None, commit_rule=12),
    "full_5": CachePolicy.full(commit_rule=5),
    "framewise_deep_forcing": CachePolicy.deep_forcing(block_frames=1, commit_rule=True),
    # the newest N committed frames are the cache's own last ones here: read in place, no copy
    "deep_forcing_logits_4": CachePolicy.deep_forcing(score="logits", commit_rule=4),
    "deep_forcing_mass_4": CachePolicy.deep_forcing(commit_rule=4),
    "longlive_9": CachePolicy.frame_sink(12, 3, commit_rule=9),
    "memrope_7": CachePolicy.memrope(commit_rule=7),
}
IN_CACHE = {"sliding", "tethercache", "full_5", "deep_forcing_logits_4", "deep_forcing_mass_4", "longlive_9",
            "memrope_7"}


def _attention64(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_clean_pass_reads_the_newest_committed_frames(name):
    """Brute force: the clean pass equals float64 attention over the newest N frames committed so far (their
    clean-pass K/V, keys as given, i.e. at their own positions), the block included; every other pass, and
    everything the policy keeps, are bit for bit those of the same policy without the rule."""
    pol = POLICIES[name]
    N, Fb, n = pol.commit_frames, pol.block_frames, 2
    on = _cache(pol, n=n, heads=2, dim=16)
    off = _cache(CachePolicy.from_dict({k: v for k, v in pol.to_dict().items() if k != "commit_rule"}), n=n, heads=2,
                 dim=16)
    assert on.policy.commit_rule is not None and off.policy.commit_rule is None
    assert on.layers[0].shadow.in_cache == (name in IN_CACHE)
    g, committed, ruled = torch.Generator().manual_seed(7), {}, 0
    for b in range(48 // Fb):
        f0 = b * Fb
        for p in range(3):
            q, k, v = torch.randn(3, 1, Fb * n, 2, 16, generator=g).unbind(0)
            clean = p == 2
            for c in (on, off):
                c.mark_pass(clean=clean)
            o_on, o_off = on.layers[0].attend(q, k, v, start_frame=f0), off.layers[0].attend(q, k, v, start_frame=f0)
            if clean:
                for j in range(Fb):
                    committed[f0 + j] = (k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n])
            if not clean or f0 + Fb < pol.commit_from_frames:
                assert torch.equal(o_on, o_off), f"{name}: block {b} pass {p} changed"
            else:
                frames = sorted(committed)[-N:]
                assert on.layers[0].shadow.frames()[0, ::n].tolist() == frames
                ref = _attention64(q, torch.cat([committed[f][0] for f in frames], 1),
                                   torch.cat([committed[f][1] for f in frames], 1))
                err, scale = (o_on.double() - ref).abs().max().item(), ref.abs().max().item()
                assert err <= 1e-5 * scale, f"{name}: block {b}: error {err:.3g}"
                ruled += not torch.equal(o_on, o_off)
            lon, loff = on.layers[0], off.layers[0]
            assert torch.equal(lon.keys(), loff.keys()) and torch.equal(lon.values(), loff.values())
            assert torch.equal(lon.positions(), loff.positions()) and torch.equal(lon.frames(), loff.frames())
    if name != "sliding" and name != "full_5":  # the rule is a no-op on sliding (its window is all real frames)
        assert ruled >= 5, f"{name}: the rule changed only {ruled} clean passes"
    # what the rule adds to the state: the copy of the committed frames, or (read in place) nothing
    extra = set(on.state_dict()["layers"][0]) - set(off.state_dict()["layers"][0])
    assert extra == (set() if name in IN_CACHE else {"commit_k", "commit_v", "commit_frames"})
    b = _cache(pol, n=n, heads=2, dim=16)
    b.load_state_dict(on.state_dict())
    assert state_equal(b.state_dict(), on.state_dict())


def test_commit_frames_follow_the_authors_integrations():
    assert CachePolicy.rolling_sink(commit_rule=True).for_tokens_per_frame(1560).commit_frames == 21
    assert CachePolicy.rolling_sink(commit_rule=True).for_tokens_per_frame(780).commit_frames == 42  # same tokens
    assert CachePolicy.frame_sink(12, 3, commit_rule=True).commit_frames == 12  # LongLive: newest 12
    assert CachePolicy.tethercache(commit_rule=True).commit_frames == 4  # the recent region
    assert CachePolicy.tethercache(commit_rule=True).commit_from_frames == 21  # once the cache is full
    assert CachePolicy.deep_forcing(commit_rule=True).commit_from_frames == 0
    assert CachePolicy.sliding().commit_frames is None


def test_the_option_is_data():
    p = make_policy("rolling_sink", commit_rule=True)
    assert p.commit_rule is True and CachePolicy.from_dict(p.to_dict()) == p
    assert make_policy("deep-forcing", score="logits", commit_rule=6).commit_frames == 6
    assert make_policy("sliding", commit_rule=False) == make_policy("sliding")
    assert "commit_rule" not in CachePolicy.deep_forcing().to_dict()  # states saved before the option still load
    with pytest.raises(ValueError, match="commit_rule=True.*'full' has none"):
        CachePolicy.full(commit_rule=True)
    with pytest.raises(ValueError, match="commit_rule=2 frames must hold"):
        CachePolicy.sliding(commit_rule=2)
    with pytest.raises(TypeError, match="commit_rule"):
        CachePolicy.sliding(commit_rule="yes")


def test_the_clean_pass_must_be_known():
    cache = _cache(_rs())
    q = torch.zeros(1, F * N_TOK, CFG["heads"], CFG["head_dim"])
    with pytest.raises(ValueError, match="commit rule.*clean pass"):
        cache.layers[0].attend(q, q, q, start_frame=0)
    cache.layers[0].attend(q, q, q, start_frame=0, clean=True)


@pytest.mark.parametrize("policy", [_rs(), CachePolicy.deep_forcing(window_frames=21, commit_rule=True)],
                         ids=["rolling_sink", "deep_forcing"])
@pytest.mark.parametrize("cut", [5, 26, 70, 101])
def test_the_rule_resumes_bit_for_bit(policy, cut):
    full = _cache(policy)
    outs = [o for _, o in _drive(full, 0, 120)]
    a = _cache(policy)
    list(_drive(a, 0, cut))
    state = a.state_dict()
    b = _cache(policy)
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    for i, o in _drive(b, cut, 120):
        assert torch.equal(o, outs[i]), f"pass {i}"
    assert state_equal(b.state_dict(), full.state_dict())


def test_a_damaged_shadow_is_refused():
    a = _cache(_rs())
    list(_drive(a, 0, 90))
    good = a.state_dict()

    def damaged(edit):
        st = a.state_dict()
        edit(st["layers"][0])
        return st

    def swap(lay):
        f = lay["commit_frames"]
        f[:, :N_TOK], f[:, N_TOK:2 * N_TOK] = f[:, N_TOK:2 * N_TOK].clone(), f[:, :N_TOK].clone()

    def future(lay):
        lay["commit_frames"][:, -N_TOK:] = 1000

    def nan(lay):
        lay["commit_k"][0, 0, 0, 0] = float("nan")

    def too_long(lay):
        for x in ("commit_k", "commit_v", "commit_frames"):
            lay[x] = torch.cat([lay[x], lay[x][:, :N_TOK]], 1)

    for edit, why in ((swap, "not increasing"), (future, "not increasing"), (nan, "NaN"), (too_long, "at most 21")):
        with pytest.raises(ValueError, match=why):
            _cache(_rs()).load_state_dict(damaged(edit))
    st = a.state_dict()
    del st["layers"][0]["commit_k"]
    with pytest.raises(ValueError, match="malformed"):
        _cache(_rs()).load_state_dict(st)
    with pytest.raises(ValueError, match="policy"):  # a state of the policy without the rule
        _cache(_rs(None)).load_state_dict(good)
    _cache(_rs()).load_state_dict(good)


def test_the_rule_read_in_place_costs_no_memory():
    from deepforcing_kernels.bench.rollout import kv_storage_bytes

    for pol in (CachePolicy.tethercache(commit_rule=True), CachePolicy.sliding(commit_rule=True),
                CachePolicy.deep_forcing(commit_rule=4)):
        plain = CachePolicy.from_dict({k: v for k, v in pol.to_dict().items() if k != "commit_rule"})
        assert kv_storage_bytes(_cache(pol)) == kv_storage_bytes(_cache(plain)), pol.kind
    rs, plain = _cache(_rs()), _cache(_rs(None))  # a copy of 21 frames a layer: the authors' second window
    assert kv_storage_bytes(rs) - kv_storage_bytes(plain) == 2 * 21 * N_TOK * CFG["heads"] * CFG["head_dim"] * 4


def test_memory_is_flat_over_a_1203_frame_stream():
    cache = StreamingKVCache(CachePolicy.deep_forcing(commit_rule=True), num_layers=1, batch_size=1, num_heads=1,
                             head_dim=8, tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer = cache.layers[0]
    ptrs = (layer.storage.k.data_ptr(), layer.shadow.store.k.data_ptr())
    for f0 in range(0, 1203, 3):
        for p in range(2):
            q, k, v = torch.randn(3, 1, 3, 1, 8).unbind(0)
            layer.attend(q, k, v, start_frame=f0, clean=p == 1)
        assert layer.shadow.used == min(f0 + 3, 21)
    assert (layer.storage.k.data_ptr(), layer.shadow.store.k.data_ptr()) == ptrs
    assert layer.shadow.store.k.shape[1] == 21


def test_a_recache_rewrites_the_frames_the_shadow_holds():
    pol = CachePolicy.frame_sink(12, 3, commit_rule=True)
    cache, n = _cache(pol, n=2, heads=2, dim=16), 2
    layer, g = cache.layers[0], torch.Generator().manual_seed(3)
    for f0 in range(0, 24, 3):
        for p in range(2):
            q, k, v = torch.randn(3, 1, 3 * n, 2, 16, generator=g).unbind(0)
            layer.attend(q, k, v, start_frame=f0, clean=p == 1)
    before = layer.shadow.store.k.clone()
    for slot, first, frames in layer.whole_frame_groups():
        q, k, v = torch.randn(3, 1, frames * n, 2, 16, generator=g).unbind(0)
        layer.recompute(q, k, v, slot)
    held = {int(f): layer.storage.k[0, j * n:(j + 1) * n] for j, f in enumerate(layer.frames()[0, ::n].tolist())}
    sh, kept = layer.shadow, 0
    for j, f in enumerate(sh.frames()[0, ::n].tolist()):
        got = sh.store.k[0, j * n:(j + 1) * n]
        if f in held:  # re-committed under the new text, as the cache's copy
            assert torch.equal(got, held[f]) and not torch.equal(got, before[0, j * n:(j + 1) * n])
        else:  # a frame the cache no longer holds keeps its K/V (as Top-C tokens do)
            assert torch.equal(got, before[0, j * n:(j + 1) * n])
            kept += 1
    assert kept == 3  # frames 12..14: in the newest 12, rolled out of the sink + 9 window
