"""Where pictures go: the one rule for the format a plot is written in (the CLI and the benchmarks share it)."""
from __future__ import annotations

import os

__all__ = ["PLOT_FORMATS", "plot_format"]

#: matplotlib's savefig formats we let the extension choose; anything else is written as PNG at the exact path
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")


def plot_format(path: str) -> str:
    """The format a picture at ``path`` is written in: its extension when matplotlib knows it, else PNG."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext in PLOT_FORMATS else "png"
