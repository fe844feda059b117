"""The re-cache view: one model pass that rewrites the K/V of frames a cache already holds (a prompt switch's
re-cache, LongLive's KV re-cache) through :meth:`~.executor.CacheLayer.recompute` instead of streaming forward."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["RecacheView"]


class _RecacheLayer:
    def __init__(self, layer: Any, slot_start: int) -> None:
        self.layer, self.slot_start = layer, slot_start

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_frame: int) -> torch.Tensor:
        return self.layer.recompute(q, k, v, self.slot_start)


class RecacheView:
    """A cache-shaped view that makes one model pass rewrite held frames instead of streaming forward.

    ``model(latents, zeros, new_text, cache=RecacheView(cache, slot_start), start_frame=first_frame)`` recomputes
    the K/V of the whole frames at ``slot_start`` in every layer (:meth:`~.executor.CacheLayer.recompute`) under the new
    text; the schedule, Top-C slots and all other frames stay as they are. The groups to rewrite, in order, are
    ``cache.layers[0].whole_frame_groups()`` (the same slots in every layer).
    """

    def __init__(self, cache: Any, slot_start: int) -> None:
        self.dtype = cache.dtype
        self.layers = tuple(_RecacheLayer(layer, slot_start) for layer in cache.layers)
