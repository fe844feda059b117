"""Sequence parallelism over Gloo on CPU with real processes (2 and 3 ranks, launched with torchrun's environment).

* the all-to-alls against the single-process slices (bit-exact), the rank-ordered Top-C reducer;
* whole rollouts, tiny Wan models with 2 heads (P = 2) and 6 heads (P = 3), for deep_forcing (mass and logits),
  deep_sink and sliding: latents equal to the single-process run within 1e-5 (fp32; see below), identical
  Top-C reductions and cache layouts on every rank at every block, K/V bytes per rank = 1/P, resume exact;
* the command line: `generate --parallel sequence` (then `--resume`) equals the single-process run, `--parallel
  data` splits prompts; bad input (P not dividing the heads, settings differing across ranks, no torchrun): one
  line on rank 0, exit code 1 on every rank; a killed or stuck rank ends the others within the timeout.

Why a tolerance and not bit-exactness: every rank runs the same kernels on fewer rows (GEMMs) and fewer heads
(attention), which is bit-exact on this CPU build in practice (the measured max difference is printed: 0), but
the Top-C score is summed in another order (per rank over its heads, then across ranks in rank order, instead
of over all heads at once), so the scores may differ in the last float32 bit, and a near-tie could then select
another token. The latents are compared at 1e-5 (absolute and relative); the selections across ranks are exact.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rank_forks import RankForks

from deepforcing_kernels.distributed.launch import ParallelError, check_divisible, split_prompts
from deepforcing_kernels.distributed.testing import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEN = ["-m", "deepforcing_kernels", "generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress"]
ALL_POLICIES = ["deep_forcing_mass", "deep_forcing_logits", "deep_sink", "sliding", "rolling_sink", "memrope",
                "tethercache", "rolling_sink_commit", "deep_forcing_commit"]


def _env(extra=None):
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def forks():
    """The worker's scenarios run on ranks forked from one warm interpreter (rank_forks.py: the import of torch and
    torch._dynamo, seconds a rank, paid once for the module instead of once per rank)."""
    server = RankForks(WORKER, _env())
    yield server
    server.close()


def _run(forks, nprocs, *args, timeout_s=150.0, env=None):
    return forks.launch(nprocs, args, timeout_s=timeout_s, env=env)


def _cli(nprocs, *args, timeout_s=150.0, per_rank_args=None):
    return launch_local(nprocs, GEN + list(args), timeout_s=timeout_s, env=_env(), per_rank_args=per_rank_args)


def _wait_from(r):
    return float(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("WAIT_FROM")))


def _explain(res):
    return "\n".join(f"--- rank {r.rank} rc={r.returncode} ({r.seconds:.1f}s)\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
                     for r in res)


def _single_process_run(argv):
    """``deepforcing`` with ``argv`` in a fresh interpreter, which must not import the distributed package nor
    initialise torch.distributed (the single-process path pays nothing for it)."""
    code = ("import sys, torch\n"
            "from deepforcing_kernels.cli import main\n"
            f"assert main({list(argv)!r}) == 0\n"
            "assert not [m for m in sys.modules if m.startswith('deepforcing_kernels.distributed')]\n"
            "assert not torch.distributed.is_initialized()\n")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **_env()), capture_output=True, text=True,
                       timeout=150)
    assert p.returncode == 0, p.stderr


def _ok(res, marker):
    assert all(r.returncode == 0 and marker in r.stdout for r in res), _explain(res)


# ------------------------------------------------------------------------------------------ real processes
GEOMETRIES = [(2, 2), (3, 6)]  # (ranks, heads of the tiny model)


@pytest.fixture(scope="module")
def sequence_parallel_runs(forks):
    """``(nprocs, heads)`` -> the ranks of one launch of everything that passes at that geometry (the collectives,
    the checks, the rollouts of ALL_POLICIES and of head jitter), made on first use for every geometry at once:
    the four tests below share them, and the two launches run side by side (their ranks wait on each other's
    collectives about half the time, so together they fill the two cores)."""
    runs = {}

    def get(nprocs, heads):
        if not runs:
            args = [*ALL_POLICIES, "deep_sink_jitter"]
            res = forks.launch_many([(n, ["all", str(h), *args], 300.0, None) for n, h in GEOMETRIES])
            runs.update(zip(GEOMETRIES, res))
        return runs[nprocs, heads]

    return get


@pytest.mark.parametrize("nprocs, heads", GEOMETRIES)
def test_sequence_parallel_matches_single_process(nprocs, heads, sequence_parallel_runs):
    res = sequence_parallel_runs(nprocs, heads)
    _ok(res, "OK rollout")
    _ok(res, "OK comm")
    for name in ALL_POLICIES:  # each policy's line comes after its checks passed
        assert f"{name}: P={nprocs} heads={heads} " in res[0].stdout, _explain(res)
    print(res[0].stdout)


@pytest.mark.parametrize("nprocs, heads", GEOMETRIES)
def test_sequence_parallel_head_jitter_matches_single_process(nprocs, heads, sequence_parallel_runs):
    """LoL's head jitter under Ulysses: each rank rotates and re-phases its heads with their one-process scales."""
    res = sequence_parallel_runs(nprocs, heads)
    _ok(res, "OK rollout")
    assert f"deep_sink_jitter: P={nprocs} heads={heads} " in res[0].stdout, _explain(res)


