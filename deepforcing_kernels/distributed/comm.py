"""The collectives of sequence parallelism, and the token layout they assume.

Token layout
    A block of ``nf`` frames holds ``nf * fs`` tokens, frame-major (Wan's order). Rank ``r`` of ``P`` owns the
    slice ``[r * fs/P, (r + 1) * fs/P)`` of **every frame**, so its local tokens are again frame-major with
    ``fs/P`` tokens per frame and the model's per-frame modulation (``unflatten(1, (nf, tokens // nf))``) works on
    them unchanged. ``fs`` must be divisible by ``P``.

All-to-alls
    :meth:`SequenceComm.tokens_to_heads` turns local tokens with all heads ``[B, nf*fs/P, H, D]`` into all tokens
    with the rank's heads ``[B, nf*fs, H/P, D]`` (heads ``[r*H/P, (r+1)*H/P)``, tokens back in the single-process
    order, so the cache sees exactly the slots a single process would); :meth:`SequenceComm.heads_to_tokens` is
    its inverse. Both are pure data movement: bit-exact with slicing a single-process tensor (tested).

Under ``torch.compile`` the collectives are the functional ones (``torch.distributed._functional_collectives``),
which it traces; in eager mode they are the plain ``torch.distributed`` calls: the first eager functional call
imports ``torch._dynamo`` (about 2-4 s per rank on a CPU) for nothing. Every call can be timed (:attr:`stats`) for the
benchmark's communication share.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["SequenceComm", "CommStats", "shard_tokens", "unshard_tokens", "reference_heads"]

def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


try:  # functional collectives: traceable by torch.compile (torch >= 2.1)
    import torch.distributed._functional_collectives as _fc
except ImportError:  # pragma: no cover - very old torch
    _fc = None


@dataclass
class CommStats:
    """Wall time and bytes of the collectives since the last :meth:`reset` (only while ``enabled``)."""

    enabled: bool = False
    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0
    per_kind: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.calls = 0.0, 0, 0
        self.per_kind = {}

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.seconds += seconds
        self.bytes_sent += nbytes
        self.calls += 1
        s, b, c = self.per_kind.get(kind, (0.0, 0, 0))
        self.per_kind[kind] = (s + seconds, b + nbytes, c + 1)


# ------------------------------------------------------------------------------------------ layout (no comms)
def shard_tokens(x: torch.Tensor, rank: int, world: int, frames: int) -> torch.Tensor:
    """Rank ``rank``'s tokens of ``x [B, frames * fs, ...]``: the slice ``[rank * fs/P, (rank+1) * fs/P)`` of
    every frame, ``[B, frames * fs/P, ...]`` (contiguous)."""
    b, s = x.shape[:2]
    if s % (frames * world):
        raise ValueError(f"{s} tokens are not {frames} frames of a multiple of {world} tokens")
    fsl = s // (frames * world)
    return x.reshape(b, frames, world, fsl, *x.shape[2:])[:, :, rank].reshape(b, frames * fsl, *x.shape[2:])


def unshard_tokens(parts: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: ``parts [P, B, frames * fs/P, ...]`` (rank-major) to ``[B, frames * fs,
    ...]`` in frame-major order."""
    p, b, sl = parts.shape[:3]
    rest = tuple(parts.shape[3:])
    y = parts.reshape(p, b, frames, sl // frames, *rest)
    perm = (1, 2, 0, 3) + tuple(range(4, y.dim()))
    return y.permute(perm).reshape(b, frames * p * (sl // frames), *rest)


def reference_heads(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What :meth:`SequenceComm.tokens_to_heads` must return on ``rank`` for a single-process ``x [B, S, H, D]``:
    the rank's contiguous group of ``H/P`` heads."""
    h = x.shape[2] // world
    return x[:, :, rank * h:(rank + 1) * h]


# ------------------------------------------------------------------------------------------ collectives
class SequenceComm:
    """The process group of one sequence-parallel model, and its collectives.

    Args:
        group: a ``torch.distributed`` process group (default: the whole world; it must be initialised).
        functional: ``True``: always the traceable functional collectives; ``False``: always the eager
            ``torch.distributed`` calls; ``None`` (default): functional only while ``torch.compile`` traces.
    """

    def __init__(self, group: Optional[Any] = None, *, functional: Optional[bool] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sequence parallelism needs an initialised torch.distributed process group "
                               "(launch with torchrun, or call torch.distributed.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.functional = None if functional is None else bool(functional)
        if self.functional and _fc is None:  # pragma: no cover
            raise RuntimeError("functional collectives are not available in this torch")
        self.stats = CommStats()

    def __repr__(self) -> str:
        return f"SequenceComm(rank={self.rank}, world={self.world}, functional={self.functional})"

    # ---------------------------------------------------------------- raw collectives
    def _use_functional(self) -> bool:
        if self.functional is None:
            return _fc is not None and _compiling()
        return self.functional

    def _clock(self) -> Optional[float]:
        """A start time when the stats are on (never while torch.compile traces: the graph has no clock)."""
        if self.stats.enabled and not _compiling():
            return time.perf_counter()
        return None

    def _record(self, kind: str, t0: Optional[float], x: torch.Tensor, fraction: float = 1.0) -> None:
        if t0 is not None:
            self.stats.add(kind, time.perf_counter() - t0, int(x.numel() * x.element_size() * fraction))

    def all_to_all(self, x: torch.Tensor, kind: str = "all_to_all") -> torch.Tensor:
        """``x [P, ...]`` contiguous: chunk ``j`` goes to rank ``j``; returns ``[P, ...]`` whose chunk ``i`` came
        from rank ``i``."""
        x = x.contiguous()
        t0 = self._clock()
        if self._use_functional():
            y = _fc.wait_tensor(_fc.all_to_all_single(x, None, None, self.group))
        else:
            y = torch.empty_like(x)
            dist.all_to_all_single(y, x, group=self.group)
        self._record(kind, t0, x, (self.world - 1) / self.world)  # bytes that leave this rank
        return y

    def all_gather(self, x: torch.Tensor, kind: str = "all_gather") -> torch.Tensor:
        """``[P, *x.shape]``: every rank's ``x``, in rank order."""
        x = x.contiguous()
        t0 = self._clock()
        if self._use_functional():
            gather = getattr(_fc, "all_gather_single", None) or _fc.all_gather_tensor
            y = _fc.wait_tensor(gather(x, 0, self.group)).view(self.world, *x.shape)
        else:
            # flat: Gloo wants the output as the inputs concatenated along dim 0, not stacked
            flat = torch.empty(self.world * x.numel(), dtype=x.dtype, device=x.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(flat, x.reshape(-1), group=self.group)
            y = flat.view(self.world, *x.shape)
        self._record(kind, t0, x)
        return y

    # ---------------------------------------------------------------- the sequence-parallel pieces
    def shard(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """This rank's tokens of a full block ``[B, frames * fs, ...]`` (no communication)."""
        return shard_tokens(x, self.rank, self.world, frames)

    def gather(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Every rank's local tokens ``[B, frames * fs/P, ...]`` back to the full block, frame-major."""
        return unshard_tokens(self.all_gather(x, "gather_tokens"), frames)

    def tokens_to_heads(self, xs: Sequence[torch.Tensor], frames: int) -> List[torch.Tensor]:
        """``[B, frames*fs/P, H, D]`` (local tokens, all heads) -> ``[B, frames*fs, H/P, D]`` (all tokens, this
        rank's heads), for several tensors of one shape in one all-to-all (q, k, v)."""
        P = self.world
        b, sl, h, d = xs[0].shape
        if h % P:
            raise ValueError(f"{h} heads cannot be split over {P} ranks")
        hl = h // P
        x = torch.stack(list(xs), 0).view(len(xs), b, sl, P, hl, d)
        y = self.all_to_all(x.permute(3, 0, 1, 2, 4, 5), "tokens_to_heads")  # [P(src), n, B, sl, hl, d]
        y = y.view(P, len(xs), b, frames, sl // frames, hl, d).permute(1, 2, 3, 0, 4, 5, 6)
        y = y.reshape(len(xs), b, frames * P * (sl // frames), hl, d)
        return list(y.unbind(0))

    def heads_to_tokens(self, y: torch.Tensor, frames: int) -> torch.Tensor:
        """Inverse of :meth:`tokens_to_heads` for one tensor: ``[B, frames*fs, H/P, D]`` -> ``[B, frames*fs/P, H,
        D]``."""
        P = self.world
        b, s, hl, d = y.shape
        fsl = s // (frames * P)
        x = y.reshape(b, frames, P, fsl, hl, d).permute(2, 0, 1, 3, 4, 5)  # [P(dst), B, nf, fsl, hl, d]
        z = self.all_to_all(x, "heads_to_tokens")  # [P(src = head group), B, nf, fsl, hl, d]
        return z.permute(1, 2, 3, 0, 4, 5).reshape(b, frames * fsl, P * hl, d)
