"""What a cache layer is given by its cache: one immutable context object instead of the cache's own fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..policy import CachePolicy
from ..rope import RopeSpec

__all__ = ["LayerContext"]


@dataclass
class LayerContext:
    """The geometry, backend and shared buffers every :class:`~.executor.CacheLayer` of one
    :class:`~deepforcing_kernels.StreamingKVCache` runs with, validated by the cache. One object shared by the
    cache and all its layers; only the cache writes it (its ``backend_impl`` setter), the layers read it.

    Attributes:
        policy, batch_size, num_heads, num_kv_heads, head_dim, tokens_per_frame, dtype, device, rope,
        check_finite, reduce_over_heads: as the cache was built with.
        backend_impl: the attention backend the cache resolved (:class:`~deepforcing_kernels.backends.Backend`).
        capacity_frames: slots per layer, in frames (window + one block; ``full``: its initial reserve).
        block_tokens: tokens of one block.
        want_q, want_kv: the shapes of a full block's ``q`` and ``k`` / ``v``.
        run_kw: the arguments every pass passes to the backend besides the layout.
        scratch: the Top-C gather buffer shared by all layers (they run one at a time), or None.
        frame_grid: the spatial grid of a frame (``(rows, cols)`` for a 3-D RoPE), for policies that un-rotate
            keys (``memrope``); None otherwise.
    """

    policy: CachePolicy
    batch_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens_per_frame: int
    dtype: torch.dtype
    device: torch.device
    rope: Optional[RopeSpec]
    check_finite: bool
    reduce_over_heads: Optional[Callable[[torch.Tensor], torch.Tensor]]
    backend_impl: Any
    capacity_frames: int
    block_tokens: int
    want_q: torch.Size
    want_kv: torch.Size
    run_kw: Dict[str, Any]
    scratch: Optional[torch.Tensor]
    frame_grid: Optional[Tuple[int, ...]] = None
    #: whether the current pass is a block's clean pass, as :meth:`StreamingKVCache.mark_pass` set it (None: unknown)
    clean_pass: Optional[bool] = None
    #: tensors every layer reuses, built once per cache (Recency Forcing's per-key biases, by frames read and step)
    shared: Dict[Any, Any] = field(default_factory=dict)
