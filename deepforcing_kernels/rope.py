"""Rotary position embedding specifications.

A :class:`RopeSpec` is plain data: how the ``head_dim`` channels pair up (interleaved or half-split), which pairs
belong to which grid axis, and the frequency of every pair. The maths that uses it lives in
:mod:`deepforcing_kernels.reference.rope` (the oracle) and in the kernels, which read the same fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence, Tuple

import torch

Layout = Literal["interleaved", "half"]


@dataclass(frozen=True)
class RopeSpec:
    """How rotary embeddings are laid out over ``head_dim`` channels.

    Attributes:
        head_dim: number of channels per head (even).
        theta: RoPE base.
        layout: ``"interleaved"`` (pair ``i`` is channels ``(2i, 2i+1)``, GPT-J / Wan) or ``"half"``
            (pair ``i`` is channels ``(i, i + head_dim/2)``, NeoX / LLaMA).
        band_dims: channel count of each grid axis band, temporal band first. Pairs are assigned to bands in
            order; band ``a`` with ``n`` channels has pair frequencies ``theta ** (-2j / n)`` for ``j < n/2``.
        head_scale: optional per-head multiplier of the temporal band's frequencies, one positive float per
            (KV) head: head ``h`` rotates temporal pair ``j`` at ``head_scale[h] * theta ** (-2j / n)`` (query head
            ``i`` of a GQA group uses its KV head's scale). None (default): every head the same, at no cost.
            Built by :meth:`with_head_scale` / :func:`head_jitter`.
    """

    head_dim: int
    theta: float
    layout: Layout
    band_dims: Tuple[int, ...]
    head_scale: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim!r}")
        if self.layout not in ("interleaved", "half"):
            raise ValueError(f"layout must be 'interleaved' or 'half', got {self.layout!r}")
        if not (isinstance(self.theta, (int, float)) and self.theta > 1.0):
            raise ValueError(f"theta must be a number > 1, got {self.theta!r}")
        if sum(self.band_dims) != self.head_dim or any(d <= 0 or d % 2 for d in self.band_dims):
            raise ValueError(f"band_dims {self.band_dims} must be positive even sizes summing to head_dim")
        if self.head_scale is not None:
            hs = self.head_scale
            if not isinstance(hs, tuple) or not hs or not all(
                    isinstance(x, float) and math.isfinite(x) and x > 0 for x in hs):
                raise ValueError(f"head_scale must be a non-empty tuple of finite floats > 0, got {hs!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def wan(cls, head_dim: int = 128, theta: float = 10000.0) -> "RopeSpec":
        """Wan2.1 3-D RoPE: (frame, row, col) bands, interleaved pairs, temporal band first.

        Temporal channels ``head_dim - 4 * (head_dim // 6)``, height and width ``2 * (head_dim // 6)`` each
        (44 / 42 / 42 for head_dim 128).
        """
        _check_head_dim(head_dim)
        hw = 2 * (head_dim // 6)
        return cls(head_dim, float(theta), "interleaved", (head_dim - 2 * hw, hw, hw))

    @classmethod
    def llama(cls, head_dim: int, theta: float = 10000.0) -> "RopeSpec":
        """1-D RoPE with half-split pairs (NeoX / LLaMA). Every pair is temporal."""
        _check_head_dim(head_dim)
        return cls(head_dim, float(theta), "half", (head_dim,))

    @classmethod
    def gptj(cls, head_dim: int, theta: float = 10000.0) -> "RopeSpec":
        """1-D RoPE with interleaved pairs (GPT-J). Every pair is temporal."""
        _check_head_dim(head_dim)
        return cls(head_dim, float(theta), "interleaved", (head_dim,))

    def with_head_scale(self, scale: Optional[Sequence[float]]) -> "RopeSpec":
        """This spec with per-head temporal frequency scales (None: removed). ValueError for a bad scale."""
        if scale is None:
            return replace(self, head_scale=None)
        try:
            values = tuple(float(x) for x in scale)
        except (TypeError, ValueError):
            raise ValueError(f"head_scale must be a sequence of positive floats, got {scale!r}") from None
        return replace(self, head_scale=values)

    # ------------------------------------------------------------------ derived facts
    @property
    def num_pairs(self) -> int:
        return self.head_dim // 2

    @property
    def num_axes(self) -> int:
        """Grid axes: 3 for Wan (frame, row, col), 1 for 1-D specs."""
        return len(self.band_dims)

    @property
    def temporal_pairs(self) -> int:
        """Pairs ``0 .. temporal_pairs-1`` encode the temporal (frame / token) position."""
        return self.band_dims[0] // 2

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    def pair_channels(self, pair: int) -> Tuple[int, int]:
        """The (real, imaginary) channel indices of pair ``pair``."""
        if self.interleaved:
            return 2 * pair, 2 * pair + 1
        return pair, pair + self.num_pairs

    def band_freqs(self, band: int) -> torch.Tensor:
        """float64 frequencies of one band's pairs: ``theta ** (-2j / band_dim)``."""
        n = self.band_dims[band]
        j = torch.arange(n // 2, dtype=torch.float64)
        return self.theta ** (-2.0 * j / n)

    def pair_freqs(self) -> torch.Tensor:
        """float64 ``[head_dim // 2]``: the frequency of every pair, bands concatenated."""
        return torch.cat([self.band_freqs(a) for a in range(self.num_axes)])

    def pair_axes(self) -> torch.Tensor:
        """int64 ``[head_dim // 2]``: the grid axis (0 = temporal) each pair encodes."""
        return torch.cat([torch.full((d // 2,), a, dtype=torch.int64) for a, d in enumerate(self.band_dims)])

    def temporal_freqs(self) -> torch.Tensor:
        """float64 ``[temporal_pairs]``: the frequencies that re-phasing uses (of a head of scale 1)."""
        return self.band_freqs(0)

    @property
    def num_scaled_heads(self) -> int:
        """Heads with their own temporal frequencies (0 without ``head_scale``)."""
        return 0 if self.head_scale is None else len(self.head_scale)

    def head_temporal_freqs(self) -> torch.Tensor:
        """float64 ``[H, temporal_pairs]``: every head's temporal frequencies (``H = 1`` without ``head_scale``)."""
        w = self.temporal_freqs()
        if self.head_scale is None:
            return w[None]
        return torch.tensor(self.head_scale, dtype=torch.float64)[:, None] * w

    def head_pair_freqs(self, heads: int) -> torch.Tensor:
        """float64 ``[heads, head_dim // 2]``: every pair's frequency per head (``heads`` the tensor's heads, a
        multiple of the scaled heads: a GQA query group shares its KV head's scale)."""
        f = self.pair_freqs()[None].repeat(heads, 1)
        if self.head_scale is not None:
            f[:, :self.temporal_pairs] = self.head_temporal_freqs().repeat_interleave(
                heads // self.num_scaled_heads, dim=0)
        return f

    def check_heads(self, heads: int, name: str = "x") -> None:
        """ValueError when a tensor of ``heads`` heads cannot take this spec's per-head scales."""
        n = self.num_scaled_heads
        if n and (heads % n or heads < n):
            raise ValueError(f"rope.head_scale has {n} heads but {name} has {heads}: the heads must be a multiple "
                             "of the scaled (KV) heads")


def head_jitter(spec: RopeSpec, num_heads: int, strength: float, seed: int = 0, *,
                shard: Optional[Tuple[int, int]] = None) -> RopeSpec:
    """Multi-head RoPE jitter against sink collapse (LoL, arXiv 2601.16914): each head gets its own perturbed
    temporal base frequency, so heads stop re-aligning their phases with the sink at the same frames.

    Read from the paper's description (no public code): head ``h`` scales its temporal frequencies by
    ``s_h = 1 + strength * (u_h - 1/2)``, ``u_h`` evenly spaced over ``[0, 1]`` and shuffled across heads by
    ``seed`` (deterministic; the heads' spread is exactly ``strength``). ``strength`` in ``[0, 2)``; 0 returns the
    spec unchanged. The paper reports 0.8, applied to every head, as its best setting.

    ``shard=(rank, world)``: the spec of rank ``rank``'s contiguous group of ``num_heads // world`` of the
    ``num_heads`` heads (a head-sharded model, Ulysses): the same scales those heads have in one process.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < 2:
        raise ValueError(f"head_jitter strength must be a number in [0, 2), got {strength!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    lo, hi = 0, num_heads
    if shard is not None:
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world
                and num_heads % world == 0):
            raise ValueError(f"shard must be (rank, world) with world dividing num_heads ({num_heads}), got {shard!r}")
        lo, hi = rank * num_heads // world, (rank + 1) * num_heads // world
    if strength == 0:
        return spec
    u = torch.linspace(0.0, 1.0, num_heads, dtype=torch.float64) if num_heads > 1 else \
        torch.full((1,), 0.5, dtype=torch.float64)
    u = u[torch.randperm(num_heads, generator=torch.Generator().manual_seed(int(seed)))]
    return spec.with_head_scale((1.0 + float(strength) * (u[lo:hi] - 0.5)).tolist())


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
