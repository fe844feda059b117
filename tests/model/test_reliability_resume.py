"""Reliability: resuming streams exactly.

* StreamingKVCache: hypothesis picks a policy, a geometry (2 layers, GQA, fp32 / bf16), a call sequence (new blocks,
  extra passes of a block, jumps) and cut points; at each cut the state_dict goes to disk with torch.save, comes back
  with torch.load(weights_only=True) and is loaded into a fresh cache (or one busy with another stream). The
  resumed stream must give bit-identical outputs and end in a bit-identical state; a state can be loaded twice to
  replay (rewind) the same continuation.
* generate(..., resume_from=...): a chain of rollouts, each resumed from the file the previous one saved after one
  block, equals the uninterrupted rollout bit for bit, across compressions, in a bf16 cache.
* `deepforcing generate` killed with SIGKILL mid-run: the run on disk always loads and holds every finished block
  (equal to the straight run's), and --resume finishes it identically; SIGINT / SIGTERM save the state after the
  block in progress; --resume after a failure mid-block continues from the last saved state, or with none saved
  from frame 0 (checking the blocks on disk); single-file runs of earlier versions are resumed and converted.
"""
import dataclasses
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import policies, state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.cli import main as cli_main
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig
from deepforcing_kernels.runio import RunError, load_run, parts_dir

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
                                          (CachePolicy.deep_sink(), 1),
                                          (CachePolicy.rolling_sink(9, frame_tokens=None), 2),
                                          (CachePolicy.memrope(), 2),
                                          (CachePolicy.tethercache(), 2)],
                         ids=["pc_mass_b2", "pc_logits", "ds", "rolling_sink_b2", "memrope_b2", "tethercache_b2"])
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
GEN_ARGS = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--policy", "deep-forcing",
            "--seed", "3", "--threads", "1", "--device", "cpu"]
GEN = [sys.executable, "-m", "deepforcing_kernels", *GEN_ARGS]  # a run in its own process (to kill or signal)
FRAMES = 60


def _env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _resume_in_process(out, capsys):
    """``--resume`` of the run at ``out``, in this process (the run to kill or signal needs its own; the one that
    finishes it does not, and an interpreter start costs more than the rollout): (exit code, stderr)."""
    capsys.readouterr()
    code = cli_main(GEN_ARGS + ["--frames", str(FRAMES), "--out", out, "--resume"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "straight.pt")
    assert cli_main(GEN_ARGS + ["--frames", str(FRAMES), "--out", out]) == 0  # in process: the same rollout
    ref = load_run(out)
    assert ref["complete"] and ref["latents"].shape[0] == FRAMES
    return ref["latents"]


def _run_until(argv, out, frames_at_least, deadline_s=240):
    """Start `argv`; poll the run on disk (every state it shows must load) until it holds `frames_at_least`."""
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out):
            try:
                run = load_run(out)  # never half written
            except RunError as e:  # pragma: no cover - the failure this test exists for
                proc.kill()
                raise AssertionError(f"the run on disk is damaged while it runs: {e}")
            seen += 1
            if run["frames_done"] >= frames_at_least:
                return proc, seen
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run finished (or hung) before it could be interrupted: make it longer")


def _no_temporaries(out):
    d = os.path.dirname(out)
    return [f for f in os.listdir(d) + os.listdir(parts_dir(out)) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_killed_generate_keeps_finished_blocks_and_resumes(straight_run, tmp_path, capsys):
    killed = str(tmp_path / "killed.pt")
    proc, seen = _run_until(GEN + ["--frames", str(FRAMES), "--out", killed, "--save-every-s", "0.3"], killed, 9)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert seen >= 1
    part = load_run(killed)
    done = part["frames_done"]
    assert part["complete"] is False and 9 <= done < FRAMES and done % 3 == 0
    assert torch.equal(part["latents"], straight_run[:done]), "finished blocks differ from the straight run"
    # a SIGKILL during a save leaves a temporary behind: the next start removes it
    stale = os.path.join(parts_dir(killed), ".tmp-state.pt-deadbeef")
    open(stale, "wb").close()
    code, err = _resume_in_process(killed, capsys)
    assert code == 0, err
    assert "removed" in err and ".tmp-state.pt-deadbeef" in err
    fin = load_run(killed)
    assert fin["complete"] and fin["frames_done"] == FRAMES
    assert torch.equal(fin["latents"], straight_run)
    assert _no_temporaries(killed) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_state_after_the_block_and_resume_is_bit_for_bit(sig, straight_run, tmp_path, capsys):
    """The default budget (60 s) saves no state during a short run; SIGINT / SIGTERM finish the block in progress,
    save the state and exit 128 + signal; --resume continues from exactly there."""
    out = str(tmp_path / "sig.pt")
    old = os.umask(0o022)
    try:
        proc, _ = _run_until(GEN + ["--frames", str(FRAMES), "--out", out], out, 9)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        os.umask(old)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "state saved" in err
    part = load_run(out, with_state=True)
    assert part["state_frames"] == part["frames_done"] and part["frames_done"] < FRAMES
    assert torch.equal(part["latents"], straight_run[:part["frames_done"]])
    for d, _, files in os.walk(tmp_path):  # the umask is honoured (0644), never mkstemp's 0600
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o644, f
    code, err = _resume_in_process(out, capsys)
    assert code == 0, err
    assert f"from the state saved at frame {part['frames_done']}" in err
    fin = load_run(out)
    assert fin["complete"] and torch.equal(fin["latents"], straight_run)


# ---------------------------------------------------------------------------------------------- in process
CLI = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--policy", "deep-forcing",
       "--seed", "3", "--device", "cpu", "--frames", "27"]


