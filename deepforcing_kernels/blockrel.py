"""Block-relativistic placement (Infinity-RoPE, docs/methods.md): pure integer rules the schedule engine applies to
an ``infinity_rope`` policy.

The authors' code keeps keys unrotated and, at every pass, rotates the window it attends at positions ``0 .. L-1``
(slot order) and the block's queries at ``W - F`` (``f0`` while the stream is inside its first window), where ``L``
is the frames attended, ``W = window_frames`` and ``F = block_frames``. Attention depends only on position
differences, so here the queries stay at their absolute frame ``f0`` and slot ``i`` is attended at ``base + i``
with ``base = f0 - q`` (``q`` the queries' relative position): keys stored RoPE'd at their own frame are moved
on load by ``base + i - frame`` (zero for the FIFO frames of a full window: only the sink moves, as Deep Sink
with ``sink_gap = 0``).

Two events, both set by a prompt switch and applied at the next block's first pass (what the authors' pipeline
does right before that block):

* flush (kv_flush): the cache keeps the sink and its last ``flush_frames`` frames;
* cut (rope_cut, with the flush): the block is placed at ``cut_position``: its queries and its own keys sit at
  ``cut_position + j`` while the other slots keep ``i`` (the authors hard-code the block as the window's last 3
  frames, ``transition_frames = 3``; here it is the block's ``block_frames``).
"""
from __future__ import annotations

from typing import Optional, Tuple

from .policy import CachePolicy

__all__ = ["EVENTS", "placement"]

#: the pending events a prompt switch can leave for the next block (``cut`` implies the flush)
EVENTS = ("flush", "cut")


def placement(policy: CachePolicy, frames_before: int, rel_start: int, frames: int,
              pending: Optional[str]) -> Tuple[int, int, int, bool]:
    """Where a new block of ``frames`` frames starting ``rel_start`` frames into the stream goes, on a cache of
    ``frames_before`` frames with ``pending`` (None, ``"flush"`` or ``"cut"``).

    Returns ``(evict, attend, q, cut)``: frames evicted right after the sink (the flush's, then the roll's), frames
    attended (its own block included), the queries' relative position (slot ``i`` sits at ``i``), and whether the
    block is placed by a cut."""
    S, W, F, L = policy.sink_frames, policy.window_frames, frames, frames_before
    evict = 0
    if pending in EVENTS and policy.flush_frames is not None and L > S:
        keep = S + min(policy.flush_frames, L - S)
        evict, L = L - keep, keep
    rolled = L + F > W
    if rolled:
        evict += L + F - W
        L = W - F
    cut = pending == "cut"
    # the authors' query position: W - F on the rolling branch or once past the first window, else its frame
    q = policy.cut_position if cut else (W - F if rolled or rel_start >= W else rel_start)
    return evict, L + F, q, cut
