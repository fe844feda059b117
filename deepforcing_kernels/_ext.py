"""Loading of the compiled extension ``deepforcing_kernels._C`` (optional: the package works without it)."""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional


@functools.lru_cache(maxsize=1)
def load() -> Optional[ModuleType]:
    """The ``_C`` module, or None when the extension was not built (no compiler at install time)."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        from . import _C  # noqa: F401
    except ImportError:
        return None
    return _C


def import_error() -> str:
    import torch  # noqa: F401

    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # pragma: no cover - message only
        return str(e)
    return ""


def require():
    """The ``_C`` module, or a RuntimeError that says how to build it."""
    mod = load()
    if mod is None:
        raise RuntimeError(
            "the C++ extension deepforcing_kernels._C is not built (" + import_error() + "); install a C++ "
            "compiler and run `pip install --no-build-isolation -e .` (or `make build`), or use "
            "backend='reference'")
    return mod
