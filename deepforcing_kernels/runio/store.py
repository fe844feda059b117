"""The files of one run, together: :class:`RunStore` (manifest, block files, resume state, lock, clean-up)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from ..formats import RUN_BLOCK_FORMAT, RUN_FORMAT
from . import files
from .files import RunError, _load, _tmp_prefix, check_parent_writable, lock_exclusive
from .layout import (
    STATE_NAME,
    _block_files,
    _block_name,
    _check_manifest,
    _check_state_file,
    _legacy,
    _read_blocks,
    parts_dir,
)
from .writers import BackgroundWriter, StateSaver

__all__ = ["RunStore"]


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
        if os.path.isdir(self.dir):  # a run to resume (or replace): its blocks folder must take new files too
            try:
                check_parent_writable(os.path.join(self.dir, "state.pt"), flag)
            except RunError as e:
                why = str(e).rsplit(" (", 1)[-1] if " (" in str(e) else "not writable)"
                raise RunError(f"{flag} {out}: cannot write in {self.dir}, where its blocks and state go ({why}")

    # ------------------------------------------------------------ lifecycle
    def lock(self) -> None:
        """Create the parts directory and hold an exclusive ``flock`` on it (another writer: RunError)."""
        os.makedirs(self.dir, exist_ok=True)
        self._lock_fd = lock_exclusive(self.dir, f"{self.out} is being written by another process (it holds "
                                                 f"{self.dir})", directory=True)

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
        self._count(files.atomic_save(m, self.out))

    def block_path(self, start_frame: int) -> str:
        return os.path.join(self.dir, _block_name(start_frame))

    def write_block(self, start_frame: int, latents: torch.Tensor, *, background: bool = False) -> None:
        """Write one block ``[B, block_frames, C, h, w]`` (copied to the CPU now) as its own file; with
        ``background`` the write is queued on :attr:`writer` (call :meth:`flush` before relying on it)."""
        obj = {"format": RUN_BLOCK_FORMAT, "start_frame": int(start_frame),
               "latents": latents.detach().to("cpu", copy=True)}
        if background:
            self.writer.submit(obj, self.block_path(start_frame))
        else:
            self.writer.flush()  # keep the order of the queued writes
            self._count(files.atomic_save(obj, self.block_path(start_frame)))

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
