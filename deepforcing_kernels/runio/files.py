"""Atomic files: every file of a run is written whole or not at all, and a directory is checked before a run."""
from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any, Union

import torch

__all__ = ["RunError", "atomic_save", "lock_exclusive", "check_parent_writable", "content_digest", "check_checksum", "CHECKSUM_KEY"]


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


#: the key under which a sealed state carries :func:`content_digest` of the rest of it
CHECKSUM_KEY = "checksum"


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"t{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"d{len(obj)}|".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def content_digest(obj: Any) -> str:
    """A digest of everything in ``obj`` (nested dicts, lists, tensors' dtype / shape / bytes, plain values), the
    key :data:`CHECKSUM_KEY` of the top-level dict left out: a saved state carries it, and a resume recomputes it,
    so a flipped bit anywhere in the file is refused instead of resumed into different frames."""
    h = hashlib.blake2b(digest_size=32)
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    _feed(h, obj)
    return h.hexdigest()


def check_checksum(obj: Any, path: str) -> None:
    """RunError (one line naming ``path``) when ``obj`` carries a checksum that its contents do not match; a
    state of an earlier version, without one, passes."""
    if isinstance(obj, dict) and CHECKSUM_KEY in obj and obj[CHECKSUM_KEY] != content_digest(obj):
        raise RunError(f"{path} is damaged: its contents do not match its checksum (--force starts over)")


def atomic_save(obj: Any, path: str, *, fsync: bool = True, seal: bool = False) -> int:
    """``torch.save(obj)`` to ``path`` atomically; returns the bytes written.

    The temporary file ``.tmp-<basename>-<random>`` is created beside ``path`` with mode ``0o666`` filtered by
    the process umask (``tempfile.mkstemp`` would give 0600, which survives the rename), flushed and ``fsync``-ed,
    renamed over ``path`` and the directory ``fsync``-ed: a crash leaves either the old file or the new one,
    never half a file (at worst a stale temporary, which :meth:`RunStore.clean_temporaries` removes).
    ``seal=True`` (a dict) adds :func:`content_digest` under :data:`CHECKSUM_KEY`, computed here, so in the
    writer thread for a background save.
    """
    if seal:
        obj = {**obj, CHECKSUM_KEY: content_digest(obj)}
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


def lock_exclusive(path: Union[str, os.PathLike], busy: str, *, directory: bool = False) -> int:
    """An fd holding a non-blocking exclusive ``flock`` on ``path`` (a lock file, created when missing, or with
    ``directory`` an existing folder); another holder: :class:`RunError` ``busy``. Retries when the holder removed
    ``path`` between our open and our lock, so two processes never hold locks on two inodes of one name."""
    import errno
    import fcntl

    while True:
        fd = os.open(path, os.O_RDONLY) if directory else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(busy) from None
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


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
