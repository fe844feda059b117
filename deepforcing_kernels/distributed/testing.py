"""Launch P local processes the way ``torchrun`` does (same environment variables), for tests and benchmarks.

``torchrun`` itself adds an agent that restarts or tears down workers; :func:`launch_local` starts the workers
directly, so a test sees exactly how the ranks themselves behave (exit codes, messages, time to exit when a peer
dies) without the agent cleaning up after them.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["RankResult", "free_port", "launch_local"]


@dataclass
class RankResult:
    """One rank's exit: its code (None if it had to be killed at the timeout), output, and wall time."""

    rank: int
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    ended_at: float  # time.time() when the rank was seen to exit


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(nprocs: int, argv: Sequence[str], *, timeout_s: float = 120.0, threads: int = 1,
                 env: Optional[Dict[str, str]] = None, per_rank_env: Optional[Sequence[Dict[str, str]]] = None,
                 per_rank_args: Optional[Sequence[Sequence[str]]] = None, cwd: Optional[str] = None,
                 signal_when: Optional[Tuple[str, int]] = None) -> List[RankResult]:
    """Run ``python argv...`` as ``nprocs`` ranks with ``torchrun``'s variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and ``threads`` intra-op threads each; wait for all of them.

    ``per_rank_env`` / ``per_rank_args`` add variables / trailing arguments rank by rank. ``signal_when=(path,
    signum)`` sends ``signum`` to every rank once ``path`` exists (what Ctrl-C does to a ``torchrun`` job).
    Ranks still running after ``timeout_s`` are killed and reported with ``returncode=None`` (a hang is a
    failure the caller can assert on, never a stuck test).
    """
    port = free_port()
    procs, files = [], []
    t0 = time.perf_counter()
    for r in range(nprocs):
        e = dict(os.environ)
        e.update({"RANK": str(r), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(nprocs),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
                  "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
        if env:
            e.update(env)
        if per_rank_env:
            e.update(per_rank_env[r])
        files.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))  # no pipe to fill up
        extra = list(per_rank_args[r]) if per_rank_args else []
        procs.append(subprocess.Popen([sys.executable, *argv, *extra], env=e, cwd=cwd, stdout=files[-1][0],
                                      stderr=files[-1][1], text=True))
    ends: List[Optional[float]] = [None] * nprocs
    ended_at: List[Optional[float]] = [None] * nprocs
    deadline = t0 + timeout_s
    signalled = False
    while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
        if signal_when is not None and not signalled and os.path.exists(signal_when[0]):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal_when[1])
            signalled = True
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i], ended_at[i] = time.perf_counter() - t0, time.time()
        time.sleep(0.05)
    results = []
    for r, p in enumerate(procs):
        killed = p.poll() is None
        if killed:
            p.kill()
        p.wait()
        out, err = (_read(f) for f in files[r])
        if ends[r] is None:
            ends[r], ended_at[r] = time.perf_counter() - t0, time.time()
        results.append(RankResult(r, None if killed else p.returncode, out, err, float(ends[r]),
                                  float(ended_at[r])))
    return results


def _read(f) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text
