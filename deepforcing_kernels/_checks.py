"""Argument validation shared by every public function.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a message
that names the argument, so bad input fails at the API boundary and never deep inside a kernel.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ._scalars import MAX_THREADS, ArgumentTypeError, check_bool, check_int, threads_problem  # noqa: F401  (the scalar

#   checks, re-exported)
from .presets import DTYPE_NAMES

FLOAT_DTYPES = tuple(getattr(torch, n) for n in DTYPE_NAMES)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # shifts and positions travel as int64 through every backend


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
