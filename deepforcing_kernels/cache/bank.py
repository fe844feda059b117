"""Rolling Sink's frame bank: the K/V of the stream's first ``tape_frames`` frames, kept to be replayed.

The authors' code (docs/methods.md) saves the *unrotated* K/V of the first window and, after each clean pass once
the window has filled, writes three of those frames into the slots of the block before the newest, rotated at
those slots' positions. Here the bank keeps the keys as the cache stores every key (RoPE'd at their own frame),
and a replayed slot records both its source frame (``storage.frames``) and its position (the per-slot ``pos``
buffer): attention rotates it by ``pos - frame`` on load, in float32 from float64 angles, like every other
re-phased key (:func:`deepforcing_kernels.rotation.shift_tables`). Nothing is ever rotated in place.

The bank is bounded (``tape_frames`` frames) and filled, like the replay, at the first pass of the next block
(:mod:`deepforcing_kernels.schedule`): the previous block's slots then hold its clean K/V, which is what the
authors' copy holds after the clean pass (their copy is written by every pass; the last one wins).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..schedule import PassPlan
from .storage import LayerStorage

__all__ = ["FrameBank"]


class FrameBank:
    """The banked K/V of frames ``0 .. frames - 1`` of a stream (relative to its first frame), one layer.

    Args:
        storage: the layer's storage (geometry, dtype, device).
        frames: ``tape_frames``.
    """

    def __init__(self, storage: LayerStorage, frames: int) -> None:
        st = storage
        self.n = st.tokens_per_frame
        shape = (st.batch, frames * self.n, st.kv_heads, st.head_dim)
        self.k = torch.zeros(shape, dtype=st.dtype, device=st.device)
        self.v = torch.zeros(shape, dtype=st.dtype, device=st.device)

    def apply(self, storage: LayerStorage, plan: PassPlan, used: int, prev_start: int, prev_frames: int,
              stream_start: int, block_frames: int) -> None:
        """Run a plan's bank and tape steps on a cache of ``used`` slots (before its eviction): bank the previous
        block's frames (``prev_frames`` frames from ``prev_start``: the last slots), then overwrite the block before it with
        the tape frames (their source frame goes to ``storage.frames``; ``pos`` keeps the slots' positions)."""
        n, Fn = self.n, block_frames * self.n
        if plan.bank:
            for f in plan.bank:
                src, dst = used - prev_frames * n + (f - prev_start) * n, (f - stream_start) * n
                self.k[:, dst:dst + n].copy_(storage.k[:, src:src + n])
                self.v[:, dst:dst + n].copy_(storage.v[:, src:src + n])
        if plan.tape_at is not None:
            at = used - 2 * Fn
            for i, f in enumerate(plan.tape):
                src, dst = (f - stream_start) * n, at + i * n
                storage.k[:, dst:dst + n].copy_(self.k[:, src:src + n])
                storage.v[:, dst:dst + n].copy_(self.v[:, src:src + n])
                storage.frames[:, dst:dst + n] = f

    @staticmethod
    def filled(tape_frames: int, block_start: Optional[int], stream_start: Optional[int]) -> int:
        """Frames banked once the block at ``block_start`` is the current one (every earlier block's frames
        below ``tape_frames``)."""
        if block_start is None:
            return 0
        return min(tape_frames, block_start - stream_start)

    def state(self, frames: int) -> Dict[str, torch.Tensor]:
        """Clones of the first ``frames`` banked frames."""
        return {"bank_k": self.k[:, :frames * self.n].clone(), "bank_v": self.v[:, :frames * self.n].clone()}

    def load(self, frames: int, d: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (checked by :mod:`.state`)."""
        self.k[:, :frames * self.n].copy_(d["bank_k"])
        self.v[:, :frames * self.n].copy_(d["bank_v"])
