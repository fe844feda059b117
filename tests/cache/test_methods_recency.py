"""Recency Forcing (docs/methods.md) against its authors' code: a trace of the commit-forcing integration's reading
(Dwell-Jing/commit-forcing, integrations/recency_forcing/commit_rule.patch: ``--trb on``, commit rule off) over
Self-Forcing's cached self-attention, 40 blocks of 4 denoising passes + the clean pass, replayed through this cache
pass by pass on every backend: the windows (frame and position of every slot read), the bias of every denoising
pass, and the outputs against the authors' and against float64 attention with that bias.

Their merge groups keys by bias value with ``rounded == value`` (a float32 tensor against a float64 rounding); the
frames at chunk distance 4 at step index 2 (bias -3.1776714) match no group, so their code leaves those keys out
of the softmax (``lost`` in the trace). Everywhere else their grouped call and this fused call are the same
softmax; on those passes the test checks that their output is the softmax without the lost frames."""
import pytest
import torch
from methods_parity import block_kv, layer_windows, load_trace, rope_of, use_backend, window_attention, window_of
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache, sink_attention
from deepforcing_kernels.cache.recency import frame_bias
from deepforcing_kernels.presets import make_policy
from deepforcing_kernels.rotation import apply_rope
from deepforcing_kernels.schedule import simulate

TRACE = load_trace("recency_forcing")
CFG = TRACE["config"]
P, N, F, STEPS = len(CFG["timesteps"]), CFG["tokens_per_frame"], CFG["block_frames"], len(CFG["timesteps"]) - 1
GRID = tuple(CFG["grid"])


def _policy(**kw):
    args = dict(window_frames=CFG["sink_frames"] + CFG["recent_frames"], sink_frames=CFG["sink_frames"],
                beta=CFG["beta"], gamma0=CFG["gamma0"], recent_chunks=CFG["recent_chunks"],
                history_chunks=CFG["history_chunks"])
    return CachePolicy.recency_forcing(**dict(args, **kw))


def _cache(backend="reference", dtype=torch.float32, policy=None):
    return StreamingKVCache(policy or _policy(), num_layers=1, batch_size=1, num_heads=CFG["heads"],
                            head_dim=CFG["head_dim"], tokens_per_frame=N, rope=rope_of(TRACE), dtype=dtype,
                            backend=backend)


def _qkv(i):
    """Pass ``i``'s un-rotated q, k, v as the authors' module got them (stored exactly as int8 on a 1/16 grid)."""
    return tuple(TRACE[x][i].double() / CFG["int8_scale"] for x in ("q", "k", "v"))


