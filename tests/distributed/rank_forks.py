"""The client of ``distributed_worker.py serve``: launches of the worker's scenarios whose ranks are forked from
one warm interpreter instead of each starting its own (see the fork server there for why).

:meth:`RankForks.launch` answers what :func:`deepforcing_kernels.distributed.testing.launch_local` answers
(the same :class:`RankResult` per rank: exit code, None when killed at the timeout, stdout, stderr, wall time,
time of exit) and sets the same torchrun variables. Only the worker's scenarios go through it: the command-line
tests start real interpreters (``python -m deepforcing_kernels``), since how that command starts is part of
what they test.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from deepforcing_kernels.distributed.testing import RankResult, free_port

__all__ = ["RankForks"]


class RankForks:
    """One fork server (``python WORKER serve``), started on the first launch, stopped by :meth:`close`."""

    def __init__(self, worker: str, env: Dict[str, str]) -> None:
        self.worker, self.env = worker, env
        self.proc: Optional[subprocess.Popen] = None
        self.log = tempfile.TemporaryFile("w+")

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **self.env)
            self.proc = subprocess.Popen([sys.executable, self.worker, "serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        return self.proc

    def launch(self, nprocs: int, argv: Sequence[str], *, timeout_s: float = 120.0,
               env: Optional[Dict[str, str]] = None) -> List[RankResult]:
        """Run the scenario ``argv`` (name, then its arguments) on ``nprocs`` forked ranks; wait for all."""
        return self.launch_many([(nprocs, argv, timeout_s, env)])[0]

    def launch_many(self, launches: Sequence[Tuple[int, Sequence[str], float, Optional[Dict[str, str]]]]) \
            -> List[List[RankResult]]:
        """Several ``(nprocs, argv, timeout_s, env)`` launches side by side (each its own process group and port);
        wait for every rank of all of them."""
        proc = self._start()
        folders = [tempfile.mkdtemp(prefix="rank_forks") for _ in launches]
        try:
            reqs = [{"nprocs": n, "argv": list(argv), "timeout_s": t, "dir": d,
                     "env": {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(free_port()), **(env or {})}}
                    for (n, argv, t, env), d in zip(launches, folders)]
            proc.stdin.write(json.dumps(reqs) + "\n")
            proc.stdin.flush()
            # the server kills ranks at their timeout and then answers; the margin covers only its own failure
            ready, _, _ = select.select([proc.stdout], [], [], max(r["timeout_s"] for r in reqs) + 60.0)
            line = proc.stdout.readline() if ready else ""
            if not line:
                self.close()
                self.log.seek(0)
                raise RuntimeError(f"the fork server did not answer:\n{self.log.read()[-4000:]}")
            return [[RankResult(e["rank"], e["returncode"], _read(d, e["rank"], "out"), _read(d, e["rank"], "err"),
                                e["seconds"], e["ended_at"]) for e in exits]
                    for exits, d in zip(json.loads(line), folders)]
        finally:
            for d in folders:
                shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _read(folder: str, rank: int, name: str) -> str:
    try:
        with open(os.path.join(folder, f"{rank}.{name}")) as f:
            return f.read()
    except FileNotFoundError:  # the child died before it opened its files
        return ""
