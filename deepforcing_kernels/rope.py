"""Rotary position embedding specifications.

A :class:`RopeSpec` is plain data: how the ``head_dim`` channels pair up (interleaved or half-split), which pairs
belong to which grid axis, and the frequency of every pair. The maths that uses it lives in
:mod:`deepforcing_kernels.reference.rope` (the oracle) and in the kernels, which read the same fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

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
    """

    head_dim: int
    theta: float
    layout: Layout
    band_dims: Tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim!r}")
        if self.layout not in ("interleaved", "half"):
            raise ValueError(f"layout must be 'interleaved' or 'half', got {self.layout!r}")
        if not (isinstance(self.theta, (int, float)) and self.theta > 1.0):
            raise ValueError(f"theta must be a number > 1, got {self.theta!r}")
        if sum(self.band_dims) != self.head_dim or any(d <= 0 or d % 2 for d in self.band_dims):
            raise ValueError(f"band_dims {self.band_dims} must be positive even sizes summing to head_dim")

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
        """float64 ``[temporal_pairs]``: the frequencies that re-phasing uses."""
        return self.band_freqs(0)


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
