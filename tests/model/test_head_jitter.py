"""LoL's multi-head RoPE jitter (``head_jitter=``) as a policy option, through the tiny Wan model and the cache:

* one layer's self-attention output equals a brute-force float64 re-derivation from the layer's un-rotated q, k, v
  (its own per-head RoPE, written out here pair by pair, at the positions the cache says it attends each slot at),
  on the reference, C++ and (interpreted) Triton backends: the model rotates queries and keys, and the cache
  re-phases its sink / tape, with the same per-head angles;
* every policy of the preset table runs blocks with jitter on, on the reference and C++ backends (which agree),
  differs from jitter off, and strength 0 is jitter off bit for bit;
* resume: the same jitter continues bit for bit, another one (or none) is refused naming ``head_jitter``;
* a head-sharded cache gets its heads' one-process scales; a model that rotates with its own RoPE is refused."""
import math

import pytest
import torch
from support import cpp_available

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig, build_cache
from deepforcing_kernels.presets import POLICY_NAMES, make_policy
from deepforcing_kernels.rope import head_jitter

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference"] + (["cpp"] if cpp_available() else [])
LATENT = (4, 6)  # 2 x 3 tokens a frame: rows and columns differ
#: every preset at windows a few blocks of 3 frames fill, so each one's mechanism runs within 18 frames
SMALL = {"full": {}, "sliding": dict(window_frames=6), "frame_sink": dict(window_frames=6, sink_frames=2),
         "deep_sink": dict(window_frames=9, sink_frames=3),
         "deep_forcing": dict(window_frames=9, sink_frames=2, budget_frames=7, recent_frames=3),
         "deep_forcing_logits": dict(window_frames=9, sink_frames=2, budget_frames=7, recent_frames=3),
         "rolling_sink": dict(window_frames=9, frame_tokens=None), "memrope": dict(window_frames=8, sink_frames=1),
         "infinity_rope": {}, "tethercache": dict(window_frames=9, sink_frames=1, recent_frames=3)}


def tiny_model(heads=2, seed=0, head_dim=48):
    cfg = WanConfig.tiny(num_heads=heads, dim=head_dim * heads, ffn_dim=2 * head_dim * heads)
    m = CausalWanModel(cfg)
    m.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return m.eval()


def text(seed=0):
    return torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(seed))


def run(model, policy, frames=18, backend="reference", **kw):
    ro = generate(model, text(), frames, policy, 3, latent_size=LATENT, progress=False, backend=backend, **kw)
    return ro, torch.cat(list(ro), dim=1)


