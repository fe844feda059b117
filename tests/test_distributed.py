"""Sequence-parallel building blocks over Gloo on CPU (2 and 3 real processes): the all-to-alls against the
single-process slices, the deterministic Top-C reducer, the start-up checks, and rank failure."""
import os
import sys

import pytest

from deepforcing_kernels.distributed.launch import split_prompts
from deepforcing_kernels.distributed.testing import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(nprocs, *args, timeout_s=90.0, env=None):
    env = dict(env or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return launch_local(nprocs, [WORKER, *args], timeout_s=timeout_s, env=env)


def _wait_from(r):
    return float(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("WAIT_FROM")))


def _explain(res):
    return "\n".join(f"--- rank {r.rank} rc={r.returncode} ({r.seconds:.1f}s)\n{r.stdout}\n{r.stderr[-3000:]}"
                     for r in res)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_all_to_all_and_reducer_match_single_process(nprocs):
    res = _run(nprocs, "comm")
    assert all(r.returncode == 0 and "OK comm" in r.stdout for r in res), _explain(res)


@pytest.mark.parametrize("kind, needle", [("heads", "needs the heads divisible by 2"),
                                          ("tokens", "tokens of a frame divisible by 2"),
                                          ("settings", "settings differ across ranks: rank 1 has seed=7")])
def test_bad_input_one_line_on_rank_0_every_rank_exits_1(kind, needle):
    res = _run(2, "checks", kind)
    assert [r.returncode for r in res] == [1, 1], _explain(res)
    lines = res[0].stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("deepforcing: error:"), _explain(res)
    assert res[1].stderr.strip() == "" and "Traceback" not in res[0].stderr, _explain(res)


def test_checks_pass_when_consistent():
    res = _run(2, "checks", "ok")
    assert all(r.returncode == 0 and "OK checks" in r.stdout for r in res), _explain(res)


def test_killed_rank_makes_the_others_exit_with_a_clear_error():
    res = _run(3, "kill", env={"DF_TEST_TIMEOUT": "20"}, timeout_s=100.0)
    assert res[1].returncode == -9, _explain(res)
    for r in (res[0], res[2]):
        assert r.returncode == 1, _explain(res)
        assert f"rank {r.rank}: lost contact with another rank" in r.stderr and "Traceback" not in r.stderr, \
            _explain(res)
    # the survivors leave well within the 20 s process-group timeout (Gloo sees the closed socket)
    for r in (res[0], res[2]):
        assert r.ended_at - _wait_from(r) < 10, _explain(res)


def test_stuck_rank_times_out_instead_of_hanging():
    res = _run(2, "stuck", env={"DF_TEST_TIMEOUT": "3"}, timeout_s=60.0)
    assert res[0].returncode == 1 and "rank 0: lost contact with another rank" in res[0].stderr, _explain(res)
    # the 3 s timeout ends rank 0 while rank 1 is still asleep (9 s)
    assert res[0].ended_at - _wait_from(res[0]) < 8 and res[0].ended_at < res[1].ended_at, _explain(res)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_prompts_covers_everything_once(n, world):
    items = [f"p{i}" for i in range(n)]
    shares = [split_prompts(items, r, world) for r in range(world)]
    assert sum(shares, []) == items  # disjoint, complete, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        split_prompts(items, world, world)
