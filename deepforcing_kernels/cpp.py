"""Tuning hooks of the compiled CPU kernel (``csrc/``), for benchmarks and tests.

The kernel itself is the CPU implementation of ``torch.ops.deepforcing.sink_attention`` (:mod:`.ops`), chosen
by the backend registry (:mod:`.backends`); nothing here is needed to use it.
"""
from __future__ import annotations

from . import _ext

__all__ = ["set_block_rows"]


def set_block_rows(rows: int = 0) -> None:
    """Force the kernel's query rows per task (0 restores the automatic choice)."""
    _ext.require().sink_attention_set_block_rows(int(rows))
