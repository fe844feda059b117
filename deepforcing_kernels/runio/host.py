"""The host: memory for state snapshots (tensors copied to reusable CPU buffers, the allocator told to keep freed
pages), what the CPU is (model name and feature flags, read once), and the priority of background threads."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, FrozenSet, List, Optional, Tuple

import torch

__all__ = ["to_cpu", "retain_freed_host_memory", "limit_malloc_arenas", "return_freed_host_memory", "cpu_facts",
           "lower_thread_priority", "WRITER_NICE"]


@functools.lru_cache(maxsize=1)
def cpu_facts() -> Tuple[str, FrozenSet[str]]:
    """``(model name, feature flags)`` of the first processor in ``/proc/cpuinfo`` (lower-case flags such as
    ``avx512f``, ``amx_bf16``); ``("", frozenset())`` where that file cannot be read (not Linux)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                low = line.lower()
                if low.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif low.startswith("flags"):
                    flags = frozenset(low.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def to_cpu(obj: Any, pool: Optional[List[torch.Tensor]] = None) -> Any:
    """``obj`` with every tensor on the CPU (tensors already there are returned as they are).

    With ``pool`` (a list kept by the caller between calls), device tensors are copied into host buffers that are
    reused from one call to the next (pinned when CUDA is available): a 6 GB state then costs one device-to-host
    copy, not a fresh 6 GB allocation whose page faults cost several times more. The caller must not reuse the
    pool before it is done with the previous result.
    """
    used = [0]

    def host(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu":
            return t
        if pool is None:
            return t.cpu()
        i = used[0]
        used[0] += 1
        if i >= len(pool) or pool[i].shape != t.shape or pool[i].dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            if i >= len(pool):
                pool.append(buf)
            else:
                pool[i] = buf
        pool[i].copy_(t, non_blocking=True)
        return pool[i]

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return host(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    out = walk(obj)
    if pool is not None and used[0] and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies are complete before anyone reads the buffers
    return out


def retain_freed_host_memory(limit_bytes: int = 1 << 34) -> bool:
    """Ask glibc to serve large allocations from its heap and keep freed memory (``mallopt``): repeated
    multi-GB snapshots (``state_dict()`` clones on the CPU) then reuse pages instead of faulting fresh ones in
    (measured 0.8 GB/s with faults vs about 8 GB/s without, on the development machine). Process-wide, so only
    the ``deepforcing generate`` command calls it; returns False where mallopt is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, min(limit_bytes, 1 << 30)) == 1
        return bool(ok and libc.mallopt(m_trim_threshold, limit_bytes) == 1)
    except (OSError, AttributeError):
        return False


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``): every thread that allocates may otherwise get an
    arena of its own, and a server that runs each stream in a new thread keeps the freed pages of all of them
    (resident memory creeping up stream after stream). Process-wide, so only ``deepforcing serve`` calls it;
    returns False where mallopt is not available."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-8, int(arenas)) == 1  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def return_freed_host_memory() -> bool:
    """Hand the heap's free pages back to the system (``malloc_trim(0)``), e.g. after a stream ended and its
    cache and decoder were dropped; returns False where malloc_trim is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


# How far below the generating thread an mp4 writer thread runs (Linux nice steps; 10 = about a tenth of the
# CPU share of a nice-0 thread when both want the same core). 0 leaves the thread as it is.
WRITER_NICE = 10


def lower_thread_priority(steps: Optional[int] = None) -> bool:
    """Lower the calling thread's CPU priority by ``steps`` nice levels (default :data:`WRITER_NICE`); the threads
    it starts later (libx264's) inherit it. Linux only (elsewhere, or when refused: False, nothing changes).

    Why: a live stream's mp4 encoder competes for the cores with the generation and decoding whose frames a
    viewer waits for; at a lower priority it takes only the cycles they leave, and the file catches up between
    blocks (the frames it encodes, and so its bytes, do not change)."""
    steps = WRITER_NICE if steps is None else steps
    if steps <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
        return True
    except OSError:
        return False
