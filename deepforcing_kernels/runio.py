"""The run store of ``deepforcing generate``: latents appended block by block, resume state on a time budget.

On-disk layout of ``--out run.pt`` (every file holds only tensors and plain values, so
``torch.load(path, weights_only=True)`` reads each one)::

    run.pt                        manifest: {"format": "deepforcing-run/2", "settings": {...}, "frames": target,
                                  "block_frames": 3, "batch_size": B, "parts": "run.pt.d", "complete": bool,
                                  "frames_done": frames on disk when it was written}
    run.pt.d/latents-00000000.pt  one file per block: {"format": "deepforcing-run-block/1", "start_frame": f0,
    run.pt.d/latents-00000003.pt    "latents": [B, block_frames, C, h, w]}; written once, never rewritten
    ...
    run.pt.d/state.pt             {"format": "deepforcing-run-state/1", "frames_done": n,
                                  "rollout": Rollout.state_dict()}: the resume point, replaced at most every
                                  ``--save-every-s`` seconds, on SIGINT / SIGTERM and at the end

Every file is written atomically: a temporary ``.tmp-<name>-<random>`` beside it (created with mode 0666 minus
the umask), ``fsync``, ``os.replace``, then an ``fsync`` of the directory; temporaries of the same run left by a
killed process are removed when the run starts again. A run's latents grow by one small file per block, whatever
the stream's length; the cache state (6 GB at the Wan-1.3B geometry in bf16) is written once per save, in a
background thread from a host snapshot, so generation waits only for the snapshot.

:func:`load_run` reads this layout and the single-file output of earlier versions
(``{"latents", "settings", "frames_done", "complete", "state"}`` in one ``.pt``).
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import re
import secrets
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["RUN_FORMAT", "BLOCK_FORMAT", "STATE_FORMAT", "RunStore", "StateSaver", "BackgroundWriter", "load_run",
           "atomic_save", "parts_dir", "RunError", "to_cpu", "retain_freed_host_memory"]

RUN_FORMAT = "deepforcing-run/2"
BLOCK_FORMAT = "deepforcing-run-block/1"
STATE_FORMAT = "deepforcing-run-state/1"
STATE_NAME = "state.pt"
_BLOCK_RE = re.compile(r"^latents-(\d{8,})\.pt$")


class RunError(ValueError):
    """A run on disk that cannot be read or continued; the message names the file (one line)."""


def parts_dir(out: str) -> str:
    """The directory beside ``out`` holding the run's block files and resume state (``out + ".d"``)."""
    return out + ".d"


def _block_name(start_frame: int) -> str:
    return f"latents-{start_frame:08d}.pt"


def _tmp_prefix(name: str) -> str:
    return f".tmp-{name}-"


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str, *, fsync: bool = True) -> int:
    """``torch.save(obj)`` to ``path`` atomically; returns the bytes written.

    The temporary file ``.tmp-<basename>-<random>`` is created beside ``path`` with mode ``0o666`` filtered by
    the process umask (``tempfile.mkstemp`` would give 0600, which survives the rename), flushed and ``fsync``-ed,
    renamed over ``path`` and the directory ``fsync``-ed: a crash leaves either the old file or the new one,
    never half a file (at worst a stale temporary, which :meth:`RunStore.clean_temporaries` removes).
    """
    d = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    while True:
        tmp = os.path.join(d, _tmp_prefix(name) + secrets.token_hex(4))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(d)
    return size


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


