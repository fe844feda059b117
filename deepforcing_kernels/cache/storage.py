"""Storage of one cache layer: preallocated slot tensors and the in-place moves the schedule asks for.

A layer's slots hold, in time order, the sink, then Top-C tokens, then recent frames. Per slot it keeps the key,
the value, the source frame, and any per-slot buffers registered by others (the Top-C reuse counters, the mass
scorer's carried mass); every move (roll, compaction, Top-C gather) moves all of them together, so a token's
bookkeeping travels with it. Nothing here knows about policies or scores.

The in-place moves (:meth:`LayerStorage.evict`, :meth:`LayerStorage.gather_topc`) run eagerly even inside
``torch.compile``: they read and write overlapping parts of one buffer in a fixed order, and inductor fused such a
compaction into one parallel in-place kernel whose result depended on thread timing. They are pure data movement,
so a compiled graph loses nothing by leaving them out.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..backends import eager_under_compile

__all__ = ["LayerStorage", "move_left", "compact", "select_topc", "eager_under_compile"]


class LayerStorage:
    """Slot tensors of one layer, allocated once (``full`` grows by doubling).

    Args:
        batch, kv_heads, head_dim, tokens_per_frame: geometry.
        capacity_frames: initial capacity (``window + block`` for windowed policies).
        dtype, device: of K and V.
        extra: per-slot buffers to keep beside K/V: ``{name: dtype}`` (zeroed when a block's slots are new).
        scratch: a shared ``[B, C_tok, Hkv, D]`` buffer for the Top-C gather of K and V (layers run one at a time).
        slot_ops: the backend's single-threaded slot moves (:class:`~deepforcing_kernels.backends.CppSlotOps`),
            used where the tensors qualify; None: torch's copies.
    """

    def __init__(self, *, batch: int, kv_heads: int, head_dim: int, tokens_per_frame: int, capacity_frames: int,
                 dtype: torch.dtype, device: torch.device, extra: Optional[Dict[str, torch.dtype]] = None,
                 scratch: Optional[torch.Tensor] = None, slot_ops: Optional[object] = None) -> None:
        self.slot_ops = slot_ops
        self._frame_pattern: Dict[int, torch.Tensor] = {}
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.tokens_per_frame, self.dtype, self.device = tokens_per_frame, dtype, device
        self.extra_dtypes = dict(extra or {})
        self.scratch = scratch
        self._alloc(capacity_frames)

    def _alloc(self, frames: int) -> None:
        self.capacity = frames * self.tokens_per_frame
        shape = (self.batch, self.capacity, self.kv_heads, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.frames = torch.zeros(self.batch, self.capacity, dtype=torch.int64, device=self.device)
        self.extra = {name: torch.zeros(self.batch, self.capacity, dtype=dt, device=self.device)
                      for name, dt in self.extra_dtypes.items()}

    def grow(self, frames: int, used: int) -> None:
        """``full`` only: at least ``frames`` frames of capacity, doubling (amortised O(1) per token); keeps the
        first ``used`` slots."""
        new_frames = max(frames, 2 * (self.capacity // self.tokens_per_frame))
        old = self.per_slot()
        self._alloc(new_frames)
        for new, o in zip(self.per_slot(), old):
            new[:, :used].copy_(o[:, :used])

    def per_slot(self) -> List[torch.Tensor]:
        """Every tensor indexed by slot (moved together)."""
        return [self.k, self.v, self.frames] + list(self.extra.values())

    # ------------------------------------------------------------------ moves
    @eager_under_compile
    def evict(self, keep: int, count: int, used: int) -> None:
        """Drop slots ``[keep, keep + count)`` by moving ``[keep + count, used)`` left (FIFO after the sink)."""
        ops, ts = self.slot_ops, self.per_slot()
        if ops is not None and ops.usable(*ts):
            for t in ts:
                ops.move(t, keep + count, keep, used - keep - count)
            return
        for t in ts:
            move_left(t, keep + count, keep, used - keep - count)

    def write_new(self, off: int, k: torch.Tensor, v: torch.Tensor, first_frame: int, block_frames: int) -> None:
        """A new block's slots at ``off``: K/V, source frames, zeroed extras."""
        ops = self.slot_ops
        if ops is not None and ops.write_block is not None and ops.usable(k, v):  # the storage's own: contiguous
            ops.write_block(self.k, self.v, self.frames, list(self.extra.values()), off, k, v, first_frame,
                            block_frames)
            return
        n, Lb = self.tokens_per_frame, k.shape[1]
        pat = self._frame_pattern.get(block_frames)
        if pat is None:  # the block's frame offsets, token by token, made once per block length
            pat = self._frame_pattern[block_frames] = torch.arange(block_frames, device=self.device
                                                                   ).repeat_interleave(n).expand(self.batch, -1)
        torch.add(pat, first_frame, out=self.frames[:, off:off + Lb])
        for t in self.extra.values():
            t[:, off:off + Lb].zero_()
        self.write(off, k, v)

    def write(self, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite the K/V of slots ``[off, off + Lk)``."""
        ops = self.slot_ops
        if ops is not None and ops.usable(self.k, self.v, k, v):
            ops.copy(self.k, off, k)
            ops.copy(self.v, off, v)
            return
        Lb = k.shape[1]
        self.k[:, off:off + Lb].copy_(k)
        self.v[:, off:off + Lb].copy_(v)

    @eager_under_compile
    def gather_topc(self, idx: torch.Tensor, keep_head: int, recent_src: int, recent_dst: int,
                    recent_len: int) -> None:
        """Compaction: slots ``[0, keep_head)`` stay, the Top-C slots ``idx`` (int64 ``[B, C]``, ascending) follow
        them, then ``[recent_src, recent_src + recent_len)`` moves to ``recent_dst``; all per-slot tensors."""
        ops, ts = self.slot_ops, self.per_slot()
        if ops is not None and ops.usable(idx, *ts):
            ops.compact(ts, idx, keep_head, recent_src, recent_dst, recent_len)  # in place, no scratch
            return
        for t in ts:
            scratch = self.scratch if (t is self.k or t is self.v) else None
            compact(t, idx, keep_head, recent_src, recent_dst, recent_len, scratch)

    # ------------------------------------------------------------------ state
    def state(self, used: int) -> Dict[str, torch.Tensor]:
        """Clones of the used slots: ``k``, ``v``, ``frames`` and the extras by name."""
        d = {"k": self.k[:, :used].clone(), "v": self.v[:, :used].clone(), "frames": self.frames[:, :used].clone()}
        for name, t in self.extra.items():
            d[name] = t[:, :used].clone()
        return d

    def expected(self, used: int) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Shape and dtype each :meth:`state` entry must have for ``used`` slots."""
        B, H, D = self.batch, self.kv_heads, self.head_dim
        want = {"k": ((B, used, H, D), self.dtype), "v": ((B, used, H, D), self.dtype),
                "frames": ((B, used), torch.int64)}
        for name, dt in self.extra_dtypes.items():
            want[name] = ((B, used), dt)
        return want

    def load(self, used: int, d: Dict[str, torch.Tensor]) -> None:
        """Copy a checked :meth:`state` back (``full`` reallocates when it needs more room)."""
        if used > self.capacity:
            self._alloc(used // self.tokens_per_frame)
        self.k[:, :used].copy_(d["k"])
        self.v[:, :used].copy_(d["v"])
        self.frames[:, :used].copy_(d["frames"])
        for name, t in self.extra.items():
            t[:, :used].copy_(d[name])


# ---------------------------------------------------------------------------------------------- tensor helpers
def select_topc(score: torch.Tensor, reuse: torch.Tensor, count: int, max_reuse: Optional[int]) -> torch.Tensor:
    """Top-``count`` candidates per row, eligible ones first (``reuse < max_reuse``), then the best-scoring
    ineligible ones as filler; returns int64 indices ``[B, count]`` sorted ascending (slot order).

    Ties keep the lower slot first (stable sorts), so the choice is deterministic.
    """
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    if max_reuse is not None:
        ineligible = (reuse >= max_reuse).gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(ineligible, dim=1, stable=True).indices)  # eligible first
    return torch.sort(order[:, :count], dim=1).values


def move_left(t: torch.Tensor, src: int, dst: int, length: int) -> None:
    """``t[:, dst:dst+length] = t[:, src:src+length]`` for ``dst < src``, in place: copies in chunks of
    ``src - dst`` slots so no copy reads what an earlier one wrote."""
    step = src - dst
    for off in range(0, length, step):
        m = min(step, length - off)
        t[:, dst + off:dst + off + m].copy_(t[:, src + off:src + off + m])


def compact(t: torch.Tensor, idx: torch.Tensor, keep_head: int, recent_src: int, recent_dst: int,
            recent_len: int, scratch: Optional[torch.Tensor]) -> None:
    """In place: slots ``[0, keep_head)`` stay, ``idx`` (Top-C, ascending) are gathered right after them, then
    ``[recent_src, recent_src + recent_len)`` moves to ``recent_dst``."""
    C = idx.shape[1]
    # index_select per batch element copies whole [H, D] rows; a gather with an expanded 4-D index is ~40x slower
    picked = scratch[:, :C] if scratch is not None else t.new_empty((t.shape[0], C) + tuple(t.shape[2:]))
    for b in range(t.shape[0]):
        torch.index_select(t[b], 0, idx[b], out=picked[b])
    if recent_src != recent_dst:
        move_left(t, recent_src, recent_dst, recent_len)
    t[:, keep_head:keep_head + C].copy_(picked)
