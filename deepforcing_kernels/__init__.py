"""deepforcing_kernels: fast, exact kernels and a streaming KV cache for Deep Forcing.

Deep Forcing (arXiv 2512.05081) turns a Self-Forcing-style autoregressive video diffusion model into a
minute-long generator without training: a *Deep Sink* of early frames whose RoPE is re-phased to sit just behind
the live context, and *Participative Compression* that keeps the most-attended tokens of the middle.

The public names below load on first use (so ``deepforcing --help`` and ``import deepforcing_kernels`` stay
light). The registered op ``torch.ops.deepforcing.sink_attention`` is defined by ``import
deepforcing_kernels.ops`` (defining a ``triton_op`` imports torch's compiler stack, a second or more): the
backends import it the first time a call needs it (autograd, ``torch.compile``); eager inference calls the kernels
directly and never pays for it.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "RopeSpec": "rope", "apply_rope": "rotation", "rephase": "rotation", "sink_attention": "attention",
    "SinkAttentionOutput": "attention", "available_backends": "attention", "release_logit_score": "cache",
    "CachePolicy": "cache", "StreamingKVCache": "cache",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'deepforcing_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
