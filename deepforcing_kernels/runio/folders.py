"""A whole output folder written at once: :func:`atomic_folder` (a Hub folder, a converted model).

The folder is written under a hidden temporary sibling (``.tmp-NAME-<random>``) and renamed to its name when
complete, so an interruption leaves no half-written folder under the final name (at worst the temporary, which
the next write removes). An existing folder is never replaced unless ``force``: the refusal is the one overwrite
rule's (:func:`~.claims.check_claims`, one line naming the first existing file). With ``force`` the old folder is first renamed aside and removed only once the new one
is in place, so at every moment one complete folder exists (under its name, or aside for the instant between
the two renames).
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

from .claims import OverwriteError, check_claims
from .files import _fsync_dir

__all__ = ["atomic_folder", "FolderExistsError", "check_folder_free", "folder_claims"]


#: the refusal: one line naming the first file that would be overwritten (the one overwrite rule's error)
FolderExistsError = OverwriteError


def folder_claims(path: Union[str, os.PathLike]) -> List[Path]:
    """Every existing file a folder written at ``path`` would replace: its files (top level first, each level
    sorted; none for an empty folder), or ``path`` itself when it is a file."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return []
    if not p.is_dir() or p.is_symlink():
        return [p]
    found: List[Path] = []
    for root, dirs, files in os.walk(p):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files)]
    return found


def check_folder_free(path: Union[str, os.PathLike], *, force: bool = False, flag: str = "force=True") -> None:
    """Raise :class:`~.claims.OverwriteError` (one line naming the first file and ``flag``) unless ``path`` is
    free: absent, an empty folder, or ``force`` (the one overwrite rule of :mod:`.claims`, on the folder's
    files)."""
    check_claims(folder_claims(path), force=force, flag=flag)


def _remove_dead_temporaries(parent: Path, name: str) -> None:
    for stale in parent.glob(f".tmp-{name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_folder(path: Union[str, os.PathLike], *, force: bool = False, flag: str = "force=True"
                  ) -> Iterator[Path]:
    """Write a folder whole or not at all: yields a temporary sibling to fill; on normal exit it becomes
    ``path`` (replacing an existing folder only with ``force``), on an exception it is removed.

    Raises:
        OverwriteError: ``path`` holds files and ``force`` is False (checked before anything is written).
    """
    p = Path(path).absolute()
    check_folder_free(p, force=force, flag=flag)
    parent = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(parent, p.name)
    tmp = parent / f".tmp-{p.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        check_folder_free(p, force=force, flag=flag)  # someone else may have written it meanwhile
        if p.exists():
            aside = parent / f".tmp-{p.name}-old-{secrets.token_hex(4)}"
            os.replace(p, aside)
            os.replace(tmp, p)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, p)
        _fsync_dir(str(parent))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
