"""The run's writer threads: one background thread for every file write, and the resume-state saver on top of it."""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..formats import RUN_STATE_FORMAT
from . import files
from .host import to_cpu

__all__ = ["BackgroundWriter", "StateSaver"]


class BackgroundWriter:
    """One thread that performs :func:`atomic_save` jobs in the order they were submitted (a block file before the
    state that follows it). :meth:`submit` returns at once (it waits only when ``max_pending`` jobs are queued);
    :meth:`flush` waits for every job. A failed write is raised, as OSError naming the file, by the next
    :meth:`submit` / :meth:`flush`; the jobs after it are dropped (a later state must not outlive a lost block)."""

    def __init__(self, *, max_pending: int = 8, on_write: Optional[Callable[[int], None]] = None):
        self.on_write = on_write
        self.write_s = 0.0
        self.bytes_written = 0
        self.writes = 0
        self._q: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, OSError):
                raise OSError(e.errno, f"cannot write {e.filename or 'a run file'}: {e.strerror or e}") from None
            raise e

    def _run(self) -> None:
        try:  # the generation loop has the CPU first; the writer takes what is left (Linux: nice per thread)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                obj, path, done, seal = job
                n, dt = None, 0.0
                if self._error is None:
                    t0 = time.perf_counter()
                    try:
                        n = files.atomic_save(obj, path, seal=seal)
                    except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                        if isinstance(e, OSError) and not e.filename:
                            e.filename = path
                        self._error = e
                    else:
                        dt = time.perf_counter() - t0
                        self.write_s += dt
                        self.bytes_written += n
                        self.writes += 1
                        if self.on_write is not None:
                            self.on_write(n)
                if done is not None:
                    done(n, dt)
            finally:
                # drop the job before waiting for the next one: a multi-GB snapshot must be freed now, so that the
                # next snapshot reuses its pages instead of faulting fresh ones in
                job = obj = done = None
                self._q.task_done()

    def submit(self, obj: Any, path: str, done: Optional[Callable[[Optional[int], float], None]] = None, *,
               seal: bool = False) -> None:
        """Queue ``atomic_save(obj, path, seal=seal)``; ``done(bytes or None on failure, seconds)`` runs in the
        writer after it (a seal's digest is computed there too, off the generation loop)."""
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="deepforcing-run-writer", daemon=True)
            self._thread.start()
        self._q.put((obj, path, done, seal))

    def flush(self) -> None:
        """Wait until every queued write is on disk; raise the first failure."""
        if self._thread is not None:
            self._q.join()
        self._raise()

    def close(self) -> None:
        """:meth:`flush`, then end the thread."""
        try:
            self.flush()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)
                self._thread.join()
            self._thread = None


class StateSaver:
    """Saves resume states: :meth:`save` waits for the previous state's write, takes a host snapshot
    (``to_cpu(state_fn())``) and queues one atomic write on a :class:`BackgroundWriter` (the run's, so it follows
    the block files queued before it); generation continues meanwhile.

    ``blocked_s`` sums the seconds :meth:`save` held the caller (snapshot plus waiting for an unfinished write);
    ``bytes_written`` / ``writes`` / ``write_s`` count the state writes that reached the disk.
    """

    def __init__(self, path: str, *, background: bool = True, on_write: Optional[Callable[[int], None]] = None,
                 writer: Optional[BackgroundWriter] = None):
        self.path = path
        self.background = background
        self.on_write = on_write
        self.writer = writer if writer is not None else BackgroundWriter()
        self.blocked_s = 0.0
        self.write_s = 0.0
        self.bytes_written = 0
        self.writes = 0
        self.saved_frames: Optional[int] = None
        self._idle = threading.Event()
        self._idle.set()
        self._pool: List[torch.Tensor] = []  # host buffers of device tensors, reused from save to save

    def _written(self, frames: int, n: Optional[int], dt: float) -> None:
        if n is not None:
            self.bytes_written += n
            self.writes += 1
            self.write_s += dt
            self.saved_frames = frames
            if self.on_write is not None:
                self.on_write(n)
        self._idle.set()

    def wait(self) -> None:
        """Wait for the state write in flight (and what was queued before it); raise a failure."""
        self._idle.wait()
        self.writer._raise()

    def save(self, frames_done: int, state_fn: Callable[[], Dict[str, Any]], *, wait: bool = False) -> None:
        """Snapshot the state now and write it (in the background unless ``wait`` or ``background=False``)."""
        t0 = time.perf_counter()
        self.wait()
        obj = {"format": RUN_STATE_FORMAT, "frames_done": int(frames_done), "rollout": to_cpu(state_fn(), self._pool)}
        self._idle.clear()


        def done(n: Optional[int], dt: float, frames: int = int(frames_done)) -> None:
            self._written(frames, n, dt)

        try:
            self.writer.submit(obj, self.path, done, seal=True)
        except BaseException:
            self._idle.set()
            raise
        if wait or not self.background:
            self.wait()
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        """Finish the write in flight (raising its error)."""
        self.wait()
        self.writer.flush()
