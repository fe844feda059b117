"""Scalar argument checks (ints, bools) and the package's wrong-kind error; torch-free, so the policy data and the
schedule use them without importing torch. Each names the argument in its message."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["ArgumentTypeError", "check_int", "check_bool", "threads_problem", "MAX_THREADS"]

MAX_THREADS = 4096  # torch.set_num_threads beyond: a C long long overflow (2**64) or a silly pool


def threads_problem(threads: int, flag: str = "--threads") -> Optional[str]:
    """The one-line complaint about a thread count out of ``1..MAX_THREADS`` (None when it is fine); the CLI and
    the stand-alone benches both word it from here."""
    if not 1 <= threads <= MAX_THREADS:
        return f"{flag} must be in 1..{MAX_THREADS}, got {threads}"
    return None



class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind. It is both a TypeError (the package's convention for the wrong kind of
    thing) and a ValueError (what the cache promises for every bad configuration or call), so either
    ``except`` clause catches it."""


def check_int(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` must be a Python int (not bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        # accept 0-d integer tensors and numpy ints, which users pass around a lot
        # (duck-typed: this module imports no torch, so cache policies stay plain data)
        if type(value).__module__.startswith("torch") and hasattr(value, "dim") and value.dim() == 0 \
                and not value.dtype.is_floating_point and str(value.dtype) != "torch.bool":
            value = int(value.item())
        elif type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu":
            value = int(value)
        else:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} ({shown})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
