"""Checks shared by the subcommands: every failure is one line naming the flag or file (exit code 1)."""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any, Dict, Optional

from .._scalars import threads_problem  # torch-free: a command that fails early never imports torch
from ..plotting import PLOT_FORMATS, plot_format  # noqa: F401  (re-exported for the subcommands)

PLOT_INSTALL = 'pip install "deepforcing_kernels[plot]"'


class CommandError(SystemExit):
    """A user error: ``deepforcing`` prints the message as one line and exits with code 1."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the message held


def fail(message: str) -> "CommandError":
    """Raise :class:`CommandError` (returned type for ``raise fail(...)`` readability)."""
    raise CommandError(message)


def require_matplotlib(flag: str, skip_hint: Optional[str] = None) -> None:
    """Fail with the install line unless matplotlib can be imported."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        hint = f" (or pass {skip_hint})" if skip_hint else ""
        fail(f"{flag} needs matplotlib, which is not installed: {PLOT_INSTALL}{hint}")


def check_output_file(path: Optional[str], flag: str) -> None:
    """Fail unless ``path`` (a file to write after a run) can be written: not empty, not a directory, under a
    directory that exists or can be created and accepts a new file."""
    from ..runio import RunError, check_parent_writable

    if path is None:
        return
    if not path.strip():
        fail(f"{flag} is empty: give a file path")
    if path.endswith(os.sep) or os.path.isdir(path):
        fail(f"{flag} {path} is a directory, not a file")
    try:
        check_parent_writable(path, flag)
    except RunError as e:
        fail(str(e))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path} exists and is not writable")


def check_positive(value: Optional[int], flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        fail(f"{flag} must be >= {minimum}, got {value}")


def check_frames(frames: Optional[int], flag: str = "--frames", block: int = 3) -> None:
    if frames is not None and (frames <= 0 or frames % block):
        fail(f"{flag} must be a positive multiple of {block} (the block size), got {frames}")


def set_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads when given; return the previous count (to restore)."""
    import torch

    saved = torch.get_num_threads()
    if threads is not None:
        problem = threads_problem(threads)  # torch would overflow a C long long or spawn a silly pool
        if problem:
            fail(problem)
        torch.set_num_threads(threads)
    return saved


class StopRequest:
    """SIGINT / SIGTERM during a generation loop: the first asks to stop after the block in progress (``signum``
    is set; the caller saves its state and returns), a second stops at once (KeyboardInterrupt; the last saved
    state stays the resume point). ``announce``: the line printed on the first signal (None: silent, as on the
    ranks of a distributed run). Entering it again while entered is a no-op; the handlers are installed only in
    the main thread."""

    def __init__(self, announce: Optional[str] = None) -> None:
        self.signum: Optional[int] = None
        self.announce = announce
        self._old: Dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{self.announce.format(signal=signal.Signals(signum).name)}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if not self._old and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