SP_ARGS = ["--policy", "deep-forcing", "--seed", "4", "--save-every-s", "0"]


def _copy_run(src, dst):
    """A test's own copy of a shared first run (its files and parts folders): it may resume or damage it."""
    shutil.copytree(src, dst, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def sp_first_run(tmp_path_factory):
    """The 6-frame sequence-parallel run (deep_forcing, a state saved at every block) that the two resume tests
    below continue, each from its own copy: one launch of two rank interpreters for both."""
    folder = tmp_path_factory.mktemp("sp_first")
    return folder, _cli(2, *SP_ARGS, "--frames", "6", "--out", str(folder / "sp.pt"), "--parallel", "sequence")


@pytest.fixture(scope="module")
def dp_first_run(tmp_path_factory):
    """The data-parallel run of 3 prompts (the rows of a seeded text tensor) over 2 ranks, 6 frames each, that the
    split test checks and the refused resume continues from its own copy: one launch for both."""
    folder = tmp_path_factory.mktemp("dp_first")
    text = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    torch.save({"text_embeds": text}, folder / "text.pt")
    res = _cli(2, "--policy", "sliding", "--frames", "6", "--text-embeds", str(folder / "text.pt"),
               "--out", str(folder / "dp.pt"), "--parallel", "data")
    return folder, text, res


def test_cli_sequence_parallel_run_and_resume_equal_the_single_run(tmp_path, sp_first_run):
    from deepforcing_kernels.runio import load_run

    first, res = sp_first_run
    _copy_run(first, tmp_path)
    out, ref = str(tmp_path / "sp.pt"), str(tmp_path / "ref.pt")
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    assert "on 2 ranks (sequence parallel)" in res[0].stdout and res[1].stdout.strip() == "", _explain(res)
    assert {f for f in os.listdir(out + ".d") if f.startswith("state.rank")} == \
        {"state.rank0-of-2.pt", "state.rank0-of-2.prev.pt", "state.rank1-of-2.pt", "state.rank1-of-2.prev.pt"}
    res = _cli(2, *SP_ARGS, "--frames", "12", "--out", out, "--parallel", "sequence", "--resume")
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    assert "resuming" in res[0].stderr and "from frame 6 on 2 ranks" in res[0].stderr, _explain(res)
    _single_process_run(GEN[2:] + SP_ARGS + ["--frames", "12", "--out", ref, "--threads", "1"])
    a, b = load_run(out)["latents"], load_run(ref)["latents"]
    assert a.shape == b.shape == (12, 4, 4, 4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # (compressions with resume: the rollout tests)


@pytest.mark.slow
def test_cli_resume_refuses_a_damaged_shard(tmp_path, sp_first_run):
    first, res = sp_first_run  # (which policy ran does not matter: the shards are checked before any frame)
    _copy_run(first, tmp_path)
    out = str(tmp_path / "sp.pt")
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    for p in ("state.rank1-of-2.pt", "state.rank1-of-2.prev.pt"):  # both generations of rank 1's state
        with open(os.path.join(out + ".d", p), "wb") as f:
            f.write(b"not a torch file")
    res = _cli(2, *SP_ARGS, "--frames", "9", "--out", out, "--parallel", "sequence", "--resume")
    assert [r.returncode for r in res] == [1, 1], _explain(res)
    lines = res[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0] and "state.rank1-of-2.pt: unreadable" in lines[0], \
        _explain(res)
    assert res[1].stderr.strip() == "", _explain(res)


def test_cli_data_parallel_splits_prompts(tmp_path, dp_first_run):
    from deepforcing_kernels.cli import main
    from deepforcing_kernels.runio import load_run

    first, text, res = dp_first_run
    _copy_run(first, tmp_path)
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    assert "prompts [0, 1]" in res[0].stdout and "prompts [2]" in res[1].stdout, _explain(res)
    for i in range(3):
        one = str(tmp_path / f"one{i}.pt")
        torch.save({"text_embeds": text[i]}, one)
        ref = str(tmp_path / f"ref{i}.pt")
        assert main(GEN[2:] + ["--policy", "sliding", "--frames", "6", "--text-embeds", one, "--out", ref,
                               "--threads", "1"]) == 0
        assert torch.equal(load_run(str(tmp_path / f"dp.p{i:04d}.pt"))["latents"], load_run(ref)["latents"])


def test_cli_data_parallel_prompt_file_one_mp4_each(tmp_path):
    """--parallel data with --prompt-file: 3 prompts over 2 ranks, each mp4 written once, by its rank."""
    av = pytest.importorskip("av")
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red fox\na blue whale\na green tree\n")
    out = str(tmp_path / "dp.mp4")
    res = _cli(2, "--policy", "sliding", "--frames", "6", "--prompt-file", str(pf), "--out", out, "--parallel", "data")
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    assert "prompts [0, 1]" in res[0].stdout and "prompts [2]" in res[1].stdout, _explain(res)
    for i in range(3):
        with av.open(str(tmp_path / f"dp_{i:03d}.mp4")) as c:
            assert sum(1 for _ in c.decode(c.streams.video[0])) == 21


@pytest.mark.slow
def test_cli_data_parallel_never_resumes_with_another_prompt(tmp_path, dp_first_run):
    first, text, res = dp_first_run  # 6 frames of each prompt done, from text.pt
    _copy_run(first, tmp_path)
    tpath, out = str(tmp_path / "text.pt"), str(tmp_path / "dp.pt")
    args = ["--policy", "sliding", "--text-embeds", tpath, "--out", out, "--parallel", "data"]
    assert [r.returncode for r in res] == [0, 0], _explain(res)
    torch.save({"text_embeds": text.flip(0)}, tpath)  # another prompt list: each rank names its changed prompt
    res = _cli(2, *args, "--frames", "9", "--resume")
    assert [r.returncode for r in res] == [1, 1], _explain(res)
    for r, i in ((res[0], 0), (res[1], 2)):
        assert f"rank {r.rank}: prompt {i}: " in r.stderr and "holds other text embeddings" in r.stderr, _explain(res)


@pytest.mark.parametrize("case", ["heads", "settings", "timeout", "flag"])
def test_cli_bad_input_one_line_on_rank_0_every_rank_exits_1(tmp_path, case):
    out = str(tmp_path / "x.pt")
    if case == "heads":  # the tiny model has 2 heads
        res = _cli(3, "--frames", "6", "--out", out, "--parallel", "sequence")
        needle = "needs the heads divisible by 3: the model has 2 heads"
    elif case == "timeout":  # refused by the parser, before the ranks meet: every rank finds it, rank 0 says it
        res = _cli(2, "--frames", "6", "--out", out, "--parallel", "sequence", "--dist-timeout", "-1")
        needle = "argument --dist-timeout: -1 is out of range"
    elif case == "flag":
        res = _cli(2, "--frames", "6", "--out", out, "--parallel", "sequence", "--no-such-flag")
        needle = "unrecognized arguments: --no-such-flag"
    else:
        res = _cli(2, "--frames", "6", "--out", out, "--parallel", "sequence",
                   per_rank_args=[["--seed", "0"], ["--seed", "7"]])
        needle = "settings differ across ranks: rank 1 has seed=7, rank 0 has seed=0"
    assert all(r.returncode == 1 for r in res), _explain(res)
    lines = res[0].stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("deepforcing generate: error:"), \
        _explain(res)
    assert all(r.stderr.strip() == "" for r in res[1:]) and not os.path.exists(out), _explain(res)


def test_killed_rank_makes_the_others_exit_with_a_clear_error(forks):
    res = _run(forks, 3, "kill", env={"DF_TEST_TIMEOUT": "20"}, timeout_s=100.0)
    assert res[1].returncode == -9, _explain(res)
    for r in (res[0], res[2]):
        assert r.returncode == 1, _explain(res)
        assert f"rank {r.rank}: lost contact with another rank" in r.stderr and "Traceback" not in r.stderr, \
            _explain(res)
        # well within the 20 s process-group timeout: Gloo sees the closed socket
        assert r.ended_at - _wait_from(r) < 10, _explain(res)


@pytest.mark.slow
def test_stuck_rank_times_out_instead_of_hanging(forks):
    res = _run(forks, 2, "stuck", env={"DF_TEST_TIMEOUT": "3"}, timeout_s=60.0)  # a live rank that stops answering
    assert res[0].returncode == 1 and "rank 0: lost contact with another rank" in res[0].stderr, _explain(res)
    # the 3 s timeout ends rank 0 while rank 1 is still asleep (until rank 0 has ended, 9 s at most)
    assert res[0].ended_at - _wait_from(res[0]) < 8 and res[0].ended_at < res[1].ended_at, _explain(res)


@pytest.mark.slow
def test_all_to_alls_trace_into_one_compiled_graph(forks):
    _ok(_run(forks, 2, "compile"), "OK compile")


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_frame_and_resumes(tmp_path):
    import signal

    from deepforcing_kernels.runio import load_run

    out = str(tmp_path / "long.pt")
    args = ["--policy", "sliding", "--out", out, "--parallel", "sequence"]
    res = launch_local(2, GEN + args + ["--frames", "3000"], timeout_s=150.0, env=_env(),
                       signal_when=(out, signal.SIGINT))  # Ctrl-C reaches every rank once the run has begun
    assert [r.returncode for r in res] == [130, 130], _explain(res)
    assert "stopped at frame" in res[0].stderr and "on all 2 ranks" in res[0].stderr, _explain(res)
    assert "Traceback" not in res[0].stderr + res[1].stderr and res[1].stderr.strip() == "", _explain(res)
    done = [torch.load(os.path.join(out + ".d", f"state.rank{r}-of-2.pt"), weights_only=True)["frames_done"]
            for r in range(2)]
    assert done[0] == done[1] and done[0] % 3 == 0 and done[0] < 3000, done
    res = _cli(2, *args, "--frames", str(done[0] + 3), "--resume")
    assert [r.returncode for r in res] == [0, 0] and f"from frame {done[0]} on 2 ranks" in res[0].stderr, \
        _explain(res)
    assert load_run(out)["latents"].shape[0] == done[0] + 3


# ------------------------------------------------------------------------------------------ in process
def test_parallel_without_torchrun_is_one_line(capsys, monkeypatch):
    from deepforcing_kernels.cli import main

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    for mode in ("sequence", "data"):
        assert main(GEN[2:] + ["--frames", "6", "--parallel", mode]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--parallel {mode} needs torchrun" in err[0], err


def test_divisibility_checks():
    check_divisible(num_heads=12, num_kv_heads=12, tokens_per_frame=1560, world=4)
    with pytest.raises(ParallelError, match="heads divisible by 8"):
        check_divisible(num_heads=12, num_kv_heads=12, tokens_per_frame=1560, world=8)
    with pytest.raises(ParallelError, match="heads divisible by 4: the model has 8 heads \\(2 KV heads\\)"):
        check_divisible(num_heads=8, num_kv_heads=2, tokens_per_frame=16, world=4)
    with pytest.raises(ParallelError, match="tokens of a frame divisible by 7"):
        check_divisible(num_heads=14, num_kv_heads=None, tokens_per_frame=1560, world=7)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_prompts_covers_everything_once(n, world):
    items = [f"p{i}" for i in range(n)]
    shares = [split_prompts(items, r, world) for r in range(world)]
    assert sum(shares, []) == items  # disjoint, complete, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        split_prompts(items, world, world)
