"""Reliability: resuming streams exactly.

* StreamingKVCache: hypothesis picks a policy, a geometry (2 layers, GQA, fp32 / bf16), a call sequence (new blocks,
  extra passes of a block, jumps) and cut points; at each cut the state_dict goes to disk with torch.save, comes back
  with torch.load(weights_only=True) and is loaded into a fresh cache (or one busy with another stream). The
  resumed stream must give bit-identical outputs and end in a bit-identical state; a state can be loaded twice to
  replay (rewind) the same continuation.
* generate(..., resume_from=...): a chain of rollouts, each resumed from the file the previous one saved after one
  block, equals the uninterrupted rollout bit for bit, across compressions, in a bf16 cache.
* `deepforcing generate` killed with SIGKILL mid-run: the output file is always a complete, loadable snapshot that
  holds every finished block (equal to the straight run's), and --resume finishes it identically.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig

from test_reliability_cache_fuzz import policies, state_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only spins


def save_load(sd, path):
    torch.save(sd, path)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------- the cache
@st.composite
def resume_cases(draw):
    policy = draw(policies())
    n = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    rope = draw(st.sampled_from([RopeSpec.wan(16), RopeSpec.llama(16)]))
    # (kind, gap): a new block `gap` frames after the current one ends, or another pass of the current block
    steps = draw(st.lists(st.one_of(st.tuples(st.just("new"), st.sampled_from([0, 0, 0, 2])),
                                    st.tuples(st.just("over"), st.just(0))), min_size=6, max_size=24))
    cuts = draw(st.sets(st.integers(1, len(steps)), min_size=1, max_size=3))
    busy = draw(st.booleans())
    return policy, n, Hkv, dtype, rope, steps, sorted(cuts), busy, draw(st.integers(0, 2**31 - 1))


def make_cache(policy, n, Hkv, dtype, rope):
    return StreamingKVCache(policy, num_layers=2, batch_size=2, num_heads=2, head_dim=16, tokens_per_frame=n,
                            rope=rope, dtype=dtype, num_kv_heads=Hkv)


def stream_calls(policy, n, Hkv, dtype, steps, seed):
    """The passes of a stream: (start_frame, [(q, k, v) per layer])."""
    gen = torch.Generator().manual_seed(seed)
    F, Lb = policy.block_frames, policy.block_frames * n
    calls, f0 = [], None
    for kind, gap in [("new", 0)] + steps:
        if kind == "new":
            f0 = 0 if f0 is None else f0 + F + gap
        per_layer = [tuple(torch.randn(2, Lb, h, 16, generator=gen).to(dtype) for h in (2, Hkv, Hkv))
                     for _ in range(2)]
        calls.append((f0, per_layer))
    return calls


def play(cache, calls):
    outs = []
    for f0, per_layer in calls:
        outs.append([layer.attend(q, k, v, start_frame=f0) for layer, (q, k, v) in zip(cache.layers, per_layer)])
    return outs


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(case=resume_cases())
def test_cache_resume_from_disk_is_bit_for_bit(case, tmp_path):
    policy, n, Hkv, dtype, rope, steps, cuts, busy, seed = case
    calls = stream_calls(policy, n, Hkv, dtype, steps, seed)
    straight_cache = make_cache(policy, n, Hkv, dtype, rope)
    straight = play(straight_cache, calls)

    cache = make_cache(policy, n, Hkv, dtype, rope)
    done = 0
    for i, cut in enumerate(cuts + [len(calls)]):
        got = play(cache, calls[done:cut])
        for a, b in zip(got, straight[done:cut]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"resumed output differs after cut {done}"
        done = cut
        if cut == len(calls):
            break
        sd = cache.state_dict()
        loaded = save_load(sd, str(tmp_path / f"cache{i}.pt"))
        assert state_equal(loaded, sd)
        cache = make_cache(policy, n, Hkv, dtype, rope)
        if busy:  # a cache in the middle of another stream: loading must replace everything
            play(cache, stream_calls(policy, n, Hkv, dtype, [("new", 0)] * 3 + [("over", 0)], seed + 1))
        cache.load_state_dict(loaded)
        assert state_equal(cache.state_dict(), sd)
    assert state_equal(cache.state_dict(), straight_cache.state_dict())


@pytest.mark.parametrize("policy", [CachePolicy.deep_forcing(8, 2, 6, 2, score="mass", block_frames=1),
                                    CachePolicy.deep_forcing(8, 2, 6, 3, score="logits", block_frames=1),
                                    CachePolicy.deep_sink(6, 2, block_frames=2)], ids=["mass", "logits", "ds"])
def test_state_can_be_replayed_twice(policy, tmp_path):
    """Rewind: load one saved state, continue, load it again, continue the same way: identical both times, and the
    state dict taken before is not affected by what the cache does afterwards (it holds copies)."""
    rope = RopeSpec.gptj(16)
    calls = stream_calls(policy, 1, 2, torch.float32, [("new", 0)] * 14, 3)
    cache = make_cache(policy, 1, 2, torch.float32, rope)
    play(cache, calls[:6])
    sd = cache.state_dict()
    snapshot = save_load(sd, str(tmp_path / "s.pt"))
    first = play(cache, calls[6:])
    assert state_equal(sd, snapshot), "state_dict() shares storage with the live cache"
    cache.load_state_dict(snapshot)
    second = play(cache, calls[6:])
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- generate()
def tiny_model():
    m = CausalWanModel(WanConfig.tiny())
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    return m.eval()


@pytest.mark.parametrize("policy,batch", [(CachePolicy.deep_forcing(score="mass"), 2),
                                          (CachePolicy.deep_forcing(score="logits", unify_topc_rope=True), 1),
                                          (CachePolicy.deep_sink(), 1)], ids=["pc_mass_b2", "pc_logits", "ds"])
def test_generate_resumed_after_every_block_from_disk(policy, batch, tmp_path):
    """A chain of rollouts, each stopped after one block and resumed from its file by the next, equals the straight
    rollout bit for bit (through the compressions at f0 = 21, 27, per-element Top-C and the cache's bf16 storage)."""
    m, txt = tiny_model(), torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(latent_size=(4, 4), cache_dtype=torch.bfloat16, progress=False, batch_size=batch)
    frames = 33
    straight = generate(m, txt, frames, policy, 7, **kw).run()
    blocks, state = [], None
    for i in range(frames // 3):
        ro = generate(m, txt, frames, policy, 7, resume_from=state, **kw)
        blocks.append(next(ro))
        state = save_load(ro.state_dict(), str(tmp_path / "r.pt"))
        assert state["frames_done"] == 3 * (i + 1)
        del ro
    assert torch.equal(torch.cat(blocks, dim=1), straight)
    with pytest.raises(ValueError):  # a finished run resumed with fewer frames than it already holds
        generate(m, txt, 30, policy, 7, resume_from=state, **kw)


# ---------------------------------------------------------------------------------------------- the command
GEN = [sys.executable, "-m", "deepforcing_kernels", "generate", "--model", "tiny", "--latent-size", "4", "4",
       "--no-progress", "--policy", "deep-forcing", "--seed", "3", "--threads", "1"]


def _env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_killed_generate_keeps_finished_blocks_and_resumes(tmp_path):
    frames = 60
    straight, killed = str(tmp_path / "straight.pt"), str(tmp_path / "killed.pt")
    subprocess.run(GEN + ["--frames", str(frames), "--out", straight], check=True, env=_env(),
                   stdout=subprocess.DEVNULL, timeout=300)
    ref = torch.load(straight, weights_only=True)
    assert ref["complete"] and ref["latents"].shape[0] == frames

    proc = subprocess.Popen(GEN + ["--frames", str(frames), "--out", killed], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshots = 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(killed):
                d = torch.load(killed, weights_only=True)  # never half written: always loads
                snapshots += 1
                if d["frames_done"] >= 9:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert snapshots >= 1
    part = torch.load(killed, weights_only=True)
    done = part["frames_done"]
    assert part["complete"] is False and 9 <= done < frames and done % 3 == 0
    assert part["latents"].shape[0] == done, "the file must hold exactly the finished blocks"
    assert torch.equal(part["latents"], ref["latents"][:done]), "finished blocks differ from the straight run"

    subprocess.run(GEN + ["--frames", str(frames), "--out", killed, "--resume"], check=True, env=_env(),
                   stdout=subprocess.DEVNULL, timeout=300)
    fin = torch.load(killed, weights_only=True)
    assert fin["complete"] and fin["frames_done"] == frames
    assert torch.equal(fin["latents"], ref["latents"])


@pytest.mark.parametrize("policy", [CachePolicy.deep_forcing(8, 2, 6, 2, score="mass", block_frames=1),
                                    CachePolicy.deep_forcing(8, 2, 6, 3, score="logits", block_frames=1),
                                    CachePolicy.deep_sink(6, 2, block_frames=2),
                                    CachePolicy.sliding(5, block_frames=2)],
                         ids=["mass", "logits", "deep_sink", "sliding"])
def test_failure_inside_attention_recovers_from_the_last_state(policy, monkeypatch):
    """The documented recovery: a failure inside the backend (out of memory, Ctrl-C) during a rolling or compressing
    pass may leave the layer half-updated; loading the last state dict (or reset()) makes it exact again."""
    import deepforcing_kernels.cache as cache_mod
    from deepforcing_kernels.schedule import plan_pass

    rope = RopeSpec.wan(16)
    calls = stream_calls(policy, 2, 2, torch.float32, [("new", 0), ("over", 0)] * 16, 11)
    straight = play(make_cache(policy, 2, 2, torch.float32, rope), calls)
    cache = make_cache(policy, 2, 2, torch.float32, rope)
    cut, seen = 0, 0
    while True:  # stop before the second rolling / compressing pass: it will fail half-way
        action = plan_pass(policy, cache.layers[0].state, calls[cut][0]).action
        if action in ("roll", "compress"):
            seen += 1
            if seen == 2:
                break
        play(cache, calls[cut:cut + 1])
        cut += 1
    saved = cache.state_dict()
    real = cache_mod.sink_attention

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "sink_attention", boom)
    with pytest.raises(KeyboardInterrupt):
        play(cache, calls[cut:cut + 1])
    monkeypatch.setattr(cache_mod, "sink_attention", real)
    cache.load_state_dict(saved)
    got = play(cache, calls[cut:])
    for a, b in zip(got, straight[cut:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # reset() forgets the stream entirely: the same stream from the start equals a fresh cache's
    cache.reset()
    again = play(cache, calls)
    for a, b in zip(again, straight):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
