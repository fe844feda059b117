"""The Self-Forcing rollout driver on the real streaming cache: call pattern, noise schedule, determinism, streaming,
resume, no length cap."""
import io

import pytest
import torch

from deepforcing_kernels import CachePolicy
from deepforcing_kernels.driver import generate, warp_timesteps
from deepforcing_kernels.models import CausalWanModel, WanConfig

# 4 x 4 latents: 4 tokens per frame keeps every rollout here fast
SMALL = dict(latent_size=(4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_model(seed=0, **overrides):
    m = CausalWanModel(WanConfig.tiny(**overrides))
    m.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return m.eval()


def text(seed=0):
    return torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(seed))


class Spy(torch.nn.Module):
    """Wraps a model and records every forward call."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []
        self.latent_channels, self.text_dim = model.latent_channels, model.text_dim
        self.default_latent_size, self.cache_spec = model.default_latent_size, model.cache_spec

    def forward(self, latents, timestep, text_embeds, *, cache, start_frame):
        out = self.inner(latents, timestep, text_embeds, cache=cache, start_frame=start_frame)
        self.calls.append({"x": latents.clone(), "t": timestep.clone(), "f0": start_frame, "flow": out.clone()})
        return out


def test_warped_timesteps_are_computed_floats():
    ts = warp_timesteps()
    assert ts[0] == 1000.0 and ts[1] == 937.5 and ts[3] == 625.0
    assert abs(ts[2] - 2500.0 / 3.0) < 1e-9 and ts[2] != 833.0
    assert warp_timesteps([500.0], shift=1.0) == [500.0]  # shift 1 is the identity
    with pytest.raises(ValueError):
        warp_timesteps([1200.0])


def test_rollout_call_pattern_and_noise_schedule():
    spy = Spy(tiny_model())
    seed = 3
    blocks = list(generate(spy, text(), 9, CachePolicy.sliding(), seed, progress=False, **SMALL))
    assert len(blocks) == 3 and all(b.shape == (1, 3, 4, 4, 4) for b in blocks)
    assert len(spy.calls) == 3 * 5
    want_t = [1000.0, 937.5, 2500.0 / 3.0, 625.0, 0.0]
    g = torch.Generator().manual_seed(seed)  # the driver's stream: block noise, then 3 fresh noises per block
    for bi, block in enumerate(blocks):
        calls = spy.calls[5 * bi: 5 * bi + 5]
        assert [c["f0"] for c in calls] == [3 * bi] * 5  # all five passes at the block's start frame
        for c, t in zip(calls, want_t):
            assert c["t"].shape == (1, 3)
            torch.testing.assert_close(c["t"], torch.full((1, 3), t), rtol=1e-7, atol=0)
        assert torch.equal(calls[0]["x"], torch.randn((1, 3, 4, 4, 4), generator=g))
        for i in range(3):  # x0 = x_t - sigma_t * flow, then x_next = (1 - s) x0 + s * fresh noise
            x0 = (calls[i]["x"].double() - want_t[i] / 1000 * calls[i]["flow"].double()).float()
            s = want_t[i + 1] / 1000
            fresh = torch.randn((1, 3, 4, 4, 4), generator=g)
            torch.testing.assert_close(calls[i + 1]["x"], (1 - s) * x0 + s * fresh, rtol=0, atol=1e-6)
        x0 = (calls[3]["x"].double() - 0.625 * calls[3]["flow"].double()).float()
        torch.testing.assert_close(block, x0, rtol=0, atol=1e-6)
        assert torch.equal(calls[4]["x"], block)  # the clean pass re-encodes the block's own x0 at t = 0


def test_streaming_is_lazy_and_in_order():
    spy = Spy(tiny_model())
    seen = []
    ro = generate(spy, text(), 12, CachePolicy.sliding(), 0, progress=False,
                  callback=lambda b, f0: seen.append((f0, b.shape[1])), **SMALL)
    assert spy.calls == []  # nothing runs before the first block is asked for
    first = next(ro)
    assert len(spy.calls) == 5 and ro.frames_done == 3 and seen == [(0, 3)]
    rest = ro.run()  # the callback form drains the rest
    assert seen == [(0, 3), (3, 3), (6, 3), (9, 3)] and rest.shape[1] == 9
    assert first.shape[1] == 3
    with pytest.raises(StopIteration):
        next(ro)


def test_deterministic_for_a_seed_whatever_the_global_rng():
    m, txt = tiny_model(), text()
    torch.manual_seed(1)
    a = generate(m, txt, 9, CachePolicy.sliding(), 5, progress=False, **SMALL).run()
    torch.manual_seed(2)
    torch.randn(100)
    b = generate(m, txt, 9, CachePolicy.sliding(), 5, progress=False, **SMALL).run()
    c = generate(m, txt, 9, CachePolicy.sliding(), 6, progress=False, **SMALL).run()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    assert torch.isfinite(a).all()


def test_context_matters_later_blocks_see_the_cache():
    """The same noise for block 1 gives a different result when block 0 differs (attention reads the cache)."""
    m = tiny_model()
    a = generate(m, text(0), 6, CachePolicy.full(), 0, progress=False, **SMALL).run()
    b = generate(m, text(1), 6, CachePolicy.full(), 0, progress=False, **SMALL).run()
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("policy", [CachePolicy.sliding(), CachePolicy.deep_forcing(score="mass"),
                                    CachePolicy.deep_forcing(score="logits")], ids=lambda p: f"{p.kind}-{p.score}")
def test_resume_is_bit_for_bit(policy):
    m, txt = tiny_model(), text()
    frames, cut = 30, 8  # deep forcing compresses at f0 = 21 and 27: resume between the two
    full = generate(m, txt, frames, policy, 0, progress=False, **SMALL).run()
    ro = generate(m, txt, frames, policy, 0, progress=False, **SMALL)
    head = [next(ro) for _ in range(cut)]
    buf = io.BytesIO()
    torch.save(ro.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain values and tensors only
    assert state["frames_done"] == 3 * cut
    tail = generate(m, txt, frames, policy, 0, progress=False, resume_from=state, **SMALL).run()
    assert torch.equal(torch.cat(head + [tail], dim=1), full)
    with pytest.raises(ValueError, match="seed"):
        generate(m, txt, frames, policy, 1, progress=False, resume_from=state, **SMALL)


def test_cache_dtype_and_batch():
    m = tiny_model()
    out = generate(m, text(), 6, CachePolicy.deep_sink(), 0, batch_size=2, cache_dtype=torch.bfloat16,
                   progress=False, **SMALL).run()
    assert out.shape == (2, 6, 4, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # one prompt, two videos: different noise per element
    assert (out[0] - out[1]).abs().max() > 0.1


def test_past_1021_frames():
    """The release's 1024-entry RoPE table crashes past ~1021 latent frames; positions here are computed."""
    m = tiny_model(num_layers=1, dim=48, ffn_dim=48, freq_dim=16)
    ro = generate(m, text(), 1029, CachePolicy.sliding(), 0, latent_size=(2, 2), progress=False)
    last = None
    for last in ro:
        pass
    assert ro.frames_done == 1029 and torch.isfinite(last).all()
    layer = ro.cache.layers[0]
    assert layer.frames()[0].tolist() == list(range(1029 - 21, 1029))
    assert layer.positions()[0].max().item() == 1028


def test_bad_arguments():
    m = tiny_model()
    with pytest.raises(ValueError, match="multiple"):
        generate(m, text(), 10, CachePolicy.sliding(), 0, progress=False)
    with pytest.raises(ValueError, match="width"):
        generate(m, torch.randn(1, 5, 31), 9, CachePolicy.sliding(), 0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate(m, torch.randn(2, 5, 32), 9, CachePolicy.sliding(), 0, batch_size=3, progress=False)
    with pytest.raises(ValueError, match="patch"):
        generate(m, text(), 9, CachePolicy.sliding(), 0, latent_size=(5, 4), progress=False)
    with pytest.raises(ValueError, match="resume"):
        generate(m, text(), 9, CachePolicy.sliding(), 0, resume_from={"frames_done": 3}, progress=False)
    with pytest.raises(TypeError):
        generate(torch.nn.Linear(2, 2), text(), 9, CachePolicy.sliding(), 0, progress=False)


class TinyMixer(torch.nn.Module):
    """A second model family in a few lines (not Wan): one token per latent pixel, a 1-D RoPE over frames, one
    cached self-attention layer and a linear read-out. It implements CausalVideoModel and nothing else."""

    latent_channels, text_dim, default_latent_size = 3, 8, (2, 2)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.Linear(3, 3 * 16)
        self.out = torch.nn.Linear(16 + 8, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        from deepforcing_kernels import RopeSpec

        self.rope = RopeSpec.gptj(8)

    def cache_spec(self, latent_size):
        from deepforcing_kernels.models import CacheSpec

        return CacheSpec(1, 2, 2, 8, latent_size[0] * latent_size[1], self.rope)

    def forward(self, latents, timestep, text, *, cache, start_frame):
        from deepforcing_kernels import apply_rope

        b, f, c, h, w = latents.shape
        x = latents.permute(0, 1, 3, 4, 2).reshape(b, f * h * w, c) * (1 + timestep.mean() / 1000)
        q, k, v = self.qkv(x).view(b, f * h * w, 3, 2, 8).unbind(2)
        # one temporal position per frame: rotate each frame's tokens at their frame (grid of one token)
        q, k = (torch.cat([apply_rope(t[:, i * h * w:(i + 1) * h * w].reshape(b * h * w, 1, 2, 8), self.rope,
                                      frame_offset=start_frame + i, grid=(1,)).reshape(b, h * w, 2, 8)
                           for i in range(f)], dim=1) for t in (q, k))
        a = cache.layers[0].attend(q, k, v, start_frame=start_frame).reshape(b, f * h * w, 16)
        y = self.out(torch.cat([a, text.mean(1, keepdim=True).expand(b, f * h * w, 8)], -1))
        return y.view(b, f, h, w, c).permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("policy", ["deep_forcing", "deep_sink", "sliding"])
def test_a_second_model_family_runs_through_generate(policy):
    """The driver reads nothing Wan-specific: a protocol-only model rolls out past the window, deterministically."""
    from deepforcing_kernels.presets import make_policy

    model = TinyMixer()
    txt = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    run = lambda: generate(model, txt, num_frames=30, policy=make_policy(policy), seed=3, progress=False).run()  # noqa: E731
    a = run()
    assert a.shape == (1, 30, 3, 2, 2) and torch.isfinite(a).all()
    assert torch.equal(a, run())
    assert not torch.equal(a[:, :3], a[:, 27:])  # the stream moves


def test_a_model_without_the_protocol_is_refused_by_name():
    with pytest.raises(TypeError, match="CausalVideoModel.*cache_spec"):
        generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, 2), num_frames=3, policy=CachePolicy.sliding(), seed=0)