# ------------------------------------------------------------------------------------------ brute force
def brute_rope(x, t, rows, cols, scales, theta=10000.0, bands=(16, 16, 16)):
    """Wan's interleaved 3-D RoPE of ``x [L, H, D]`` (float64) at temporal positions ``t [L]`` and grid ``rows,
    cols [L]``, head ``h``'s temporal frequencies times ``scales[h]``: written out pair by pair from the layout
    (docs/spec.md section 1), sharing nothing with the package's rotation code."""
    out = x.clone()
    ch = 0
    for axis, n in enumerate(bands):
        pos = (t, rows, cols)[axis].double()
        for j in range(n // 2):
            for h in range(x.shape[1]):
                w = theta ** (-2.0 * j / n) * (scales[h] if axis == 0 else 1.0)
                c, s = torch.cos(pos * w), torch.sin(pos * w)
                re, im = x[:, h, ch + 2 * j], x[:, h, ch + 2 * j + 1]
                out[:, h, ch + 2 * j], out[:, h, ch + 2 * j + 1] = re * c - im * s, re * s + im * c
        ch += n
    return out


def record_layer0(model, cache_layer):
    """Per self-attention pass of block 0: the un-rotated q, k, v, the module's output, the pass's start frame and
    the cache's slot frames / attended positions after it."""
    attn, passes, cur = model.blocks[0].self_attn, [], {}
    hooks = [attn.norm_q.register_forward_hook(lambda m, a, o: cur.__setitem__("q", o.detach().clone())),
             attn.norm_k.register_forward_hook(lambda m, a, o: cur.__setitem__("k", o.detach().clone())),
             attn.v.register_forward_hook(lambda m, a, o: cur.__setitem__("v", o.detach().clone())),
             attn.register_forward_hook(lambda m, a, o: passes.append(dict(cur, out=o.detach().clone())))]
    inner = cache_layer.attend

    def attend(q, k, v, *, start_frame):
        res = inner(q, k, v, start_frame=start_frame)
        cur.update(f0=start_frame, frames=cache_layer.frames()[0].clone(), pos=cache_layer.positions()[0].clone())
        return res

    cache_layer.attend = attend
    return passes, hooks


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("name", ["deep_sink", "rolling_sink", "sliding"])
def test_layer_output_equals_a_per_head_float64_rederivation(name, backend, monkeypatch):
    """The sink (deep_sink) and the tape (rolling_sink) are attended at positions their keys were not rotated at:
    only per-head angles in the cache equal to the model's own rotation reproduce the layer's output. Triton runs
    under the interpreter, at head_dim 32 (its kernels take powers of two)."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model(head_dim=32 if backend == "triton" else 48)
    policy = make_policy(name, head_jitter=0.8, head_jitter_seed=1, **SMALL[name])
    import deepforcing_kernels.driver as drv

    made = {}

    def build(*a, **kw):
        made["cache"] = c = build_cache(*a, **kw)
        made["rec"] = record_layer0(model, c.layers[0])
        return c

    monkeypatch.setattr(drv, "build_cache", build)
    ro, _ = run(model, policy, frames=18, backend=backend)
    assert ro.cache.backend == backend
    scales = made["cache"].rope.head_scale
    assert scales == head_jitter(model.rope, 2, 0.8, 1).head_scale and len(set(scales)) == 2
    passes, hooks = made["rec"]
    for h in hooks:
        h.remove()
    H, D, n, cols = 2, model.config.head_dim, 6, 3
    bands = model.rope.band_dims
    store, moved, worst = {}, 0, 0.0
    o = model.blocks[0].self_attn.o
    for p in passes:
        q, k, v = (p[x].double().view(-1, H, D) for x in ("q", "k", "v"))  # batch 1: [L, H, D]
        L = q.shape[0]
        for i in range(L // n):  # this pass (re)writes its block's frames, as the cache does
            store[p["f0"] + i] = (k[i * n:(i + 1) * n], v[i * n:(i + 1) * n])
        tok = torch.arange(L)
        qr = brute_rope(q, p["f0"] + tok // n, (tok % n) // cols, tok % cols, scales, bands=bands)
        slot = torch.arange(len(p["frames"])) % n  # whole frames in slot order: token index within its frame
        kk = torch.stack([store[int(f)][0][int(t)] for f, t in zip(p["frames"], slot)])
        vv = torch.stack([store[int(f)][1][int(t)] for f, t in zip(p["frames"], slot)])
        kr = brute_rope(kk, p["pos"], slot // cols, slot % cols, scales, bands=bands)
        moved += int((p["pos"] != p["frames"]).sum())
        att = torch.softmax(torch.einsum("qhd,khd->hqk", qr, kr) / math.sqrt(D), dim=-1)
        y = torch.einsum("hqk,khd->qhd", att, vv).reshape(1, L, H * D)
        want = torch.nn.functional.linear(y, o.weight.double(), o.bias.double())
        worst = max(worst, (want - p["out"].double()).abs().max().item())
        torch.testing.assert_close(p["out"].double(), want, atol=2e-5, rtol=1e-5)
    assert len(passes) == 6 * 5
    assert (moved > 0) == (name != "sliding")  # keys attended away from their own frame were checked
    print(f"{name} ({backend}): {len(passes)} passes, max |layer output - float64 per-head re-derivation| = {worst:.3g}")


# ------------------------------------------------------------------------------------------ every policy
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_runs_with_jitter_on_every_cpu_backend(name):
    model = tiny_model()
    off = run(model, make_policy(name, **SMALL[name]))[1]
    zero = run(model, make_policy(name, head_jitter=0.0, head_jitter_seed=5, **SMALL[name]))[1]
    assert torch.equal(zero, off)  # strength 0 is no jitter, bit for bit (whatever the seed)
    outs = {}
    for backend in BACKENDS:
        ro, outs[backend] = run(model, make_policy(name, head_jitter=0.8, **SMALL[name]), backend=backend)
        assert ro.cache.backend == backend and ro.cache.rope.head_scale is not None
        assert bool(torch.isfinite(outs[backend]).all())
    assert (outs["reference"] - off).abs().max() > 1e-4  # the jitter changes the video
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(outs[backend], outs["reference"], atol=1e-4, rtol=1e-4)


def test_jitter_seeds_and_strengths_give_different_videos():
    model = tiny_model()
    a = run(model, make_policy("deep_sink", head_jitter=0.8, **SMALL["deep_sink"]))[1]
    b = run(model, make_policy("deep_sink", head_jitter=0.8, head_jitter_seed=1, **SMALL["deep_sink"]))[1]
    c = run(model, make_policy("deep_sink", head_jitter=0.4, **SMALL["deep_sink"]))[1]
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, run(model, make_policy("deep_sink", head_jitter=0.8, **SMALL["deep_sink"]))[1])


# ------------------------------------------------------------------------------------------ resume
def test_resume_continues_with_the_same_jitter_and_refuses_another():
    model = tiny_model()
    policy = make_policy("deep_forcing", head_jitter=0.8, head_jitter_seed=2, **SMALL["deep_forcing"])
    ro, straight = run(model, policy)
    ro = generate(model, text(), 18, policy, 3, latent_size=LATENT, progress=False, backend="reference")
    first = [next(ro) for _ in range(3)]  # past the first compression (f0 = 6)
    state = ro.state_dict()
    assert state["settings"]["head_jitter"] == [0.8, 2]
    again = run(model, policy, resume_from=state)[1]
    assert torch.equal(torch.cat(first + [again], dim=1), straight)
    for other in (policy.with_head_jitter(0.5, 2), policy.with_head_jitter(0.8, 3), policy.with_head_jitter(0.0)):
        with pytest.raises(ValueError, match="cannot resume: head_jitter was"):
            run(model, other, resume_from=state)
    cache = build_cache(model, policy.with_head_jitter(0.5, 2), latent_size=LATENT, batch_size=1,
                        dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="policy"):  # the cache's own state check refuses it too
        cache.load_state_dict(state["cache"])


def test_a_policy_without_jitter_keeps_its_saved_form():
    """Runs saved before the option existed hold the same policy dict and repr as a policy without jitter now."""
    p = CachePolicy.deep_forcing()
    assert "head_jitter" not in p.to_dict() and "head_jitter" not in repr(p)
    j = p.with_head_jitter(0.8, 7)
    assert j.to_dict()["head_jitter"] == 0.8 and "head_jitter=0.8, head_jitter_seed=7" in repr(j)
    assert CachePolicy.from_dict(j.to_dict()) == j and CachePolicy.from_dict(p.to_dict()) == p
    assert p.with_head_jitter(0.0, 7) == p  # the seed means nothing without jitter
    # Rolling Sink's window resolved to another frame size keeps the jitter
    assert CachePolicy.rolling_sink().with_head_jitter(0.5, 1).for_tokens_per_frame(6).head_jitter_setting == [0.5, 1]


@pytest.mark.parametrize("bad", [-0.1, 2.0, 2.5, float("nan"), float("inf"), True, "0.8"])
def test_bad_strengths_are_refused_naming_head_jitter(bad):
    with pytest.raises(ValueError, match="head_jitter must be a number in"):
        make_policy("deep_sink", head_jitter=bad)


def test_bad_seed_is_refused():
    with pytest.raises((ValueError, TypeError), match="head_jitter_seed"):
        make_policy("sliding", head_jitter=0.5, head_jitter_seed=-1)


# ------------------------------------------------------------------------------------------ who can take it
def test_a_model_that_rotates_with_its_own_rope_is_refused():
    class OwnRope(torch.nn.Module):  # the protocol, without rotating by the cache's RoPE
        latent_channels, text_dim, default_latent_size = 4, 32, (4, 6)

        def cache_spec(self, latent_size):
            return tiny_model().cache_spec(latent_size)

        def forward(self, *a, **kw):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="head_jitter: OwnRope rotates its queries and keys with its own RoPE"):
        generate(OwnRope(), text(), 6, make_policy("sliding", head_jitter=0.5), 0, progress=False)
    generate(OwnRope(), text(), 6, make_policy("sliding"), 0, progress=False)  # without jitter: as before


def test_a_backend_without_per_head_tables_is_refused(monkeypatch):
    import dataclasses

    import deepforcing_kernels.backends as be

    no_tables = dataclasses.replace(be._REGISTRY["reference"], takes=lambda f: "no per-head tables here"
                                    if f == "head_rope" else None)
    monkeypatch.setitem(be._REGISTRY, "reference", no_tables)
    monkeypatch.setattr(be, "_RESOLVED", {})
    with pytest.raises(ValueError, match="no per-head tables here"):
        run(tiny_model(), make_policy("deep_sink", head_jitter=0.5, **SMALL["deep_sink"]), frames=3)


def test_cache_rope_checks():
    kw = dict(num_layers=1, batch_size=1, num_heads=4, head_dim=48, tokens_per_frame=6, dtype=torch.float32)
    policy = CachePolicy.deep_sink(9, 3).with_head_jitter(0.8, 1)
    with pytest.raises(ValueError, match="rope .*required"):
        StreamingKVCache(CachePolicy.sliding(6).with_head_jitter(0.8), rope=None, **kw)
    with pytest.raises(ValueError, match="already has head_scale"):
        StreamingKVCache(policy, rope=RopeSpec.wan(48).with_head_scale([1.0] * 4), **kw)
    whole = StreamingKVCache(policy, rope=RopeSpec.wan(48), **kw).rope
    assert whole == head_jitter(RopeSpec.wan(48), 4, 0.8, 1)
    assert StreamingKVCache(policy, rope=RopeSpec.wan(48), **kw).geometry()["rope"]["head_scale"] == \
        list(whole.head_scale)
    # a head-sharded cache (Ulysses, 2 ranks of 2 heads) holds its heads' one-process scales
    half = dict(kw, num_heads=2)
    parts = [StreamingKVCache(policy, rope=RopeSpec.wan(48), head_shard=(r, 2), **half).rope.head_scale
             for r in range(2)]
    assert parts[0] + parts[1] == whole.head_scale
    with pytest.raises(ValueError, match="shard"):
        StreamingKVCache(policy, rope=RopeSpec.wan(48), head_shard=(2, 2), **half)


def test_the_model_refuses_a_cache_of_another_rope_layout():
    model = tiny_model()
    policy = CachePolicy.sliding(6).with_head_jitter(0.8)
    cache = StreamingKVCache(policy, num_layers=2, batch_size=1, num_heads=2, head_dim=48, tokens_per_frame=6,
                             rope=RopeSpec.wan(48, theta=500.0), dtype=torch.float32)
    x, t = torch.randn(1, 3, 4, 4, 6), torch.full((1, 3), 1000.0)
    with pytest.raises(ValueError, match="is not the model's"):
        model(x, t, text(), cache=cache, start_frame=0)
