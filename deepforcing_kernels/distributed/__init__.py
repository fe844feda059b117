"""Multi-process generation over ``torch.distributed`` (launched by ``torchrun``; NCCL on GPUs, Gloo on CPUs).

* **Sequence parallel (Ulysses)** — :class:`~deepforcing_kernels.distributed.ulysses.SequenceParallelWan`: each of
  P ranks holds the weights and 1/P of every block's tokens (a 1/P slice of every frame) for the norms,
  projections, cross-attention and FFN; an all-to-all before self-attention turns ``[tokens/P, all heads]`` into
  ``[all tokens, heads/P]``, each rank's :class:`~deepforcing_kernels.cache.StreamingKVCache` holds only its heads
  (K/V memory per rank is 1/P), and an all-to-all after attention turns it back.
* **One Top-C for all ranks** — :class:`~deepforcing_kernels.distributed.reduce.HeadReducer` sums the per-rank
  partial Top-C scores in a fixed rank order, so every rank selects the same tokens.
* **Launch** — :mod:`~deepforcing_kernels.distributed.launch`: rank set-up from the ``torchrun`` environment,
  checks across ranks (divisibility, identical settings), the data-parallel prompt split, and clean exits
  (one line on rank 0, exit code 1; a dead or stuck rank ends the others within the process-group timeout).

Nothing here is imported by the single-process path (``import deepforcing_kernels`` never imports this
package). See ``docs/distributed.md`` for the communication model.
"""
from __future__ import annotations

from typing import Any

__all__ = ["SequenceParallelWan", "SequenceComm", "HeadReducer", "split_prompts", "init_from_env", "ParallelError"]

_WHERE = {"SequenceParallelWan": "ulysses", "SequenceComm": "comm", "HeadReducer": "reduce",
          "split_prompts": "launch", "init_from_env": "launch", "ParallelError": "launch"}


def __getattr__(name: str) -> Any:  # lazy: importing the package costs nothing until a name is used
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
