"""Streams a user steers: prefix frames (image-to-video, continuation), prompt schedules, re-cache, resume."""
import pytest
import torch

from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig, build_cache
from deepforcing_kernels.presets import POLICY_NAMES, make_policy

CFG = WanConfig.tiny(latent_size=(4, 4))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CausalWanModel(CFG).eval()
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    return m


def _text(seed):
    return torch.randn(1, 5, CFG.text_dim, generator=torch.Generator().manual_seed(seed))


def _run(model, frames, policy="deep_forcing", **kw):
    return generate(model, kw.pop("text", _text(1)), num_frames=frames, policy=make_policy(policy), seed=7,
                    progress=False, **kw)


# ---------------------------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("policy", ["deep_forcing", "deep_sink", "sliding", "frame_sink"])
def test_prefix_continuation_equals_feeding_back_generated_blocks(model, policy):
    """Same seed, same cache contents: generating 9 frames then continuing is the same stream as giving those 9
    frames as the prefix (the prefix blocks write the K/V a generated block's clean pass writes, and consume the
    noise a generated block would)."""
    full = _run(model, 36, policy).run()
    prefix = full[:, :9].clone()
    r = _run(model, 36, policy, prefix_latents=prefix)
    got = r.run()
    assert torch.equal(got[:, :9], prefix)  # returned bit for bit
    assert torch.equal(got, full)


def test_logits_mode_prefix_differs_only_through_the_query_buffer(model):
    """The release's recent-query buffer also holds denoising passes' queries, which a given block has not: the
    K/V equal, the buffer (and so later Top-C picks) may not. Documented, and pinned here."""
    a = _run(model, 9, "deep_forcing_logits")
    a.run()
    b = _run(model, 9, "deep_forcing_logits", prefix_latents=_run(model, 9, "deep_forcing_logits").run())
    b.run()
    la, lb = a.cache.layers[0], b.cache.layers[0]
    assert torch.equal(la.keys(), lb.keys()) and torch.equal(la.values(), lb.values())
    assert not torch.equal(la.scorer.qbuf, lb.scorer.qbuf)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_image_to_video_one_frame_prefix_runs_through_every_policy(model, policy):
    image = torch.randn(1, 1, CFG.in_dim, 4, 4, generator=torch.Generator().manual_seed(3))
    r = _run(model, 1 + 3 * 10, policy, prefix_latents=image)
    if policy == "tethercache":  # its window rolls whole blocks (docs/methods.md): refused with one clear line
        with pytest.raises(ValueError, match="tethercache window rolls whole blocks"):
            list(r)
        return
    blocks = list(r)
    assert blocks[0].shape[1] == 1 and torch.equal(blocks[0], image)
    assert all(b.shape[1] == 3 for b in blocks[1:]) and len(blocks) == 11
    out = torch.cat(blocks, 1)
    assert torch.isfinite(out).all() and out.shape[1] == 31
    layer = r.cache.layers[0]
    if policy in ("deep_sink", "deep_forcing", "deep_forcing_logits", "frame_sink", "full"):
        assert layer.frames()[0, 0].item() == 0  # the image stays: it is the sink


