"""The commit rule's shadow: the newest real committed frames of one layer, which the block's clean pass reads.

The commit rule (``Dwell-Jing/commit-forcing``, docs/methods.md) leaves every denoising pass and everything a policy
keeps as it is, and lets the clean (commit) pass of a block attend only to the newest ``N`` frames the stream has
really committed, the block itself included, at their own positions: no sink, no replayed, averaged, admitted or
Top-C frames. Their Rolling Sink integration keeps exactly this beside the cache (a FIFO of the clean passes' K/V,
"same size and first-in-first-out eviction"); here every policy gets it, so the rule composes with each of them.

Each clean pass writes the block's K/V (RoPE'd at their absolute frames, as the cache stores every key) into a FIFO
of ``N`` frames, then attends to all of it with no re-phasing. A second clean pass of the same block overwrites its
frames. Storage is allocated once (``N`` frames a layer), so memory is flat at any length; the shadow is part of the
cache's state (``commit_k``, ``commit_v``, ``commit_frames``) and :func:`check_shadow_state` refuses a damaged one.

Where the policy's own cache always ends with the newest ``N`` committed frames, whole and as written
(:func:`reads_cache`: ``full``; ``sliding`` up to its window; ``frame_sink`` / ``deep_sink`` up to their FIFO;
``memrope`` up to its recent frames; ``deep_forcing`` and ``tethercache`` up to ``recent_frames``, which is
TetherCache's default rule), the clean pass reads those last slots instead (the same keys in the same order, so the
same attention bit for bit), and no copy is kept: the rule costs no memory there, as in the authors' TetherCache
integration, which reads its recent region in place.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .storage import LayerStorage

__all__ = ["CommitShadow", "SHADOW_KEYS", "check_shadow_state", "reads_cache", "needs_shadow"]

#: the further keys of a layer state under the commit rule
SHADOW_KEYS = frozenset({"commit_k", "commit_v", "commit_frames"})


def reads_cache(policy: Any) -> bool:
    """Whether the newest ``policy.commit_frames`` committed frames are, at every clean pass the rule applies to,
    the last frames of the policy's own cache, whole and in order (they are its FIFO or recent region, or all of
    it): the rule then reads them there."""
    N, p = policy.commit_frames, policy
    if N is None:
        return False
    W, S, R = p.window_frames, p.sink_frames, p.recent_frames
    real = {"full": N, "sliding": W, "frame_sink": W and W - S, "deep_sink": W and W - S,
            "memrope": W and W - S - p.memory_frames, "deep_forcing": R, "tethercache": R}.get(p.kind, 0)
    return N <= real


def needs_shadow(policy: Any) -> bool:
    """Whether the commit rule keeps its own copy of the committed frames for ``policy`` (part of the state)."""
    return policy.commit_rule is not None and not reads_cache(policy)


class CommitShadow:
    """The newest ``frames`` committed frames of one layer (K, V, source frame per slot), oldest first, or (where
    the cache itself holds them, :func:`reads_cache`) the reader of the cache's last ``frames`` frames.

    Args:
        like: the layer's storage (geometry, dtype, device and slot moves are taken from it; read in place when
            ``in_cache``).
        frames: ``N``, the frames the clean pass reads (:attr:`CachePolicy.commit_frames`).
        in_cache: read the last ``N`` frames of ``like`` (no copy, no state).
    """

    def __init__(self, like: LayerStorage, frames: int, in_cache: bool = False) -> None:
        self.n, self.N, self.in_cache, self.cache = like.tokens_per_frame, frames, in_cache, like
        self.used = 0  # slots holding committed tokens (in_cache: the slots the last clean pass read)
        self.store: Optional[LayerStorage] = None
        self.k = self.v = None
        if in_cache:
            return
        self.store = LayerStorage(batch=like.batch, kv_heads=like.kv_heads, head_dim=like.head_dim,
                                  tokens_per_frame=like.tokens_per_frame, capacity_frames=frames, dtype=like.dtype,
                                  device=like.device, slot_ops=like.slot_ops)
        # the store's K / V, named here too (the store moves slots in place and never reallocates: N frames fit)
        self.k, self.v = self.store.k, self.store.v

    def reset(self) -> None:
        """Forget the stream (the storage stays allocated)."""
        self.used = 0

    def commit(self, k: torch.Tensor, v: torch.Tensor, start_frame: int) -> None:
        """Write a clean pass's K/V (``[B, F * n, Hkv, D]``, frames ``start_frame ..``): the same block again
        overwrites its frames, a new one goes last, the oldest frames leaving when the FIFO is full."""
        if self.in_cache:  # the cache has just written them
            return
        st, Lb = self.store, k.shape[1]
        F = Lb // self.n
        if self.used and int(st.frames[0, self.used - 1]) == start_frame + F - 1:  # this block's clean pass again
            st.write(self.used - Lb, k, v)
            return
        if self.used + Lb > st.capacity:
            out = self.used + Lb - st.capacity
            st.evict(0, out, self.used)
            self.used -= out
        st.write_new(self.used, k, v, start_frame, F)
        self.used += Lb

    def attend(self, q: torch.Tensor, run: Callable[..., Any], run_kw: Dict[str, Any], end: int) -> torch.Tensor:
        """Attention of ``q`` (RoPE'd at its absolute frames) over the committed frames, keys at their own
        positions (``run``: the cache's backend; ``end``: the slots the pass's cache holds, for ``in_cache``)."""
        if self.in_cache:
            lo = max(0, end - self.N * self.n)
            self.used, self._lo = end - lo, lo
            k, v = self.cache.k[:, lo:end], self.cache.v[:, lo:end]
        else:
            k, v = self.store.k[:, :self.used], self.store.v[:, :self.used]
        return run(q, k, v, sink_len=0, sink_shift=0, key_shift=None, return_mass=False,
                   mass_q_range=(0, q.shape[1]), **run_kw)[0]

    def refresh(self, k: torch.Tensor, v: torch.Tensor, first_frame: int) -> None:
        """A re-cache rewrote frames ``first_frame ..`` of the cache: rewrite those the shadow holds too."""
        if not self.used or self.in_cache:
            return
        n, fr = self.n, self.store.frames[0, :self.used:self.n].tolist()
        for j in range(k.shape[1] // n):
            if first_frame + j in fr:
                at = fr.index(first_frame + j) * n
                self.store.write(at, k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n])

    def frames(self) -> torch.Tensor:
        """``[B, used]`` int64: the frame of each committed slot (a copy; ``in_cache``: the slots the last clean
        pass read)."""
        if self.in_cache:
            return self.cache.frames[:, self._lo:self._lo + self.used].clone() if self.used else \
                torch.zeros(self.cache.batch, 0, dtype=torch.int64, device=self.cache.device)
        return self.store.frames[:, :self.used].clone()

    def state(self) -> Dict[str, torch.Tensor]:
        """Clones of the used slots (``commit_k``, ``commit_v``, ``commit_frames``; nothing ``in_cache``)."""
        if self.in_cache:
            return {}
        d = self.store.state(self.used)
        return {"commit_k": d["k"], "commit_v": d["v"], "commit_frames": d["frames"]}

    def load(self, d: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (checked by :func:`check_shadow_state`)."""
        if self.in_cache:
            self.used = 0
            return
        self.used = d["commit_k"].shape[1]
        self.store.load(self.used, {"k": d["commit_k"], "v": d["commit_v"], "frames": d["commit_frames"]})


def check_shadow_state(ctx: Any, frames: int, d: Dict[str, Any],
                       stream: Optional[Tuple[int, int]]) -> Optional[str]:
    """What is wrong with a saved shadow (None when nothing): ``commit_k`` / ``commit_v`` of the cache's dtype and
    geometry, at most ``frames`` whole frames, finite; ``commit_frames`` one frame number per frame, the same for
    the batch, increasing, inside ``stream`` = (its first frame, the end of its current block); None: no stream
    yet, so nothing committed."""
    n, B, H, D = ctx.tokens_per_frame, ctx.batch_size, ctx.num_kv_heads, ctx.head_dim
    k, v, f = d["commit_k"], d["commit_v"], d["commit_frames"]
    if not all(isinstance(t, torch.Tensor) for t in (k, v, f)):
        return "the commit rule's shadow (commit_k, commit_v, commit_frames) must be tensors"
    u = k.shape[1] if k.dim() == 4 else -1
    if u < 0 or u % n or u > frames * n or tuple(k.shape) != (B, u, H, D) or tuple(v.shape) != (B, u, H, D) or \
            k.dtype != ctx.dtype or v.dtype != ctx.dtype or tuple(f.shape) != (B, u) or f.dtype != torch.int64:
        return (f"the commit rule's shadow must hold at most {frames} whole frames of {ctx.dtype} K/V "
                f"[{B}, L, {H}, {D}] and int64 frames [{B}, L]")
    for t in (k, v, f):
        if t.layout != torch.strided or t.device.type not in ("cpu", ctx.device.type):
            return "the commit rule's shadow must be dense tensors on the CPU or the cache's device"
    if stream is None and u:
        return "the commit rule's shadow holds frames, but the stream has not started"
    if not u:
        return None
    if not bool(torch.isfinite(k.float()).all()) or not bool(torch.isfinite(v.float()).all()):
        return "the commit rule's shadow holds NaN or inf"
    per = f.view(B, u // n, n)
    if not bool((per == per[..., :1]).all()) or not bool((f == f[:1]).all()):
        return "the commit rule's shadow mixes frames inside a frame or across the batch"
    fr = per[0, :, 0]
    if bool((fr[1:] <= fr[:-1]).any()) or int(fr[0]) < stream[0] or int(fr[-1]) >= stream[1]:
        return f"the commit rule's shadow frames {fr.tolist()} are not increasing frames the stream has produced"
    return None
