"""One Top-C for all ranks: a deterministic sum of the per-rank partial scores.

Participative Compression scores a token by a sum over heads (attention mass summed over query heads, or the
release's logit score, a dot product over all heads). Under head sharding each rank's cache sees only its heads,
so its score is a partial sum. :class:`HeadReducer` is the cache's ``reduce_over_heads`` hook: it all-gathers the
float32 ``[B, L]`` partials and adds them **in rank order** (``((s0 + s1) + s2) + ...``), the same operations on
the same bits on every rank, so every rank gets bit-identical totals and selects identical tokens (the stable
Top-C sort breaks ties by slot index, and the slot layouts are identical too). An all-reduce would also give a
sum, but not one that is guaranteed to be bit-identical on every rank for every backend and algorithm.
"""
from __future__ import annotations

from typing import Any, List

import torch

__all__ = ["HeadReducer", "sum_in_rank_order"]


def sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """``parts [P, ...]`` summed left to right over the first axis (one fixed order, float32 kept)."""
    acc = parts[0].clone()
    for r in range(1, parts.shape[0]):
        acc += parts[r]
    return acc


class HeadReducer:
    """``reduce_over_heads`` hook for a head-sharded :class:`~deepforcing_kernels.cache.StreamingKVCache`.

    Args:
        comm: the :class:`~deepforcing_kernels.distributed.comm.SequenceComm` of the ranks sharing the heads.
        record: keep every total it returns (``[B, L]`` float32 copies) in :attr:`history` (tests use it to
            check that all ranks saw the same scores).

    Calling it on the partial score ``[B, L]`` (float32) returns the total over all ranks' heads.
    """

    def __init__(self, comm: Any, *, record: bool = False) -> None:
        self.comm = comm
        self.record = record
        self.history: List[torch.Tensor] = []
        self.calls = 0

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        if not isinstance(score, torch.Tensor) or score.dim() != 2 or score.dtype != torch.float32:
            got = (score.dtype, list(score.shape)) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"reduce_over_heads expects a float32 [B, L] partial score, got {got}")
        total = sum_in_rank_order(self.comm.all_gather(score, "topc_scores"))
        self.calls += 1
        if self.record:
            self.history.append(total.detach().cpu().clone())
        return total

    def __repr__(self) -> str:
        return f"HeadReducer({self.comm!r}, calls={self.calls})"
