"""Atomic files: every file of a run is written whole or not at all, and a directory is checked before a run."""
from __future__ import annotations

import os
import secrets
from typing import Any

import torch

__all__ = ["RunError", "atomic_save", "check_parent_writable"]


class RunError(ValueError):
    """A run on disk that cannot be read or continued; the message names the file (one line)."""


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


def _load(path: str, what: str, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise RunError(f"{what} {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or not written by us
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{what} {path} cannot be read ({type(e).__name__}: {reason[:160]})") from None


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
