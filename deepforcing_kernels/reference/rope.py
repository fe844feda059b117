"""Reference RoPE maths: absolute rotation and temporal re-phasing.

Angles are formed in float64 from integer positions (``position * freq``), so any position works (there is no
angle table and no length cap); the rotation itself runs in float32 (float64 for float64 inputs) and the result is
cast back to the input dtype.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .._checks import check_int, check_rope, check_tensor
from ..rope import RopeSpec

Shift = Union[int, torch.Tensor]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pair_index(spec: RopeSpec, pairs: int, device: torch.device):
    p = torch.arange(pairs, device=device)
    if spec.interleaved:
        return 2 * p, 2 * p + 1
    return p, p + spec.num_pairs


def rotate_pairs(x: torch.Tensor, spec: RopeSpec, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``angles.shape[-1]`` pairs of ``x`` [..., D] by ``angles`` (float64, broadcastable to
    ``x.shape[:-1] + (pairs,)``). Channels of the other pairs are copied unchanged."""
    pairs = angles.shape[-1]
    cd = _compute_dtype(x)
    re_i, im_i = _pair_index(spec, pairs, x.device)
    xf = x.to(cd)
    re, im = xf[..., re_i], xf[..., im_i]
    c, s = torch.cos(angles).to(cd), torch.sin(angles).to(cd)
    out = xf.clone()
    out[..., re_i] = re * c - im * s
    out[..., im_i] = re * s + im * c
    return out.to(x.dtype)


def rope_positions(spec: RopeSpec, frame_offset: int, grid: Sequence[int], device=None) -> torch.Tensor:
    """int64 ``[L, num_axes]``: the absolute (frame, row, col) position of each token of a row-major grid."""
    axes = [torch.arange(n, device=device, dtype=torch.int64) for n in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    pos = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
    pos[:, 0] += frame_offset
    return pos


def apply_rope(x: torch.Tensor, spec: RopeSpec, *, frame_offset: int = 0, grid: Sequence[int]) -> torch.Tensor:
    """Rotate ``x`` [B, L, H, D] at absolute positions.

    Args:
        x: queries or keys, ``[B, L, H, D]`` with ``D == spec.head_dim``.
        spec: the RoPE layout.
        frame_offset: absolute position of the first frame (1-D specs: of the first token).
        grid: ``(frames, rows, cols)`` for 3-D specs or ``(L,)`` for 1-D specs; ``prod(grid) == L``, row-major.

    Returns:
        A new tensor of ``x``'s dtype.
    """
    check_tensor("x", x, ndim=4)
    check_rope("spec", spec, x.shape[-1])
    check_int("frame_offset", frame_offset)
    if not isinstance(grid, (tuple, list)) or len(grid) != spec.num_axes:
        raise ValueError(f"grid must be a tuple of {spec.num_axes} ints for this spec, got {grid!r}")
    for n in grid:
        check_int("grid", n, minimum=1)
    total = 1
    for n in grid:
        total *= n
    if total != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {total} tokens but x has L={x.shape[1]}")
    pos = rope_positions(spec, frame_offset, grid, device=x.device).to(torch.float64)  # [L, A]
    axes = spec.pair_axes().to(x.device)  # [P]
    if spec.head_scale is not None:  # every head its own temporal frequencies
        spec.check_heads(x.shape[2])
        freqs = spec.head_pair_freqs(x.shape[2]).to(x.device)  # [H, P]
        return rotate_pairs(x, spec, (pos[:, axes][:, None, :] * freqs)[None])
    freqs = spec.pair_freqs().to(x.device)  # [P]
    angles = pos[:, axes] * freqs  # [L, P]
    return rotate_pairs(x, spec, angles[None, :, None, :])


def _normalise_shift(shift: Shift, x: torch.Tensor, name: str = "shift") -> torch.Tensor:
    """int64 shift broadcastable to ``[B, L]``."""
    B, L = x.shape[0], x.shape[1]
    if isinstance(shift, torch.Tensor):
        if shift.dtype.is_floating_point or shift.dtype.is_complex or shift.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {shift.dtype}")
        if shift.device != x.device:
            raise ValueError(f"{name} is on {shift.device} but the keys are on {x.device}")
        if shift.dim() == 1 and shift.shape[0] == L:
            return shift.to(torch.int64)[None, :]
        if shift.dim() == 2 and tuple(shift.shape) == (B, L):
            return shift.to(torch.int64)
        raise ValueError(f"{name} must have shape [{L}] or [{B}, {L}], got {list(shift.shape)}")
    check_int(name, shift)
    return torch.full((1, 1), int(shift), dtype=torch.int64, device=x.device)


def rephase(k: torch.Tensor, spec: RopeSpec, shift: Shift) -> torch.Tensor:
    """Rotate the temporal band of ``k`` [B, L, H, D] by ``shift`` positions.

    A key rotated at position ``p`` and re-phased by ``d`` equals the key rotated at ``p + d``. Spatial pairs
    are copied unchanged.

    Args:
        k: keys already rotated at some position, ``[B, L, H, D]``.
        spec: the RoPE layout.
        shift: an int, or an integer tensor ``[L]`` or ``[B, L]`` (one shift per token).

    Returns:
        A new tensor of ``k``'s dtype.
    """
    check_tensor("k", k, ndim=4)
    check_rope("spec", spec, k.shape[-1])
    s = _normalise_shift(shift, k)
    if spec.head_scale is not None:
        spec.check_heads(k.shape[2], "k")
        freqs = spec.head_temporal_freqs().repeat_interleave(k.shape[2] // spec.num_scaled_heads, dim=0)
        freqs = freqs.to(k.device)  # [H, T]
    else:
        freqs = spec.temporal_freqs().to(k.device)[None]  # [1, T]
    angles = s.to(torch.float64)[:, :, None, None] * freqs  # [B|1, L|1, H|1, T]
    return rotate_pairs(k, spec, angles)
