"""One place that imports the optional libraries of the ``video`` extra, with one clear error when absent."""
import importlib
from types import ModuleType

EXTRA_HINT = 'pip install "deepforcing_kernels[video]"'


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"diffusers"``) or raise ``ImportError`` saying which extra provides it.

    Args:
        module: the importable name.
        what: what needs it, for the message (e.g. ``"WanVAE"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package {module.split('.')[0]!r} ({e}); "
                          f"install it with: {EXTRA_HINT}") from None