def _load(path: str, what: str, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"{what} {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or not written by us
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{what} {path} cannot be read ({type(e).__name__}: {reason[:160]})") from None


# ---------------------------------------------------------------------------------------------- reading
def _check_block_tensor(t: Any, path: str, f0: int, like: Optional[torch.Tensor], block_frames: Optional[int],
                        batch: Optional[int]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or not t.is_floating_point():
        got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise RunError(f"{path}: 'latents' must be a float tensor [B, frames, C, h, w], got {got}")
    if block_frames is not None and t.shape[1] != block_frames:
        raise RunError(f"{path}: holds {t.shape[1]} frames, the run's blocks have {block_frames}")
    if batch is not None and t.shape[0] != batch:
        raise RunError(f"{path}: batch {t.shape[0]}, the run's is {batch}")
    if like is not None and (t.shape[0] != like.shape[0] or t.shape[2:] != like.shape[2:] or t.dtype != like.dtype):
        raise RunError(f"{path}: latents {list(t.shape)} {t.dtype} do not match the run's first block "
                       f"{list(like.shape)} {like.dtype}")
    if not torch.isfinite(t).all():
        raise RunError(f"{path}: latents hold NaN or inf")
    return t


def _block_files(d: str) -> Dict[int, str]:
    out: Dict[int, str] = {}
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for name in names:
        m = _BLOCK_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(d, name)
    return out


def _read_blocks(d: str, block_frames: int, batch: Optional[int], limit: Optional[int] = None
                 ) -> List[torch.Tensor]:
    files = _block_files(d)
    blocks: List[torch.Tensor] = []
    f0 = 0
    while f0 in files and (limit is None or f0 < limit):
        obj = _load(files[f0], "block file")
        if not (isinstance(obj, dict) and obj.get("format") == BLOCK_FORMAT and "latents" in obj):
            raise RunError(f"{files[f0]} is not a block file of `deepforcing generate` (format {BLOCK_FORMAT!r})")
        if obj.get("start_frame") != f0:
            raise RunError(f"{files[f0]} says it starts at frame {obj.get('start_frame')!r}, its name says {f0}")
        blocks.append(_check_block_tensor(obj["latents"], files[f0], f0, blocks[0] if blocks else None,
                                          block_frames, batch))
        f0 += block_frames
    later = sorted(s for s in files if s >= f0 and (limit is None or s < limit))
    if later:
        raise RunError(f"{os.path.join(d, _block_name(f0))} is missing but later blocks exist "
                       f"({os.path.basename(files[later[0]])}, ...)")
    return blocks


def _check_manifest(m: Any, path: str) -> Dict[str, Any]:
    if not isinstance(m, dict):
        raise RunError(f"{path} is not a run of `deepforcing generate` (a {type(m).__name__}, not a dict)")
    if m.get("format") != RUN_FORMAT:
        raise RunError(f"{path} is not a run of `deepforcing generate` (format {m.get('format')!r}, "
                       f"expected {RUN_FORMAT!r})")
    if not isinstance(m.get("settings"), dict):
        raise RunError(f"{path} is damaged: it has no 'settings' dict")
    for key in ("block_frames", "batch_size", "frames"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise RunError(f"{path} is damaged: {key!r} must be a positive int, got {v!r}")
    if not isinstance(m.get("complete"), bool):
        raise RunError(f"{path} is damaged: 'complete' must be a bool, got {m.get('complete')!r}")
    return m


def _legacy(obj: Any, path: str) -> Dict[str, Any]:
    """Check a single-file run of earlier versions."""
    if not (isinstance(obj, dict) and isinstance(obj.get("latents"), torch.Tensor)):
        raise RunError(f"{path} is not a run of `deepforcing generate` (it needs 'latents' and 'settings')")
    if not isinstance(obj.get("settings"), dict):
        raise RunError(f"{path} is damaged: it has no 'settings' dict")
    lat = obj["latents"]
    batch = obj["settings"].get("batch_size", 1)
    if lat.dim() not in (4, 5) or (lat.dim() == 5) != (batch not in (None, 1)):
        raise RunError(f"{path} is damaged: latents {list(lat.shape)} do not fit batch size {batch}")
    frames = lat.shape[0] if lat.dim() == 4 else lat.shape[1]
    done = obj.get("frames_done", frames)
    if isinstance(done, bool) or not isinstance(done, int) or done != frames:
        raise RunError(f"{path} is damaged: frames_done {done!r} does not match its {frames} latent frames")
    st = obj.get("state")
    if isinstance(st, dict) and st.get("frames_done") != frames:
        raise RunError(f"{path} is damaged: its resume state is at frame {st.get('frames_done')!r} but it holds "
                       f"{frames} latent frames")
    return obj


def load_run(path: str, *, with_state: bool = False) -> Dict[str, Any]:
    """Read the output of ``deepforcing generate`` at ``path``, whatever its on-disk layout.

    Args:
        path: the ``--out`` path (the manifest of the block layout, or a single-file run of earlier versions).
        with_state: also return the resume state (``"state"``, ``Rollout.state_dict()``), or None if none was
            saved; it can be large (the whole KV cache), so it is not read by default.

    Returns:
        ``{"latents": [B, F, C, h, w] (or [F, C, h, w] for batch 1), "settings": {...}, "frames_done": F,
        "frames": the run's target, "complete": bool, "layout": "blocks" | "single-file", "state_frames": frames
        the saved resume state covers (0 if none), "state": ... (with_state only)}``.

    Raises:
        RunError (a ValueError) naming the file when something is missing or damaged.
    """
    if not os.path.isfile(path):
        raise RunError(f"{path} is not a file" if os.path.exists(path) else f"{path} does not exist")
    obj = _load(path, "run file")
    if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
        m = _check_manifest(obj, path)
        d = os.path.join(os.path.dirname(os.path.abspath(path)), m.get("parts") or os.path.basename(parts_dir(path)))
        blocks = _read_blocks(d, m["block_frames"], m["batch_size"])
        if blocks:
            lat = torch.cat(blocks, dim=1)
        else:
            lat = torch.zeros(m["batch_size"], 0, 0, 0, 0)
        done = lat.shape[1]
        if m["complete"] and done < m["frames"]:
            raise RunError(f"{path} says the run is complete with {m['frames']} frames but {d} holds {done}")
        state_path = os.path.join(d, STATE_NAME)
        state, state_frames = None, 0
        if os.path.exists(state_path):
            # without with_state the tensors are only memory-mapped, never read
            st = _check_state_file(_load(state_path, "state file", mmap=not with_state), state_path, done)
            state, state_frames = (st["rollout"] if with_state else None), st["frames_done"]
        res = {"latents": lat[0] if m["batch_size"] == 1 else lat, "settings": m["settings"], "frames_done": done,
               "frames": m["frames"], "complete": bool(m["complete"] and done >= m["frames"]), "layout": "blocks",
               "state_frames": state_frames}
        if with_state:
            res["state"] = state
        return res
    obj = _legacy(obj, path)
    lat = obj["latents"]
    frames = lat.shape[0] if lat.dim() == 4 else lat.shape[1]
    res = {"latents": lat, "settings": obj["settings"], "frames_done": frames,
           "frames": obj["settings"].get("frames", frames), "complete": bool(obj.get("complete", False)),
           "layout": "single-file", "state_frames": frames if isinstance(obj.get("state"), dict) else 0}
    if with_state:
        res["state"] = obj.get("state") if isinstance(obj.get("state"), dict) else None
    return res


def _check_state_file(st: Any, path: str, frames_on_disk: int) -> Dict[str, Any]:
    if not (isinstance(st, dict) and st.get("format") == STATE_FORMAT and isinstance(st.get("rollout"), dict)):
        raise RunError(f"{path} is not a resume state of `deepforcing generate` (format {STATE_FORMAT!r})")
    n = st.get("frames_done")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RunError(f"{path} is damaged: frames_done must be an int >= 0, got {n!r}")
    if st["rollout"].get("frames_done") != n:
        raise RunError(f"{path} is damaged: frames_done {n} but its rollout state says "
                       f"{st['rollout'].get('frames_done')!r}")
    if n > frames_on_disk:
        raise RunError(f"{path} is at frame {n} but only {frames_on_disk} frames of latents are on disk")
    return st


# ---------------------------------------------------------------------------------------------- writing
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
                obj, path, done = job
                n, dt = None, 0.0
                if self._error is None:
                    t0 = time.perf_counter()
                    try:
                        n = atomic_save(obj, path)
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

    def submit(self, obj: Any, path: str, done: Optional[Callable[[Optional[int], float], None]] = None) -> None:
        """Queue ``atomic_save(obj, path)``; ``done(bytes or None on failure, seconds)`` runs in the writer after
        it."""
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="deepforcing-run-writer", daemon=True)
            self._thread.start()
        self._q.put((obj, path, done))

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
        obj = {"format": STATE_FORMAT, "frames_done": int(frames_done), "rollout": to_cpu(state_fn(), self._pool)}
        self._idle.clear()


        def done(n: Optional[int], dt: float, frames: int = int(frames_done)) -> None:
            self._written(frames, n, dt)

        try:
            self.writer.submit(obj, self.path, done)
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


class RunStore:
    """The files of one run (``out`` plus :func:`parts_dir`); see the module docstring for the layout.

    Use: :meth:`check_writable` before any work, :meth:`lock` and :meth:`clean_temporaries` at the start,
    :meth:`write_manifest`, then :meth:`write_block` per block and :meth:`save_state` / a :class:`StateSaver`
    on the time budget. ``bytes_written`` counts every byte this object (and its savers) wrote.
    """

    def __init__(self, out: str):
        self.out = out
        self.dir = parts_dir(out)
        self.bytes_written = 0
        self._lock_fd: Optional[int] = None
        self.writer = BackgroundWriter(on_write=self._count)

    # ------------------------------------------------------------ checks
    def check_writable(self, flag: str = "--out") -> None:
        """Raise RunError (one line naming ``flag``) unless the run's files can be created here."""
        out = self.out
        if not out or not out.strip():
            raise RunError(f"{flag} is empty: give a file path such as out/run.pt")
        if out.endswith(os.sep) or os.path.isdir(out):
            raise RunError(f"{flag} {out} is a directory: give a file path such as {os.path.join(out, 'run.pt')}")
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise RunError(f"{flag} {out}: {self.dir} (where the blocks go) exists and is not a directory")
        check_parent_writable(out, flag)

    # ------------------------------------------------------------ lifecycle
    def lock(self) -> None:
        """Create the parts directory and hold an exclusive ``flock`` on it (another writer: RunError)."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"{self.out} is being written by another process (it holds {self.dir})") from None
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean_temporaries(self) -> List[str]:
        """Remove ``.tmp-*`` files of this run left by a killed process; return their paths."""
        removed = []
        parent = os.path.dirname(os.path.abspath(self.out))
        for d, prefix in ((parent, _tmp_prefix(os.path.basename(self.out))), (self.dir, ".tmp-")):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(prefix):
                    p = os.path.join(d, name)
                    try:
                        os.unlink(p)
                        removed.append(p)
                    except OSError:
                        pass
        return removed

    def remove(self) -> None:
        """Delete the run (``--force``): the manifest, this run's block and state files, and the directory if it
        is then empty. Other files in the directory are left alone."""
        if os.path.isfile(self.out):
            os.unlink(self.out)
        for p in _block_files(self.dir).values():
            os.unlink(p)
        sp = os.path.join(self.dir, STATE_NAME)
        if os.path.exists(sp):
            os.unlink(sp)

    # ------------------------------------------------------------ writes
    def _count(self, n: int) -> None:
        self.bytes_written += n

    def write_manifest(self, settings: Dict[str, Any], *, frames: int, block_frames: int, batch_size: int,
                       frames_done: int, complete: bool) -> None:
        self.writer.flush()  # after the blocks queued before it
        m = {"format": RUN_FORMAT, "settings": settings, "frames": int(frames), "block_frames": int(block_frames),
             "batch_size": int(batch_size), "parts": os.path.basename(self.dir), "complete": bool(complete),
             "frames_done": int(frames_done)}
        self._count(atomic_save(m, self.out))

    def block_path(self, start_frame: int) -> str:
        return os.path.join(self.dir, _block_name(start_frame))

    def write_block(self, start_frame: int, latents: torch.Tensor, *, background: bool = False) -> None:
        """Write one block ``[B, block_frames, C, h, w]`` (copied to the CPU now) as its own file; with
        ``background`` the write is queued on :attr:`writer` (call :meth:`flush` before relying on it)."""
        obj = {"format": BLOCK_FORMAT, "start_frame": int(start_frame),
               "latents": latents.detach().to("cpu", copy=True)}
        if background:
            self.writer.submit(obj, self.block_path(start_frame))
        else:
            self.writer.flush()  # keep the order of the queued writes
            self._count(atomic_save(obj, self.block_path(start_frame)))

    def flush(self) -> None:
        """Wait for every queued write (raising the first failure)."""
        self.writer.flush()

    def close(self) -> None:
        """Finish the queued writes, end the writer thread and release the lock."""
        try:
            self.writer.close()
        finally:
            self.unlock()

    def read_block(self, start_frame: int) -> Optional[torch.Tensor]:
        """The block on disk at ``start_frame`` (None if there is none or it cannot be read)."""
        p = self.block_path(start_frame)
        if not os.path.exists(p):
            return None
        try:
            obj = _load(p, "block file")
        except RunError:
            return None
        return obj.get("latents") if isinstance(obj, dict) else None

    def state_saver(self, *, background: bool = True) -> StateSaver:
        """A :class:`StateSaver` for ``<out>.d/state.pt`` on this run's writer (bytes counted once, here)."""
        return StateSaver(os.path.join(self.dir, STATE_NAME), background=background, writer=self.writer)

    # ------------------------------------------------------------ resume
    def read_for_resume(self) -> Dict[str, Any]:
        """What ``--resume`` needs: ``{"settings", "frames", "complete", "latents": [B, F, C, h, w] on disk,
        "state": rollout state or None, "state_frames": int, "layout"}``; RunError naming the file otherwise."""
        obj = _load(self.out, "run file")
        if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
            m = _check_manifest(obj, self.out)
            blocks = _read_blocks(self.dir, m["block_frames"], m["batch_size"])
            lat = torch.cat(blocks, dim=1) if blocks else None
            done = 0 if lat is None else lat.shape[1]
            if m["complete"] and done < m["frames"]:
                raise RunError(f"{self.out} says the run is complete with {m['frames']} frames but {self.dir} "
                               f"holds {done}")
            sp = os.path.join(self.dir, STATE_NAME)
            state, state_frames = None, 0
            if os.path.exists(sp):
                st = _check_state_file(_load(sp, "state file"), sp, done)
                state, state_frames = st["rollout"], st["frames_done"]
            return {"settings": m["settings"], "frames": m["frames"], "complete": m["complete"], "latents": lat,
                    "state": state, "state_frames": state_frames, "layout": "blocks",
                    "block_frames": m["block_frames"], "batch_size": m["batch_size"]}
        obj = _legacy(obj, self.out)
        if not isinstance(obj.get("state"), dict):
            raise RunError(f"{self.out} is damaged: it has no resume 'state'")
        lat = obj["latents"]
        lat = lat[None] if lat.dim() == 4 else lat
        return {"settings": obj["settings"], "frames": obj["settings"].get("frames", lat.shape[1]),
                "complete": bool(obj.get("complete")), "latents": lat, "state": obj["state"],
                "state_frames": lat.shape[1], "layout": "single-file", "block_frames": None,
                "batch_size": lat.shape[0]}


def check_parent_writable(path: str, flag: str) -> None:
    """Raise RunError (one line naming ``flag``) unless ``path``'s directory exists or can be created and a file
    can be created in it (checked by creating and removing a temporary file)."""
    d = os.path.dirname(os.path.abspath(path))
    probe = d
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise RunError(f"{flag} {path}: {probe} is a file, not a directory")
    probe_file = os.path.join(d, f".tmp-probe-{secrets.token_hex(4)}")
    try:
        os.makedirs(d, exist_ok=True)
        fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise RunError(f"{flag} {path}: cannot write in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe_file)
