"""Argument validation shared by every public function.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a message
that names the argument, so bad input fails at the API boundary and never deep inside a kernel.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ._scalars import ArgumentTypeError, check_bool, check_int  # noqa: F401  (the scalar checks, re-exported)
from .presets import DTYPE_NAMES

FLOAT_DTYPES = tuple(getattr(torch, n) for n in DTYPE_NAMES)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # shifts and positions travel as int64 through every backend
MAX_THREADS = 4096  # torch.set_num_threads beyond: a C long long overflow (2**64) or a silly pool


def threads_problem(threads: int, flag: str = "--threads") -> Optional[str]:
    """The one-line complaint about a thread count out of ``1..MAX_THREADS`` (None when it is fine); the CLI and
    the stand-alone benches both word it from here."""
    if not 1 <= threads <= MAX_THREADS:
        return f"{flag} must be in 1..{MAX_THREADS}, got {threads}"
    return None


def check_tensor(name: str, t: Any, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_rope(name: str, rope: Any, head_dim: int) -> None:
    from .rope import RopeSpec

    if not isinstance(rope, RopeSpec):
        raise TypeError(f"{name} must be a RopeSpec, got {type(rope).__name__}")
    if rope.head_dim != head_dim:
        raise ValueError(f"{name}.head_dim is {rope.head_dim} but the tensors have head_dim {head_dim}")
