"""Rank set-up, checks across ranks, the data-parallel split, and clean exits.

* :func:`init_from_env` joins the ``torchrun`` process group (NCCL for CUDA, Gloo for CPU) with a timeout, or
  raises :class:`ParallelError` when the environment was not made by ``torchrun``.
* :func:`check_divisible` and :func:`check_same_settings` are the start-up checks; every rank reaches the same
  verdict (the inputs of the verdict are identical on every rank, or all-gathered first), so all ranks raise.
* :func:`split_prompts` gives each rank its share of a prompt list: no prompt twice, none lost.
* :func:`run_ranked` runs a rank's work and turns every failure into one clear line and exit code 1:
  a :class:`ParallelError` (an input error every rank sees) is printed once, by rank 0; a collective that fails
  because another rank died or stopped answering (Gloo sees the closed socket at once; a stuck rank hits the
  process-group timeout) is printed by each surviving rank, naming itself; Ctrl-C / SIGTERM ends a rank with
  exit code 130 without a traceback. Exits go through ``os._exit`` after flushing, so no rank hangs in the
  teardown of a broken process group.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["ParallelError", "RankError", "init_from_env", "torchrun_env", "check_divisible", "check_same_settings",
           "settings_digest", "split_prompts", "run_ranked", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class ParallelError(Exception):
    """An input error that every rank detects alike (printed once, by rank 0)."""


class RankError(Exception):
    """An error of this rank alone (printed by this rank, naming it)."""


def torchrun_env() -> Optional[Dict[str, str]]:
    """The ``torchrun`` variables of this process, or None when it was not started by ``torchrun``."""
    env = {k: os.environ.get(k) for k in _TORCHRUN_VARS}
    return None if any(v is None for v in env.values()) else env  # type: ignore[return-value]


def init_from_env(*, timeout_s: float = DEFAULT_TIMEOUT_S, device: Optional[str] = None,
                  flag: str = "--parallel") -> Dict[str, Any]:
    """Join the process group described by the ``torchrun`` environment.

    Args:
        timeout_s: process-group timeout: a collective that waits longer for another rank fails.
        device: ``"cuda"`` (NCCL, one GPU per local rank) or ``"cpu"`` (Gloo); default CUDA when available.
        flag: the command-line flag named in the error when ``torchrun`` is missing.

    Returns:
        ``{"rank", "world_size", "local_rank", "device", "backend"}``.

    Raises:
        ParallelError: not started by ``torchrun`` (one clear line), or a CUDA device requested but missing.
    """
    env = torchrun_env()
    if env is None:
        raise ParallelError(f"{flag} needs torchrun: run `torchrun --nproc-per-node P -m deepforcing_kernels "
                            f"generate ... {flag} ...` (RANK / WORLD_SIZE / MASTER_ADDR are not set)")
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ParallelError(f"rank {rank} (local rank {local}) has no CUDA device; use --device cpu for Gloo")
        torch.cuda.set_device(local)
        dev, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kw: Dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=float(timeout_s))}
        if backend == "nccl":
            kw["device_id"] = torch.device(dev)
        dist.init_process_group(**kw)
        # Every rank has joined before any can leave: with Gloo, rank 0 can finish its side of the mesh while
        # others still read the rendezvous store it hosts; a start-up check that fails on every rank (heads not
        # divisible, say) then let rank 0 exit and tear the store down under them ("lost contact" and a C++
        # stack trace on ranks that should have printed nothing).
        dist.barrier()
    return {"rank": rank, "world_size": world, "local_rank": local, "device": dev, "backend": backend}


def check_divisible(*, num_heads: int, num_kv_heads: Optional[int], tokens_per_frame: int, world: int) -> None:
    """Sequence-parallel constraints, the same verdict on every rank.

    Raises:
        ParallelError: ``world`` does not divide the (KV) heads or the tokens of a frame.
    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % world or kv % world:
        raise ParallelError(f"--parallel sequence over {world} ranks needs the heads divisible by {world}: "
                            f"the model has {num_heads} heads ({kv} KV heads); use a world size dividing "
                            f"{math.gcd(num_heads, kv)}")
    if tokens_per_frame % world:
        raise ParallelError(f"--parallel sequence over {world} ranks needs the tokens of a frame divisible by "
                            f"{world}: this latent size gives {tokens_per_frame} tokens per frame")


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A sha256 of ``settings`` as canonical JSON (keys sorted; non-JSON values by ``repr``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()


def check_same_settings(settings: Mapping[str, Any], *, group: Optional[Any] = None) -> None:
    """All-gather ``settings`` (plain values: policy, seed, sizes, text digest, ...) and compare them with rank
    0's. Every rank gathers the same list, so every rank raises alike.

    Raises:
        ParallelError: naming the first rank and key that differ.
    """
    world = dist.get_world_size(group)
    mine = {"digest": settings_digest(settings), "settings": dict(settings)}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    ref = gathered[0]
    for r, other in enumerate(gathered):
        if other["digest"] == ref["digest"]:
            continue
        a, b = ref["settings"], other["settings"]
        keys = sorted(set(a) | set(b))
        diff = next((k for k in keys if json.dumps(a.get(k), default=repr) != json.dumps(b.get(k), default=repr)),
                    None)
        raise ParallelError(f"settings differ across ranks: rank {r} has {diff}={b.get(diff)!r}, rank 0 has "
                            f"{diff}={a.get(diff)!r}; every rank must run the same command")


def split_prompts(items: Sequence[T], rank: int, world: int) -> List[T]:
    """Rank ``rank``'s contiguous share of ``items``: sizes differ by at most one, the first ``len % world``
    ranks take one more; the shares are disjoint and cover every item, in order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    n = len(items)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (1 if rank < extra else 0)])


def _exit(code: int) -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:  # noqa: BLE001 - closed pipe
            pass
    os._exit(code)


def _is_comm_failure(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "connection closed", "connection reset", "timed out", "timeout", "gloo", "nccl", "broken pipe",
        "socket", "peer"))


def run_ranked(fn: Callable[[], int], *, rank: int, world: int, prog: str = "deepforcing") -> None:
    """Run ``fn`` on this rank and exit the process with its code; never returns.

    * :class:`ParallelError` / :class:`SystemExit` with a message: rank 0 prints ``prog: error: <message>``
      (other ranks stay silent), exit code 1; a :class:`RankError` is printed by its rank;
    * a failed collective (another rank died, or the process-group timeout passed): every surviving rank prints
      ``prog: error: rank R: lost contact with another rank ...``, exit code 1;
    * Ctrl-C or SIGTERM (what ``torchrun`` sends when it stops a job): exit code 130, one line on rank 0;
    * anything else: the rank prints ``prog: error: rank R: <type>: <message>``, exit code 1.
    """
    def _term(signum, frame):  # torchrun stops workers with SIGTERM: unwind like Ctrl-C
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread
        pass
    code = 1
    try:
        code = int(fn() or 0)
    except ParallelError as e:
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
    except RankError as e:
        print(f"{prog}: error: rank {rank}: {e}", file=sys.stderr)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        elif rank == 0:
            print(f"{prog}: error: {e.code}", file=sys.stderr)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{prog}: interrupted: stopping all {world} ranks", file=sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001 - turned into one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _is_comm_failure(e):
            print(f"{prog}: error: rank {rank}: lost contact with another rank (it failed, was killed or timed out)"
                  f": {first[:300]}", file=sys.stderr)
        else:
            print(f"{prog}: error: rank {rank}: {type(e).__name__}: {first[:300]}", file=sys.stderr)
    _exit(code)
