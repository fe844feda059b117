"""MemRoPE's memory slots: exponential moving averages of the evicted frames' un-rotated K/V, one frame each.

The authors' code (docs/methods.md) keeps un-rotated keys in its cache and, at the first pass of every block that
rolls the window, averages the evicted frames' keys and values over all their tokens (one vector per head), folds
that mean into two EMAs (``m = a * mean + (1 - a) * m``, ``a`` = 0.01 and 0.1) held in the two frame slots after
the sink, and rotates the whole cache at contiguous positions for attention.

Here the cache stores every key rotated at its own frame, so the fold un-rotates the evicted keys exactly
(:func:`deepforcing_kernels.rotation.rotate_at_frames`, float32 from float64 angles: a few multiplies per evicted
token, against keeping a second, un-rotated copy of the window). The EMA vectors themselves are kept un-rotated,
in float32, beside the slots (:class:`EmaMemory`); after each fold memory frame ``i`` is written to its slot as
the EMA rotated at temporal position ``stream_start + sink_frames + i`` (and each token at its own row and
column), as if it were that frame of the stream. The sink and the memories then form one prefix that the attention
kernel re-phases by one shift on load, which puts them at the authors' contiguous positions; nothing is rotated in
place and no rounding accumulates in the slots (each fold writes them afresh from the float32 EMA).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..policy import CachePolicy
from ..rope import RopeSpec
from ..rotation import rotate_at_frames
from ..schedule import PassPlan
from .storage import LayerStorage

__all__ = ["EmaMemory"]


class EmaMemory:
    """The EMA memories of one layer: un-rotated float32 ``k``, ``v`` of shape ``[B, M, Hkv, D]``.

    Args:
        storage: the layer's storage (geometry, device).
        policy: a ``memrope`` policy (``memory_alphas``, ``sink_frames``).
        rope: the keys' RoPE layout.
        grid: the spatial grid of a frame for a 3-D ``rope`` (``(rows, cols)``), None for a 1-D one.
    """

    def __init__(self, storage: LayerStorage, policy: CachePolicy, rope: RopeSpec,
                 grid: Optional[Sequence[int]]) -> None:
        st = storage
        self.alphas = policy.memory_alphas
        self.sink_frames = policy.sink_frames
        self.rope, self.grid, self.n = rope, None if grid is None else tuple(grid), st.tokens_per_frame
        shape = (st.batch, len(self.alphas), st.kv_heads, st.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32, device=st.device)
        self.v = torch.zeros(shape, dtype=torch.float32, device=st.device)

    def fold(self, storage: LayerStorage, plan: PassPlan, stream_start: int) -> None:
        """Run a roll's fold (``plan.fold``) on the cache before its eviction: average the named frame slots'
        un-rotated K and their V over all tokens, start (``plan.fold_init``) or update every EMA, and write the
        memory slots."""
        start, count = plan.fold
        n, st = self.n, storage
        lo, hi = start * n, (start + count) * n
        frames = st.frames[:, lo:hi:n]  # each slot frame's own position (whole frames)
        k_mean = rotate_at_frames(st.k[:, lo:hi].float(), self.rope, frames, self.grid, inverse=True).mean(dim=1)
        v_mean = st.v[:, lo:hi].float().mean(dim=1)
        for i, a in enumerate(self.alphas):
            if plan.fold_init:
                self.k[:, i], self.v[:, i] = k_mean, v_mean
            else:  # the authors' order of operations: a * mean + (1 - a) * old
                self.k[:, i] = a * k_mean + (1 - a) * self.k[:, i]
                self.v[:, i] = a * v_mean + (1 - a) * self.v[:, i]
        self.write(st, stream_start)

    def write(self, storage: LayerStorage, stream_start: int) -> None:
        """Materialise the memory slots from the EMAs: memory ``i`` at slot frame ``sink_frames + i``, its key
        rotated at ``stream_start + sink_frames + i`` (its source frame, as far as re-phasing is concerned)."""
        st, n = storage, self.n
        B, M, H, D = self.k.shape
        S = self.sink_frames
        pos = stream_start + S + torch.arange(M, device=st.device, dtype=torch.int64)
        k = self.k[:, :, None].expand(B, M, n, H, D).reshape(B, M * n, H, D)
        st.k[:, S * n:(S + M) * n] = rotate_at_frames(k, self.rope, pos, self.grid).to(st.dtype)
        st.v[:, S * n:(S + M) * n] = self.v[:, :, None].expand(B, M, n, H, D).reshape(B, M * n, H, D).to(st.dtype)
        st.frames[:, S * n:(S + M) * n] = pos.repeat_interleave(n)
        for t in st.extra.values():
            t[:, S * n:(S + M) * n] = 0

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def state(self) -> Dict[str, torch.Tensor]:
        """Clones of the EMAs (``memory_k``, ``memory_v``)."""
        return {"memory_k": self.k.clone(), "memory_v": self.v.clone()}

    def load(self, d: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (checked by :mod:`.state`)."""
        self.k.copy_(d["memory_k"])
        self.v.copy_(d["memory_v"])
