"""Argument validation shared by every public function.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a message
that names the argument, so bad input fails at the API boundary and never deep inside a kernel.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # shifts and positions travel as int64 through every backend


def check_int(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` must be a Python int (not bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        # accept 0-d integer tensors and numpy ints, which users pass around a lot
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
                and value.dtype != torch.bool:
            value = int(value.item())
        elif type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu":
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


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
