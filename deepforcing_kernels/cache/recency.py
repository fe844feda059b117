"""Recency Forcing's temporal recency bias (docs/methods.md, "Recency Forcing"): what a ``recency_forcing`` layer
adds to the logits of the keys it reads, handed to :func:`~deepforcing_kernels.sink_attention` as ``key_bias``.

The bias is per frame read. Over the ``L`` frames a pass attends to (the sink first, oldest to newest), frame ``i``
is ``d = (L - 1 - i) // chunk`` chunks behind the newest (``chunk``: the pass's frames); the denoising pass at step
index ``t`` (0-based) gives it ``-beta * dt ** (gamma0 * 2 ** (t + 1))`` with ``dt = min(1, (d - recent) / history)``
when ``d > recent``, and 0 otherwise and on the sink. The block's clean pass is unbiased. This is the authors'
``temporal_recency_bias`` (Dwell-Jing/commit-forcing @ 5ed6592, integrations/recency_forcing/commit_rule.patch),
evaluated in float64 and rounded once to float32; where they run one attention call per distinct bias value and
merge by log-sum-exp, the fused op takes the bias per key in one call (the same softmax).

A layer learns the step index by counting the passes of its current block (the Self-Forcing order: the denoising
steps, then the clean pass), and which pass is the clean one from ``attend(clean=)`` or ``cache.mark_pass(clean=)``
(the model marks every pass); told neither, it takes Self-Forcing's schedule: pass 4 of a block (the fifth) is the
clean pass, passes 0..3 are denoising steps 0..3.
The count is part of the layer's state, so a stream cut between two passes of a block resumes bit for bit.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..policy import CachePolicy

__all__ = ["frame_bias", "RecencyBias", "STATE_KEY", "CLEAN_PASS"]

#: the layer-state key of the pass count
STATE_KEY = "recency_pass"
#: the clean pass of a block when no one says which it is: Self-Forcing's 4 denoising steps come first
CLEAN_PASS = 4


def frame_bias(policy: CachePolicy, frames: int, chunk_frames: int, step: int, sink_frames: int) -> torch.Tensor:
    """float64 ``[frames]``: the bias of each frame read (oldest first) at denoising step index ``step``, with the
    first ``sink_frames`` of them the sink."""
    d = torch.div(frames - 1 - torch.arange(frames, dtype=torch.int64), chunk_frames, rounding_mode="floor")
    R, Hc = policy.recency_recent_chunks, policy.recency_history_chunks
    dt = ((d - R).clamp(min=0).double() / Hc).clamp(max=1.0)
    bias = -policy.recency_beta * dt.pow(policy.recency_gamma0 * 2.0 ** (step + 1))
    bias = torch.where(d > R, bias, torch.zeros_like(bias))
    bias[:sink_frames] = 0.0
    return bias


class RecencyBias:
    """One layer's pass counter, and the per-key bias tensors of the passes (built once per distinct
    ``(frames read, pass frames, step)`` and kept in ``shared``, a dict all the cache's layers share: a stream has
    a handful, the same in every layer)."""

    def __init__(self, policy: CachePolicy, tokens_per_frame: int, device: torch.device,
                 shared: Optional[Dict[Any, Any]] = None) -> None:
        self.policy, self.n, self.device = policy, tokens_per_frame, device
        self.passes = 0  # passes of the current block run so far
        self.step: Optional[int] = None  # the step index of the pass under way (None: the clean pass)
        self._memo: Dict[Tuple[int, int, int], Optional[torch.Tensor]] = (
            shared.setdefault("recency_bias", {}) if shared is not None else {})

    def reset(self) -> None:
        self.passes, self.step = 0, None

    def begin(self, clean: Any, new_block: bool) -> Optional[int]:
        """Count a pass (the first of a new block, or the next of the current one) and set :attr:`step`, its step
        index, or None for the clean pass (also returned). ``clean`` None: pass :data:`CLEAN_PASS` of a block is
        the clean one. ValueError, counting nothing, when ``clean`` is neither None nor a bool."""
        if clean is not None and not isinstance(clean, bool):
            raise ValueError(f"clean must be True / False (or None: pass {CLEAN_PASS} of a block is the clean "
                             f"pass), got {clean!r}")
        step = 0 if new_block else self.passes
        clean = step == CLEAN_PASS if clean is None else clean
        self.passes = step + 1
        self.step = None if clean else step
        return self.step

    def key_bias(self, frames: int, chunk_frames: int, step: Any = "current") -> Optional[torch.Tensor]:
        """float32 ``[1, 1, frames * tokens_per_frame]`` for a pass at ``step`` (default: the pass under way)
        reading ``frames`` frames of which it writes ``chunk_frames``, or None where nothing is biased (the clean
        pass; a cache too short to hold a history chunk)."""
        step = self.step if step == "current" else step
        if step is None:
            return None
        key = (frames, chunk_frames, step)
        if key not in self._memo:
            b = frame_bias(self.policy, frames, chunk_frames, step, min(self.policy.sink_frames, frames))
            self._memo[key] = (b.to(torch.float32).repeat_interleave(self.n).view(1, 1, -1).to(self.device)
                               if bool((b != 0).any()) else None)
        return self._memo[key]

    def state(self) -> Dict[str, Any]:
        return {STATE_KEY: self.passes}

    def load(self, tensors: Dict[str, Any]) -> None:
        self.passes = tensors[STATE_KEY]