def test_prefix_bad_input(model):
    with pytest.raises(ValueError, match="latent channels"):
        _run(model, 6, prefix_latents=torch.zeros(1, 3, CFG.in_dim + 1, 4, 4))
    with pytest.raises(ValueError, match="latent channels"):
        _run(model, 6, prefix_latents=torch.zeros(1, 3, CFG.in_dim, 6, 4))
    with pytest.raises(ValueError, match="1 \\+ 3k"):
        _run(model, 8, prefix_latents=torch.zeros(1, 2, CFG.in_dim, 4, 4))
    with pytest.raises(ValueError, match="num_frames"):
        _run(model, 6, prefix_latents=torch.zeros(1, 1, CFG.in_dim, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        _run(model, 6, prefix_latents=torch.full((1, 3, CFG.in_dim, 4, 4), float("nan")))


# ---------------------------------------------------------------------------------------------- prompt schedule
@pytest.mark.parametrize("recache", [False, True])
def test_a_switch_keeps_the_past_and_changes_the_future(model, recache):
    a, b = _text(1), _text(2)
    single = _run(model, 36, text=a).run()
    switched = _run(model, 36, text=None, text_schedule=[(0, a), (18, b)], recache=recache).run()
    assert torch.equal(switched[:, :18], single[:, :18])
    assert not torch.equal(switched[:, 18:21], single[:, 18:21])


def test_schedule_bad_input(model):
    a, b = _text(1), _text(2)
    with pytest.raises(ValueError, match="block boundary"):
        _run(model, 12, text=None, text_schedule=[(0, a), (4, b)])
    with pytest.raises(ValueError, match="increasing"):
        _run(model, 12, text=None, text_schedule=[(0, a), (6, b), (3, a)])
    with pytest.raises(ValueError, match="start at frame 0"):
        _run(model, 12, text=None, text_schedule=[(3, a)])
    with pytest.raises(ValueError, match="width"):
        _run(model, 12, text=None, text_schedule=[(0, a), (3, torch.zeros(1, 5, CFG.text_dim + 1))])
    # with a one-frame image prefix blocks start at 0, 1, 4, 7, ...
    image = torch.zeros(1, 1, CFG.in_dim, 4, 4)
    _run(model, 7, text=None, text_schedule=[(0, a), (4, b)], prefix_latents=image)
    with pytest.raises(ValueError, match="block boundary"):
        _run(model, 7, text=None, text_schedule=[(0, a), (3, b)], prefix_latents=image)


def test_recache_rewrites_held_frames_as_a_fresh_clean_pass(model):
    """With a cache that holds only whole frames (sliding), the re-cached K/V equal a fresh cache built by clean
    passes of the same frames, at the same positions, under the new prompt."""
    a, b = _text(1), _text(2)
    r = _run(model, 27, "sliding", text=None, text_schedule=[(0, a), (27, b)], recache=True)
    clean = r.run()  # 27 frames, the window (21) holds frames 6..26
    r.num_frames = 30
    r._recache(1)
    policy = make_policy("sliding")
    fresh = build_cache(model, policy, latent_size=(4, 4), batch_size=1, dtype=torch.float32,
                        device=torch.device("cpu"))
    ctx = model.prepare_text(b.expand(1, -1, -1)) if hasattr(model, "prepare_text") else b
    with torch.no_grad():
        for f0 in range(6, 27, 3):
            model(clean[:, f0:f0 + 3], torch.zeros(1, 3), ctx, cache=fresh, start_frame=f0)
    for la, lb in zip(r.cache.layers, fresh.layers):
        assert torch.equal(la.frames(), lb.frames())
        torch.testing.assert_close(la.keys(), lb.keys(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(la.values(), lb.values(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_recaches_late_in_a_stream(model, name):
    """A re-cache long after the window filled finds the clean latents of every frame its cache holds whole
    (Rolling Sink's replayed tape frames too), and keeps them bounded."""
    a, b = _text(1), _text(2)
    r = _run(model, 63, name, text=None, text_schedule=[(0, a), (48, b)], recache=True)
    out = r.run()
    assert out.shape[1] == 63 and torch.isfinite(out).all()
    p = r.cache.policy  # as resolved for this frame size (Rolling Sink's window is counted in 1560-token frames)
    assert len(r._clean) <= max(p.sink_frames, p.tape_frames or 0) + (p.window_frames or 63)


def test_recache_leaves_topc_slots_and_keeps_bounded_latents(model):
    a, b = _text(1), _text(2)
    r = _run(model, 60, "deep_forcing", text=None, text_schedule=[(0, a), (60, b)], recache=True)
    r.run()
    layer = r.cache.layers[0]
    kinds = layer.kinds()
    before = layer.keys()
    r.num_frames = 63
    r._recache(1)
    after = layer.keys()
    n = r.tokens_per_frame
    topc = torch.tensor([k == "topc" for k in kinds])
    assert torch.equal(after[:, topc], before[:, topc])
    assert not torch.equal(after[:, ~topc], before[:, ~topc])
    assert len(r._clean) <= r.policy.sink_frames + r.policy.window_frames
    assert sorted(r._clean)[:10] == list(range(10)) and max(r._clean) == 59
    assert sum(1 for s, _, f in layer.whole_frame_groups() for _ in range(f)) * n == int((~topc).sum())


def test_resume_covers_prefix_schedule_and_recache(model):
    a, b = _text(1), _text(2)
    image = torch.randn(1, 1, CFG.in_dim, 4, 4, generator=torch.Generator().manual_seed(4))
    kw = dict(text=None, text_schedule=[(0, a), (22, b)], recache=True, prefix_latents=image)
    straight = _run(model, 46, **kw).run()
    first = _run(model, 46, **kw)
    part = [next(first) for _ in range(6)]  # frames 0..15
    state = first.state_dict()
    rest = _run(model, 46, resume_from=state, **kw).run()
    assert torch.equal(torch.cat(part + [rest], 1), straight)
    with pytest.raises(ValueError, match="switch_frames"):
        _run(model, 46, resume_from=state, **dict(kw, text_schedule=[(0, a), (25, b)]))


def test_trace_prefix_shows_the_prefix_as_the_sink(capsys):
    from deepforcing_kernels.cli import main

    assert main(["trace", "--policy", "deep_forcing", "--frames", "60", "--prefix", "1", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "prefix: frames 0..0 given; 1 of them still held at the end (the sink)" in out
    assert main(["trace", "--policy", "sliding", "--frames", "60", "--prefix", "3", "--no-plot"]) == 0
    assert "none held at the end" in capsys.readouterr().out
    assert main(["trace", "--frames", "30", "--prefix", "2", "--no-plot"]) == 1
    assert "--prefix" in capsys.readouterr().err