def _interrupt_at(monkeypatch, block_index):
    import deepforcing_kernels.driver as driver

    real, calls = driver.Rollout._block, []

    def interrupted(self, f0, *rest):
        calls.append(f0)
        if len(calls) == block_index + 1:
            raise KeyboardInterrupt  # mid-block: the cache is half updated, nothing of this block is saved
        return real(self, f0, *rest)

    monkeypatch.setattr(driver.Rollout, "_block", interrupted)


@pytest.fixture(scope="module")
def straight_27(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s27") / "s.pt")
    assert cli_main(CLI + ["--out", out]) == 0
    return load_run(out)["latents"]


@pytest.mark.parametrize("budget,expect", [("0", "from the state saved at frame 12"),
                                           ("1000", "restarting from frame 0")], ids=["state", "no_state"])
def test_resume_after_a_mid_block_failure(budget, expect, straight_27, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.pt")
    _interrupt_at(monkeypatch, 4)
    assert cli_main(CLI + ["--out", out, "--save-every-s", budget]) == 130
    monkeypatch.undo()
    part = load_run(out)
    assert part["frames_done"] == 12 and not part["complete"]
    assert part["state_frames"] == (12 if budget == "0" else 0)
    capsys.readouterr()
    assert cli_main(CLI + ["--out", out, "--resume"]) == 0
    err = capsys.readouterr().err
    assert expect in err and "differ" not in err
    assert torch.equal(load_run(out)["latents"], straight_27)


def test_resume_replaces_a_regenerated_block_that_differs_and_says_so(straight_27, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.pt")
    _interrupt_at(monkeypatch, 5)
    assert cli_main(CLI + ["--out", out]) == 130  # no state: the resume regenerates 0..14 and checks them
    monkeypatch.undo()
    p = os.path.join(parts_dir(out), "latents-00000006.pt")
    blk = torch.load(p, weights_only=True)
    blk["latents"] = blk["latents"] + 1
    torch.save(blk, p)
    capsys.readouterr()
    assert cli_main(CLI + ["--out", out, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "differ" in err and "[6]" in err
    assert torch.equal(load_run(out)["latents"], straight_27)


def test_resume_of_a_single_file_run_of_earlier_versions(straight_27, tmp_path, capsys):
    """Runs written before the block layout (one .pt with latents + state) are resumed and converted."""
    import deepforcing_kernels.commands.generate as gen

    m = gen.build_model("tiny", None, 3)
    text = gen.random_text_embeds(m.config, 3)
    ro = generate(m, text, 27, CachePolicy.deep_forcing(), 3, latent_size=(4, 4), progress=False)
    blocks = [next(ro) for _ in range(3)]
    settings = {"model": "tiny", "checkpoint": None, "text_embeds": None, "policy": "deep-forcing", "score": None,
                "seed": 3, "batch_size": 1, "latent_size": [4, 4], "dtype": "float32", "cache_dtype": "float32",
                "backend": "auto", "frames": 27}
    out = str(tmp_path / "old.pt")
    torch.save({"latents": torch.cat(blocks, 1)[0], "settings": settings, "frames_done": 9, "complete": False,
                "state": ro.state_dict()}, out)
    assert load_run(out)["layout"] == "single-file"
    assert cli_main(CLI + ["--out", out, "--resume"]) == 0
    assert "converted" in capsys.readouterr().err
    run = load_run(out)
    assert run["layout"] == "blocks" and torch.equal(run["latents"], straight_27)



@pytest.mark.parametrize("policy", [CachePolicy.deep_forcing(8, 2, 6, 2, score="mass", block_frames=1),
                                    CachePolicy.deep_forcing(8, 2, 6, 3, score="logits", block_frames=1),
                                    CachePolicy.deep_sink(6, 2, block_frames=2),
                                    CachePolicy.sliding(5, block_frames=2)],
                         ids=["mass", "logits", "deep_sink", "sliding"])
def test_failure_inside_attention_recovers_from_the_last_state(policy, monkeypatch):
    """The documented recovery: a failure inside the backend (out of memory, Ctrl-C) during a rolling or compressing
    pass may leave the layer half-updated; loading the last state dict (or reset()) makes it exact again."""
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
    real = cache.backend_impl

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "backend_impl", dataclasses.replace(real, run=boom))  # the backend fails mid-pass
    with pytest.raises(KeyboardInterrupt):
        play(cache, calls[cut:cut + 1])
    monkeypatch.setattr(cache, "backend_impl", real)
    cache.load_state_dict(saved)
    got = play(cache, calls[cut:])
    for a, b in zip(got, straight[cut:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # reset() forgets the stream entirely: the same stream from the start equals a fresh cache's
    cache.reset()
    again = play(cache, calls)
    for a, b in zip(again, straight):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
