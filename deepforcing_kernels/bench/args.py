"""Flags the stand-alone benches share (``python -m deepforcing_kernels.bench.NAME``): the model geometry of a
pass and torch's thread count, each declared and checked once."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from .._checks import threads_problem

__all__ = ["add_geometry", "add_threads", "apply_threads"]


def add_geometry(ap: argparse.ArgumentParser, *, tokens_per_frame: int = 64, repeats: int = 9) -> None:
    """``--dim --heads --layers --tokens-per-frame --repeats`` (Wan 1.3B's width and heads by default)."""
    ap.add_argument("--dim", type=int, default=1536, help="model width (default 1536, Wan 1.3B)")
    ap.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    ap.add_argument("--layers", type=int, default=2, help="DiT blocks in the timed pass (default 2)")
    ap.add_argument("--tokens-per-frame", type=int, default=tokens_per_frame,
                    help=f"tokens per latent frame (default {tokens_per_frame})")
    ap.add_argument("--repeats", type=int, default=repeats, help=f"interleaved repeats (default {repeats})")


def add_threads(ap: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads (default: torch's own)."""
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def apply_threads(ap: argparse.ArgumentParser, threads: Optional[int]) -> None:
    """Set ``--threads`` when given; out of 1..MAX_THREADS is one line and exit code 1."""
    if threads is None:
        return
    problem = threads_problem(threads)
    if problem:
        ap.exit(1, f"{ap.prog}: error: {problem}\n")
    torch.set_num_threads(threads)