def _drive(cache, start=0, stop=None):
    """Passes ``[start, stop)`` through layer 0: q, k rotated at absolute frames in float64 (as the model does),
    each pass marked clean or not by its timestep (as the model marks it)."""
    rope, layer = rope_of(TRACE), cache.layers[0]
    stop = TRACE["q"].shape[0] if stop is None else stop
    for i in range(start, stop):
        f0 = (i // P) * F
        q, k, v = _qkv(i)
        q = apply_rope(q, rope, frame_offset=f0, grid=(F,) + GRID).to(cache.dtype)
        k = apply_rope(k, rope, frame_offset=f0, grid=(F,) + GRID).to(cache.dtype)
        cache.mark_pass(clean=CFG["timesteps"][i % P] == 0)
        yield i, layer.attend(q, k, v.to(cache.dtype), start_frame=f0)


def _their_bias(i):
    """float64 per-frame bias of pass ``i`` as their code computed it (None for the unbiased clean pass) and the
    frames their merge left out."""
    if i % P == STEPS:
        return None, None
    L = len(window_of(TRACE, i))
    return TRACE["bias"][i // P, i % P, :L].double(), TRACE["lost"][i // P, i % P, :L]


def _reference(i, drop_lost=False):
    """float64 attention of pass ``i`` over the exact window their code read (each slot's key rotated at its
    position) with their bias; ``drop_lost``: without the frames their merge left out."""
    kv = {}
    for bb in range(i // P):  # earlier blocks: the K/V of their clean pass
        j = bb * P + P - 1
        kv.update(block_kv(TRACE, j, *_qkv(j)[1:]))
    q, k, v = _qkv(i)
    kv.update(block_kv(TRACE, i, k, v))
    bias, lost = _their_bias(i)
    if bias is not None:
        if drop_lost:
            bias = bias.masked_fill(lost, float("-inf"))
        bias = bias.repeat_interleave(N)
    return window_attention(TRACE, i, kv, q=q, key_bias=bias)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_recency_forcing_matches_the_authors_code_pass_by_pass(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    assert CFG["blocks"] >= 40
    cache = _cache(backend)
    layer = cache.layers[0]
    assert cache.backend == backend
    worst = {"exact": 0.0, "theirs": 0.0, "theirs_exact": 0.0, "lost_theirs": 0.0, "lost_gap": float("inf")}
    biased = lost_passes = 0
    for i, out in _drive(cache):
        assert layer_windows(layer, N) == window_of(TRACE, i), f"pass {i}: the window differs from the authors'"
        ref = _reference(i)
        scale = ref.abs().max().item()
        err = (out.double() - ref).abs().max().item() / scale
        assert err <= 1e-5, f"pass {i}: error {err:.3g} (relative) against the exact biased softmax"
        worst["exact"] = max(worst["exact"], err)
        theirs = TRACE["out"][i].double()
        bias, lost = _their_bias(i)
        biased += bias is not None and bool((bias != 0).any())
        if lost is not None and bool(lost.any()):
            lost_passes += 1
            # their output is the softmax without the frames their merge left out ...
            e = (theirs - _reference(i, drop_lost=True)).abs().max().item() / scale
            assert e <= 1e-5, f"pass {i}: their output is not the softmax without the lost frames ({e:.3g})"
            worst["lost_theirs"] = max(worst["lost_theirs"], e)
            # ... and the exact one (ours) visibly differs
            worst["lost_gap"] = min(worst["lost_gap"], (out.double() - theirs).abs().max().item() / scale)
        else:
            e = (out.double() - theirs).abs().max().item() / scale
            assert e <= 1e-5, f"pass {i}: error {e:.3g} (relative) against the authors' output"
            worst["theirs"] = max(worst["theirs"], e)
            # their grouped call + fp32 LSE merge (bias rounded to 6 decimals) against the exact biased softmax
            worst["theirs_exact"] = max(worst["theirs_exact"], (theirs - ref).abs().max().item() / scale)
    assert biased >= 4 * 30 and lost_passes == 35  # step index 2 of every block from the 6th on
    assert worst["lost_gap"] > 1e-3
    print(f"recency_forcing {backend}: {i + 1} passes, {biased} biased; worst relative error vs the exact float64 "
          f"biased softmax {worst['exact']:.2e}, vs their output {worst['theirs']:.2e} (passes where every frame "
          f"found its group; theirs vs the exact softmax there {worst['theirs_exact']:.2e}); on the {lost_passes} passes with lost frames their output is the softmax without them "
          f"to {worst['lost_theirs']:.2e} and differs from the exact one by >= {worst['lost_gap']:.2e}")


def test_the_bias_is_the_authors():
    """The per-frame bias of every denoising pass (float64, rounded to float32 once) against the float32 values
    their temporal_recency_bias computed: equal to float32 rounding."""
    p, worst = _policy(), 0.0
    for i in range(TRACE["q"].shape[0]):
        bias, _ = _their_bias(i)
        if bias is None:
            continue
        ours = frame_bias(p, len(bias), F, i % P, CFG["sink_frames"]).float().double()
        worst = max(worst, (ours - bias).abs().max().item())
        assert torch.equal(ours == 0, bias == 0), f"pass {i}: different frames are biased"
    assert worst <= 1e-6, worst


def test_the_schedule_alone_draws_the_authors_positions():
    for b, blk in enumerate(simulate(_policy(), CFG["blocks"] * F, N)):
        got = list(zip(blk.attended.frames[::N], blk.attended.positions[::N]))
        for p in range(P):  # with the commit rule off every pass of a block reads the same window
            assert got == window_of(TRACE, b * P + p), f"block {b}, pass {p}"


def test_the_clean_pass_and_a_zero_bias_run_as_deep_sink():
    """The clean pass is unbiased and, with beta 0, the policy attends exactly as deep_sink(21, 3, sink_gap=0):
    the bias is the only difference."""
    ds = CachePolicy.deep_sink(CFG["sink_frames"] + CFG["recent_frames"], CFG["sink_frames"], sink_gap=0)
    a, b, c = _cache(policy=_policy(beta=0.0)), _cache(policy=ds), _cache()
    for (i, oa), (_, ob), (_, oc) in zip(_drive(a, 0, 100), _drive(b, 0, 100), _drive(c, 0, 100)):
        assert torch.equal(oa, ob), f"pass {i}"
        if i % P == STEPS or i < 3 * P:  # clean passes, and blocks with only the sink behind the recent chunk
            assert torch.equal(oc, ob), f"pass {i}"
        else:
            assert not torch.equal(oc, ob), f"pass {i}"


@pytest.mark.parametrize("jitter", [0.0, 0.5])
def test_the_fused_bias_matches_a_brute_force_layer_with_batch_gqa_and_bf16(jitter):
    """Batch 2, 4 query heads over 2 KV heads, 3 tokens a frame, a bf16 cache (with and without head jitter): every
    pass of 14 blocks equals the op's reference over the layer's keys with the bias of the formula spelled out
    (float64) here."""
    pol = CachePolicy.recency_forcing().with_head_jitter(jitter)
    rope = RopeSpec.wan(16)
    n = 3
    cache = StreamingKVCache(pol, num_layers=1, batch_size=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             tokens_per_frame=n, rope=rope, dtype=torch.bfloat16, backend="reference")
    layer, g = cache.layers[0], torch.Generator().manual_seed(5)
    for f0 in range(0, 42, 3):
        for step in range(5):
            q = torch.randn(2, 3 * n, 4, 16, generator=g).bfloat16()
            k, v = torch.randn(2, 2, 3 * n, 2, 16, generator=g).bfloat16().unbind(0)
            out = layer.attend(q, k, v, start_frame=f0, clean=step == 4)
            L = len(layer) // n
            d = torch.tensor([(L - 1 - i) // 3 for i in range(L)], dtype=torch.float64)
            want = torch.where(d > 1, -4.0 * ((d - 1) / 4).clamp(max=1) ** (0.1 * 2 ** (step + 1)), 0.0)
            want[:3] = 0
            kb = None if step == 4 else want.float().repeat_interleave(n)
            ref = sink_attention(q, layer.keys(), layer.values(), rope=cache.rope, key_bias=kb, backend="reference",
                                 **layer.attention_args())
            assert torch.equal(out, ref), f"block at {f0}, pass {step}"


@pytest.mark.parametrize("cut", [5, 63, 64, 137])
def test_recency_forcing_resumes_bit_for_bit(cut):
    """Cut anywhere, including between two denoising passes of a block (the step count travels in the state)."""
    full = _cache()
    outs = [o for _, o in _drive(full, 0, 150)]
    a = _cache()
    list(_drive(a, 0, cut))
    state = a.state_dict()
    assert state["layers"][0]["recency_pass"] == (cut - 1) % P + 1
    b = _cache()
    b.load_state_dict(state)
    assert state_equal(b.state_dict(), state)
    for i, o in _drive(b, cut, 150):
        assert torch.equal(o, outs[i]), f"pass {i}"
    assert state_equal(b.state_dict(), full.state_dict())


def test_a_damaged_recency_state_is_refused():
    a = _cache()
    list(_drive(a, 0, 63))
    for bad in (0, -1, 2 ** 31, True, 1.0, "2", None):
        st = a.state_dict()
        st["layers"][0]["recency_pass"] = bad
        with pytest.raises(ValueError, match="recency_pass"):
            _cache().load_state_dict(st)
    st = a.state_dict()
    del st["layers"][0]["recency_pass"]
    with pytest.raises(ValueError, match="malformed"):
        _cache().load_state_dict(st)
    fresh = _cache().state_dict()
    fresh["layers"][0]["recency_pass"] = 3  # passes counted before any pass
    with pytest.raises(ValueError, match="recency_pass"):
        _cache().load_state_dict(fresh)
    st = a.state_dict()
    st["layers"][0]["recency_pass"] = 4  # a valid count loads
    _cache().load_state_dict(st)


def test_unmarked_passes_follow_self_forcing_and_a_bad_mark_is_refused():
    """Told nothing, pass 4 of a block is the clean pass (Self-Forcing's 4 steps, then the clean pass): the
    trace's passes run unmarked give the marked outputs bit for bit. A mark that is not a bool is refused before
    anything changes."""
    marked, plain = _cache(), _cache()
    layer, rope = plain.layers[0], rope_of(TRACE)
    for i, out in _drive(marked, 0, 60):
        f0 = (i // P) * F
        q, k, v = _qkv(i)
        q = apply_rope(q, rope, frame_offset=f0, grid=(F,) + GRID).float()
        k = apply_rope(k, rope, frame_offset=f0, grid=(F,) + GRID).float()
        assert torch.equal(layer.attend(q, k, v.float(), start_frame=f0), out), f"pass {i}"
    q = torch.zeros(1, F * N, CFG["heads"], CFG["head_dim"])
    fresh = _cache()
    with pytest.raises(ValueError, match="clean"):
        fresh.layers[0].attend(q, q, q, start_frame=0, clean=1)
    assert fresh.layers[0].recency.passes == 0 and len(fresh.layers[0]) == 0  # refused before anything changed
    assert fresh.wants_pass_marks


def test_memory_is_flat_over_a_1203_frame_stream():
    cache = StreamingKVCache(CachePolicy.recency_forcing(), num_layers=1, batch_size=2, num_heads=2, head_dim=8,
                             tokens_per_frame=1, rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer, ptr = cache.layers[0], cache.layers[0].storage.k.data_ptr()
    for f0 in range(0, 1203, 3):
        for step in range(5):
            q, k, v = torch.randn(3, 2, 3, 2, 8).unbind(0)
            layer.attend(q, k, v, start_frame=f0, clean=step == 4)
        assert len(layer) <= 21
    assert layer.storage.k.data_ptr() == ptr
    assert len(layer.recency._memo) <= 7 * 4  # one bias tensor per (frames read, step): warm-up lengths and 21


def test_recency_forcing_policy_defaults_and_checks():
    p = make_policy("recency_forcing")
    assert p == make_policy("recency-forcing") == CachePolicy.recency_forcing()
    assert (p.window_frames, p.sink_frames, p.sink_gap, p.rephase_sink) == (21, 3, 0, True)
    assert (p.recency_beta, p.recency_gamma0, p.recency_recent_chunks, p.recency_history_chunks) == (4.0, 0.1, 1, 4)
    assert CachePolicy.from_dict(p.to_dict()) == p
    for bad in ({"beta": -1}, {"beta": float("nan")}, {"gamma0": 0}, {"gamma0": float("inf")}, {"recent_chunks": -1},
                {"history_chunks": 0}, {"sink_frames": 19}, {"beta": True}):
        with pytest.raises(ValueError):
            CachePolicy.recency_forcing(**bad)
    with pytest.raises(ValueError, match="sink_gap"):
        CachePolicy("recency_forcing", window_frames=21, sink_frames=3, rephase_sink=True, sink_gap=3,
                    recency_beta=4.0, recency_gamma0=0.1, recency_recent_chunks=1, recency_history_chunks=4)
    with pytest.raises(ValueError, match="does not apply"):
        CachePolicy("deep_sink", window_frames=21, sink_frames=3, rephase_sink=True, recency_beta=4.0)


def test_the_command_generates_and_resumes_under_recency_forcing(tmp_path, capsys):
    """`deepforcing generate --policy recency_forcing` with the tiny model: a run stopped at 27 frames and resumed
    to 36 equals the straight 36-frame run bit for bit (the model marks every pass; the layers count the steps)."""
    from deepforcing_kernels.cli import main
    from deepforcing_kernels.driver import load_run

    gen = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--device", "cpu",
           "--policy", "recency-forcing", "--seed", "4", "--backend", "reference"]
    straight, part = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    assert main(gen + ["--frames", "36", "--out", straight]) == 0
    assert main(gen + ["--frames", "27", "--out", part]) == 0
    assert main(gen + ["--frames", "36", "--out", part, "--resume"]) == 0
    a, b = load_run(straight), load_run(part)
    assert "recency_forcing" in capsys.readouterr().out
    assert a["latents"].shape[0] == 36 and torch.equal(a["latents"], b["latents"])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_pass_bench_times_the_same_attention(dtype, tol):
    """bench/recency.py: the fused pass and the authors' grouped calls agree on the output they time (four
    entries: the biased pass, the same pass unbiased, deep_sink's, the grouped calls)."""
    from support import require_cpp

    from deepforcing_kernels.bench.recency import bench_recency_pass

    require_cpp()
    r = bench_recency_pass(tokens_per_frame=2, heads=2, head_dim=16, dtype=dtype, step=2, repeats=1, warmup=0)
    assert set(r["ms"]) == {"recency", "unbiased", "deep_sink", "groups"} and r["shape"]["lk"] == 42
    assert r["max_diff_groups"] <= tol and all(x > 0 for x in r["ratios"].values())


def test_the_op_bench_times_the_bias_ratios_as_their_own_pairs():
    from support import require_cpp

    from deepforcing_kernels.bench.ops import bench_op_case

    require_cpp()
    r = bench_op_case(tokens_per_frame=4, heads=2, head_dim=16, kv_frames=21, sink_frames=3, bias=True, mass=False,
                      repeats=1, warmup=0)
    assert set(r["pairs"]) == {"cpp+bias/cpp", "cpp:groups/cpp+bias"} and all(x > 0 for x in r["pairs"].values())
    assert "pairs" in bench_op_case(tokens_per_frame=4, heads=2, head_dim=16, repeats=1, warmup=0)


def test_every_other_policy_reads_as_before():
    """The recency fields appear only in a recency_forcing policy's dict and repr: the states and runs saved under
    every other policy before they existed still match it."""
    from deepforcing_kernels.presets import POLICY_NAMES

    for name in POLICY_NAMES:
        p = make_policy(name)
        has = name == "recency_forcing"
        assert any(k.startswith("recency_") for k in p.to_dict()) == has and ("recency_" in repr(p)) == has
        assert CachePolicy.from_dict(p.to_dict()) == p
