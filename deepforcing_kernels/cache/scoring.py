"""Participative Compression's scores, and the compression step that acts on them.

Two scorers, each owning its buffers:

* :class:`LogitScorer` (``score="logits"``, the release): every pass adds its per-frame query sums to a buffer
  of the last ``recent_frames`` frames; the compressing pass scores candidate keys by the raw logit
  ``sum_h q_sum[h] . k[h]`` (:func:`release_logit_score`).
* :class:`MassScorer` (``score="mass"``): the softmax attention mass the kernel returns, summed over query heads:
  the current pass's queries plus a per-slot mass carried from the previous pass's last ``recent - block``
  frames of queries (kept beside the slots, so it moves with its token).

Both sum over heads and then call one hook, ``reduce_over_heads(partial [B, L]) -> [B, L]`` (identity by
default), before Top-C is chosen: a cache that holds only some heads (a head-sharded multi-GPU cache) replaces
it with a deterministic sum over its peers, so every shard selects the same tokens.

:func:`compress_step` is the compression itself (choose Top-C with the reuse cap, gather, bump the counters);
the benchmarks call the same function.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .storage import LayerStorage, eager_under_compile, move_left, select_topc

__all__ = ["Scorer", "LogitScorer", "MassScorer", "release_logit_score", "compress_step", "identity_reduce",
           "mass_part_keys"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity_reduce(partial: torch.Tensor) -> torch.Tensor:
    """The single-cache reduction: the partial score already covers every head."""
    return partial


def release_logit_score(q_buffer: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The release's Participative Compression score: raw logits, no softmax.

    ``score[b, j] = sum_h q_sum[b, h] . k[b, j, h // group]`` with ``q_sum = q_buffer.sum(tokens)``, computed in
    float32. One score per token, shared by all heads.

    Args:
        q_buffer: recent queries ``[B, Lb, Hq, D]`` (already RoPE'd), or per-frame query sums.
        k: keys of the augmented cache ``[B, Lk, Hkv, D]`` (as stored: the release scores before re-phasing).

    Returns:
        float32 ``[B, Lk]``.
    """
    from .._checks import check_tensor

    check_tensor("q_buffer", q_buffer, ndim=4)
    check_tensor("k", k, ndim=4)
    if q_buffer.shape[0] != k.shape[0] or q_buffer.shape[-1] != k.shape[-1]:
        raise ValueError(f"q_buffer {list(q_buffer.shape)} and k {list(k.shape)} disagree on batch or head_dim")
    Hq, Hkv = q_buffer.shape[2], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q_buffer heads ({Hq}) must be a multiple of k heads ({Hkv})")
    B, Lk, _, D = k.shape
    q_sum = q_buffer.sum(dim=1, dtype=torch.float32)  # [B, Hq, D]
    q_sum = q_sum.view(B, Hkv, Hq // Hkv, D).sum(dim=2)  # heads of a group share their key
    # One [rows, Hkv*D] x [Hkv*D] float32 product per chunk of keys: upcasting the whole cache at once (or an
    # einsum) streams it through memory twice and is ~10x slower on CPU; chunks of ~1M elements stay in cache.
    k2, q2 = k.reshape(B, Lk, Hkv * D), q_sum.reshape(B, Hkv * D, 1)
    score = torch.empty(B, Lk, dtype=torch.float32, device=k.device)
    rows = max(1, (1 << 20) // (Hkv * D))
    for s in range(0, Lk, rows):
        score[:, s:s + rows] = torch.bmm(k2[:, s:s + rows].float(), q2).squeeze(-1)
    return score


class Scorer:
    """The contract of a Top-C scorer, which the pass executor calls the same way for every scorer.

    Per pass: :meth:`observe` sees the pass's queries (before any compression); :meth:`carry` keeps attention
    mass the next compression will reuse (mass-based scorers); :meth:`candidate_scores` scores the compression's
    candidate slots ``[start, end)``, given the mass of the compressing pass when the scorer is mass-based (the
    schedule then compresses after that pass's attention, over the augmented cache; otherwise before it). Every
    score is summed over this cache's heads, then reduced by
    ``reduce_over_heads``. State: :attr:`slot_buffers` (per-slot buffers the storage carries with the tokens),
    :meth:`state` / :meth:`state_spec` / :meth:`load` (the rest), :meth:`reset`.
    """

    #: per-slot buffers this scorer keeps in the layer's storage (``{name: dtype}``)
    slot_buffers: Dict[str, torch.dtype] = {}

    def __init__(self, reduce_over_heads: Optional[Reduce] = None) -> None:
        self.reduce_over_heads: Reduce = reduce_over_heads or identity_reduce

    def observe(self, q: torch.Tensor, frames: int) -> None:
        """Called with every pass's queries (``frames`` frames; before any compression of that pass)."""

    def carry(self, storage: LayerStorage, length: int, mass: torch.Tensor, part: int = 0) -> None:
        """Keep ``mass [B, Hkv, length]`` for the next compression (mass-based scorers; a no-op otherwise) as
        carried part ``part`` (one per earlier block the score reaches back to)."""

    def candidate_scores(self, storage: LayerStorage, start: int, end: int, *masses: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, end - start]``: the reduced score of each candidate slot in ``[start, end)``; ``masses``
        are the compressing pass's attention mass parts ``[B, Hkv, >= end]`` (mass-based scorers only)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the stream."""

    def state(self) -> Optional[torch.Tensor]:
        """Buffers that are not per slot (a clone), or None."""
        return None

    def state_spec(self) -> Optional[Tuple[Tuple[int, ...], torch.dtype]]:
        """``(shape, dtype)`` of :meth:`state`, or None (what a saved state must hold)."""
        return None

    def load(self, t: Optional[torch.Tensor]) -> None:
        """Restore :meth:`state`."""


class LogitScorer(Scorer):
    """The release's logit score over per-frame query sums of the last ``recent_frames`` frames.

    Args:
        batch, num_heads, head_dim, recent_frames, block_frames: geometry.
        device: where the query buffer lives.
        frame_sums: ``(q, frames) -> [B, frames, H, D]`` float32 per-frame query sums (the backend's helper).
        reduce_over_heads: see the module docstring.
    """

    def __init__(self, *, batch: int, num_heads: int, head_dim: int, recent_frames: int, block_frames: int,
                 device: torch.device, frame_sums: Callable[[torch.Tensor, int], torch.Tensor],
                 reduce_over_heads: Optional[Reduce] = None) -> None:
        super().__init__(reduce_over_heads)
        self.block_frames, self.frame_sums = block_frames, frame_sums
        self.qbuf = torch.zeros(batch, recent_frames, num_heads, head_dim, dtype=torch.float32, device=device)

    def observe(self, q: torch.Tensor, frames: int) -> None:
        F, R = min(frames, self.qbuf.shape[1]), self.qbuf.shape[1]
        sums = self.frame_sums(q, frames)[:, frames - F:]
        move_left(self.qbuf, F, 0, R - F)
        self.qbuf[:, R - F:] = sums

    def candidate_scores(self, storage: LayerStorage, start: int, end: int, *masses: torch.Tensor) -> torch.Tensor:
        """The release's logit score of the candidate keys as stored (the release scores before re-phasing)."""
        return self.reduce_over_heads(release_logit_score(self.qbuf, storage.k[:, start:end]))

    def reset(self) -> None:
        self.qbuf.zero_()

    def state(self) -> torch.Tensor:
        return self.qbuf.clone()

    def state_spec(self) -> Tuple[Tuple[int, ...], torch.dtype]:
        return tuple(self.qbuf.shape), self.qbuf.dtype

    def load(self, t: Optional[torch.Tensor]) -> None:
        self.qbuf.copy_(t)


class MassScorer(Scorer):
    """Attention mass: carried per-slot mass plus the current pass's mass.

    ``parts`` carried buffers (``storage.extra["mass"]``, then ``"mass1"`` ...): one when the previous block's
    queries cover the carried frames (chunk-wise), else one per earlier block, written in turn (block ``b`` into
    part ``b % parts``, after its compression has read the part of block ``b - parts``). A part covers the
    slots that existed when it was recorded; every candidate of a later compression is older than that.
    """

    def __init__(self, reduce_over_heads: Optional[Reduce] = None, parts: int = 1) -> None:
        super().__init__(reduce_over_heads)
        self.names = ("mass",) + tuple(f"mass{i}" for i in range(1, parts))
        self.slot_buffers = {n: torch.float32 for n in self.names}

    def carry(self, storage: LayerStorage, length: int, mass: torch.Tensor, part: int = 0) -> None:
        """Keep ``mass [B, Hkv, length]`` (summed over heads) as carried part ``part`` of later compressions."""
        storage.extra[self.names[part]][:, :length] = mass.sum(dim=1)

    def candidate_scores(self, storage: LayerStorage, start: int, end: int, *masses: torch.Tensor) -> torch.Tensor:
        """Carried parts + each pass part (summed over heads), in that order, then reduced."""
        total = storage.extra["mass"][:, start:end]
        for n in self.names[1:]:
            total = total + storage.extra[n][:, start:end]
        for m in masses:
            total = total + m[:, :, start:end].sum(dim=1)
        return self.reduce_over_heads(total)


def mass_part_keys(policy: Any) -> Tuple[str, ...]:
    """The layer-state keys of the mass score's carried parts beyond ``mass`` (frame-wise Deep Forcing carries
    one per earlier block: ``mass1``, ...; none chunk-wise)."""
    if not (policy.compresses and policy.score == "mass"):
        return ()
    return tuple(f"mass{i}" for i in range(1, policy.mass_parts))


@eager_under_compile  # in-place compaction of the storage: eager even under torch.compile (see .storage)
def compress_step(storage: LayerStorage, cand_score: torch.Tensor, *, sink_tokens: int, topc_tokens: int,
                  recent_tokens: int, end: int, max_reuse: Optional[int]) -> torch.Tensor:
    """Participative Compression of the augmented cache ``[0, end)`` in place: keep the sink, the Top-C of the
    candidates ``[sink_tokens, end - recent_tokens)`` (scored by ``cand_score [B, candidates]``; tokens chosen
    ``max_reuse`` times only as filler) and the last ``recent_tokens``, in slot order, per batch element; bump the
    reuse counters of the chosen tokens. Returns the chosen slots ``[B, topc_tokens]`` (int64, before the move)."""
    S, C, R = sink_tokens, topc_tokens, recent_tokens
    reuse = storage.extra["reuse"]
    idx = select_topc(cand_score, reuse[:, S:end - R], C, max_reuse) + S
    storage.gather_topc(idx, S, end - R, S + C, R)
    reuse[:, S:S + C] += 1
    return idx
