"""What attention applies to a layer's keys: :func:`attention_layout` turns a schedule state into the sink's
shift, or per-key shifts (unified Top-C, Rolling Sink's replayed frames, block-relative and contiguous windows).

It is the one place that knows how each policy's slots are positioned; the executor (:mod:`.executor`) calls it
for every layout it attends to, and the accessors (``positions()``, ``shifts()``) read it back.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..policy import CachePolicy

__all__ = ["attention_layout"]


def attention_layout(policy: CachePolicy, tokens_per_frame: int, frames: int, sink_start: Optional[int],
                     stream_start: Optional[int], compressed: bool, frame_tab: torch.Tensor,
                     pos_tab: Optional[torch.Tensor] = None, cut_tokens: int = 0) -> Dict[str, Any]:
    """``sink_len``, ``sink_shift`` (tokens / frames) and ``key_shift`` (int64 ``[B, L]`` or None) that attention
    applies over the first ``frames`` frames of slots, for a layer whose sink encodes ``sink_start``.

    Shifts are in frames (the temporal RoPE unit). With ``unify_topc_rope`` and a Top-C region, Top-C slot ``i``
    is placed right after the sink at ``sink_start + i // tokens_per_frame``, so every key gets its own shift.
    With a per-slot position table ``pos_tab`` (Rolling Sink's replayed frames) key ``j`` moves by
    ``pos_tab[:, j] - frame_tab[:, j]`` (None while no key moves). A block-relative policy (``infinity_rope``)
    attends slot ``j`` at ``sink_start + j // tokens_per_frame``, its last ``cut_tokens`` slots (a block placed by a
    scene cut) at their own frames; where only the sink moves that is ``sink_len`` / ``sink_shift``.
    """
    n = tokens_per_frame
    if policy.block_relative and sink_start is not None:
        L, S_tok = frames * n, min(policy.sink_frames, frames) * n
        slot = torch.arange(L, device=frame_tab.device) // n
        key_shift = sink_start + slot - frame_tab[:, :L]
        if cut_tokens:
            key_shift[:, L - cut_tokens:] = 0
        head = int(key_shift[0, 0]) if L else 0
        if not bool(key_shift[:, S_tok:].any()) and bool((key_shift[:, :S_tok] == head).all()):
            return {"sink_len": S_tok if head else 0, "sink_shift": head, "key_shift": None}
        return {"sink_len": 0, "sink_shift": 0, "key_shift": key_shift.contiguous()}
    if policy.tether_frames and sink_start is not None:  # TetherCache: every slot at its contiguous position
        L = frames * n
        pos = sink_start + torch.arange(L, device=frame_tab.device) // n
        return {"sink_len": 0, "sink_shift": 0, "key_shift": (pos - frame_tab[:, :L]).contiguous()}
    if pos_tab is not None:
        L = frames * n
        key_shift = pos_tab[:, :L] - frame_tab[:, :L]
        moved = bool(key_shift.any()) if L else False
        return {"sink_len": 0, "sink_shift": 0, "key_shift": key_shift.contiguous() if moved else None}
    shift = 0 if sink_start is None else sink_start - (stream_start if stream_start is not None else 0)
    sink_len = min(policy.prefix_frames, frames) * n if shift else 0  # MemRoPE's memories move with the sink
    key_shift = None
    if policy.unify_topc_rope and compressed and sink_start is not None:
        L, S_tok, C_tok = frames * n, policy.sink_frames * n, policy.topc_frames * n
        slot = torch.arange(S_tok, S_tok + C_tok, device=frame_tab.device)
        key_shift = torch.zeros(frame_tab.shape[0], L, dtype=torch.int64, device=frame_tab.device)
        key_shift[:, :S_tok] = shift
        key_shift[:, S_tok:S_tok + C_tok] = sink_start + slot // n - frame_tab[:, S_tok:S_tok + C_tok]
        sink_len, shift = 0, 0
    return {"sink_len": sink_len, "sink_shift": shift, "key_shift": key_shift}
