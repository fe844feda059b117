"""The one overwrite rule: every file a run may write is checked before anything is written.

A run's *companions* are all the names it may create besides its main output: an mp4 run's segments
(``NAME_00000.mp4`` ...), partial files (``NAME.partial.mp4``, ``NAME_00003.partial.mp4``) and resume state
(``NAME.mp4.state.pt``); a latents run's parts folder (``NAME.pt.d/`` with its block and state files). Before a
command or a library writer creates any of them, :func:`check_claims` refuses when one exists that is not this
run's own (a resume's), naming the first; with ``force`` the caller :func:`release` s them all first, so a forced run
never leaves a mix of an old run's files and its own.

This module reads names only (no torch): the CLI, ``VideoPipeline.write``, ``VideoWriter`` and the run store use
it, and so do the newer surfaces (``serve`` downloads, ``convert``, ``save_pretrained``) through
:func:`check_claims` on their own file lists.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Sequence, Union

from .files import RunError, lock_exclusive

__all__ = ["video_claims", "latents_claims", "check_claims", "release", "OverwriteError", "OutputLock"]

PathLike = Union[str, os.PathLike]


class OverwriteError(RunError, FileExistsError):
    """A file a run would write exists and is not the run's own (pass ``force`` / ``--force`` to replace it)."""


def video_claims(path: PathLike) -> List[Path]:
    """Every existing file an mp4 run of ``path`` may write: the path, its segments and their partials, its own
    partial and its resume state (sorted; the main path first when it exists)."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    suffix = p.suffix or ".mp4"
    names = re.compile(rf"^{re.escape(p.stem)}(_\d{{5}})?(\.partial)?{re.escape(suffix)}$")
    found: List[Path] = []
    if folder.is_dir():
        found = sorted(folder / n for n in os.listdir(folder) if names.match(n) and n != p.name)
    state = Path(str(p) + ".state.pt")
    head = [q for q in (p, state) if q.exists() or q.is_symlink()]
    return head + found


def latents_claims(path: PathLike) -> List[Path]:
    """Every existing file a latents run of ``path`` may write: the manifest and what its parts folder holds."""
    p = Path(path)
    parts = Path(str(p) + ".d")
    out = [p] if p.exists() or p.is_symlink() else []
    if parts.is_dir():
        out += sorted(parts.iterdir())  # (an empty folder holds nothing to lose: the run fills it)
    elif parts.exists() or parts.is_symlink():
        out.append(parts)
    return out


def check_claims(claims: Iterable[PathLike], *, force: bool, own: Sequence[PathLike] = (),
                 flag: str = "--force") -> List[Path]:
    """Refuse (:class:`OverwriteError`, one line naming the first) when a claimed file exists that is not in
    ``own`` and ``force`` is false. Returns the files ``force`` would replace (pass them to :func:`release`)."""
    mine = {os.path.abspath(p) for p in own}
    foreign = [Path(c) for c in claims if os.path.abspath(c) not in mine]
    if foreign and not force:
        more = f" (and {len(foreign) - 1} more a run of this name would write)" if len(foreign) > 1 else ""
        raise OverwriteError(f"{foreign[0]} exists{more}: pass {flag} to replace it")
    return foreign


def release(paths: Iterable[PathLike]) -> None:
    """Remove ``paths`` (files, links or folders) before a forced run writes: its files then never sit beside an
    older run's."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


class OutputLock:
    """An exclusive ``flock`` on ``.NAME.lock`` beside an output, held while a run writes it: a second process
    writing the same output is refused (:class:`RunError`, one line) instead of both reporting success. The lock
    file is hidden, holds nothing, and is removed on release (a killed holder's lock dies with it)."""

    def __init__(self, path: PathLike) -> None:
        p = Path(path)
        self.file = p.with_name(f".{p.name}.lock")
        self._fd = None

    def __enter__(self) -> "OutputLock":
        if self._fd is None:  # (taken early, then used as a context: held once)
            self._fd = lock_exclusive(self.file, f"{self.file.name[1:-5]} is being written by another process")
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                self.file.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None
