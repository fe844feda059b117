"""Production RoPE maths: absolute rotation, temporal re-phasing, and the rotation tables the kernels read.

One expansion of "which key moves by how much" lives here (:func:`key_shifts`), and one way to turn shifts into
angles (:func:`shift_tables`): ``angle = float64(shift) * float64(freq)``, with ``cos`` / ``sin`` taken of that
float64 angle directly. (Reducing the angle mod a float64 ``2*pi`` first loses ``|angle| * 2.4e-16`` radians,
0.04 rad at ``|shift| = 1e15``; ``torch.cos`` reduces exactly.) Every backend receives the same float32 tables,
so they agree with each other and with the oracle at any int64 shift.

The kernels' contract (``torch.ops.deepforcing.sink_attention``): ``cos, sin`` float32 of shape

* ``[T]``: keys ``[0, rot_len)`` are re-phased by this one table (sink mode);
* ``[B, Lk, T]``: key ``j`` of batch ``b`` by row ``[b, j]`` (per-key mode, ``rot_len == Lk``);
* ``[Hkv, T]`` / ``[B, Lk, Hkv, T]``: the same two modes with a row per KV head, for a ``RopeSpec`` with
  ``head_scale`` (every head its own temporal frequencies); without ``head_scale`` the per-head shapes never occur,
  so the common path costs nothing more;
* ``[0]``: no key moves (``rot_len == 0``),

over the first ``T = rope.temporal_pairs`` pairs; pair ``(re, im)`` becomes ``(re*c - im*s, re*s + im*c)``.

The oracle (:mod:`deepforcing_kernels.reference`) has its own, independent implementation of the same maths;
production code never imports it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ._checks import INT64_MAX, INT64_MIN, check_int, check_rope, check_tensor
from .rope import RopeSpec

__all__ = ["apply_rope", "rephase", "key_shifts", "shift_tables", "rotation_tables", "rotate_keys",
           "normalise_key_shift", "rotate_at_frames"]

Shift = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------------- shifts
def normalise_key_shift(key_shift: torch.Tensor, batch: int, lk: int, device: torch.device,
                        name: str = "key_shift") -> torch.Tensor:
    """The one normalisation of a per-key shift: an integer tensor ``[Lk]`` or ``[B, Lk]`` on ``device`` becomes
    a contiguous int64 ``[B, Lk]``. Raises TypeError / ValueError naming ``name``."""
    check_tensor(name, key_shift)
    if key_shift.dtype.is_floating_point or key_shift.dtype.is_complex or key_shift.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {key_shift.dtype}")
    if key_shift.device != device:
        raise ValueError(f"{name} is on {key_shift.device} but the keys are on {device}")
    if not (tuple(key_shift.shape) == (lk,) or tuple(key_shift.shape) == (batch, lk)):
        raise ValueError(f"{name} must have shape [{lk}] or [{batch}, {lk}], got {list(key_shift.shape)}")
    return key_shift.to(torch.int64).expand(batch, lk).contiguous()


def key_shifts(batch: int, lk: int, *, sink_len: int, sink_shift: int, key_shift: Optional[torch.Tensor],
               device: Union[str, torch.device]) -> Optional[torch.Tensor]:
    """int64 ``[B, Lk]``: the temporal shift of every key, or None when no key moves.

    ``key_shift`` (already normalised) wins; otherwise keys ``[0, sink_len)`` move by ``sink_shift``.
    """
    if key_shift is not None:
        return key_shift.to(device=device, dtype=torch.int64).expand(batch, lk)
    if sink_len == 0 or sink_shift == 0:
        return None
    s = torch.zeros(batch, lk, dtype=torch.int64, device=device)
    s[:, :sink_len] = sink_shift
    return s


def head_freqs(rope: RopeSpec, heads: int) -> torch.Tensor:
    """float64 ``[heads, T]``: the temporal frequencies of each of ``heads`` heads of a spec with ``head_scale``
    (``heads`` a multiple of its scaled heads)."""
    rope.check_heads(heads, "the keys")
    return rope.head_temporal_freqs().repeat_interleave(heads // rope.num_scaled_heads, dim=0)


def shift_tables(rope: RopeSpec, shift: torch.Tensor, heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(cos, sin)`` of shape ``shift.shape + [T]`` for an int64 ``shift`` tensor, or
    ``shift.shape + [heads, T]`` for a spec with ``head_scale``."""
    if rope.head_scale is not None:
        w = head_freqs(rope, heads).to(shift.device)
        ang = shift.to(torch.float64)[..., None, None] * w
    else:
        w = _temporal_freqs(rope, shift.device)
        ang = shift.to(torch.float64)[..., None] * w
    return torch.cos(ang), torch.sin(ang)


@functools.lru_cache(maxsize=64)
def _temporal_freqs(rope: RopeSpec, device: torch.device) -> torch.Tensor:
    """``rope.temporal_freqs()`` on ``device``, made once per spec (the sink moves every compressing block, and
    each new shift's table starts from these)."""
    return rope.temporal_freqs().to(device)


@functools.lru_cache(maxsize=256)
def _sink_table(rope: RopeSpec, shift: int, device: torch.device,
                heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    c, s = shift_tables(rope, torch.tensor(shift, dtype=torch.int64), heads)
    return c.to(torch.float32).to(device), s.to(torch.float32).to(device)


_NO_TABLE: dict = {}  # device -> the shared empty table (a dict: an lru_cache costs more per call than a lookup)


def rotation_tables(rope: Optional[RopeSpec], sink_len: int, sink_shift: int, key_shift: Optional[torch.Tensor],
                    batch: int, lk: int, device: torch.device,
                    heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(cos, sin, rot_len)`` for the op (see the module docstring for the shapes).

    Arguments as validated by :func:`deepforcing_kernels.sink_attention` (``key_shift`` None or int64
    ``[B, Lk]``; ``rope`` None only when no key moves; ``heads`` the keys' KV heads, read only for a spec with
    ``head_scale``). Sink tables are cached per ``(rope, shift, device, heads)``.
    """
    if key_shift is None and (sink_len == 0 or sink_shift == 0 or rope is None):  # the common case, first
        e = _NO_TABLE.get(device)
        if e is None:
            e = _NO_TABLE[device] = torch.empty(0, dtype=torch.float32, device=device)
        return e, e, 0
    h = heads if rope is not None and rope.head_scale is not None else 1
    if rope is not None and key_shift is not None:
        c, s = shift_tables(rope, key_shift.to(torch.int64).expand(batch, lk), h)
        return c.to(torch.float32).contiguous(), s.to(torch.float32).contiguous(), lk
    if rope is not None and sink_len > 0 and sink_shift != 0:
        c, s = _sink_table(rope, int(sink_shift), torch.device(device), h)
        return c, s, int(sink_len)
    return rotation_tables(rope, 0, 0, None, batch, lk, device)


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_len: int,
                interleaved: bool) -> torch.Tensor:
    """float32 keys as the kernels see them: ``k [B, Lk, H, D]`` with its first ``T`` pairs rotated by the tables
    (differentiable; used by the op's backward and by ``effective_keys``)."""
    kf = k.float()
    if cos.numel() == 0 or rot_len == 0:
        return kf
    T = cos.shape[-1]
    if cos.dim() in (1, 2):  # one table for every rotated key ([T]) or one per KV head ([H, T])
        c, s = cos.view(1, 1, -1, T), sin.view(1, 1, -1, T)
    else:  # per key ([B, Lk, T]) or per key and head ([B, Lk, H, T])
        c, s = (cos[:, :, None], sin[:, :, None]) if cos.dim() == 3 else (cos, sin)
    rot = _rotate(kf[:, :rot_len], interleaved, c, s)
    return rot if rot_len == k.shape[1] else torch.cat([rot, kf[:, rot_len:]], dim=1)


# ---------------------------------------------------------------------------------------------- rotation
def _rotate(x: torch.Tensor, interleaved: bool, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``c.shape[-1]`` pairs of ``x`` by precomputed ``cos`` / ``sin`` (broadcastable to
    ``x.shape[:-1] + (pairs,)``), in float32 (float64 for float64 inputs); other channels are copied."""
    pairs = c.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    # basic (strided) slices, not index tensors: the same arithmetic, without a gather and a scatter per call
    half = x.shape[-1] // 2
    re_i, im_i = (slice(0, 2 * pairs, 2), slice(1, 2 * pairs, 2)) if interleaved else \
        (slice(0, pairs), slice(half, half + pairs))
    xf = x.to(cd)
    re, im = xf[..., re_i], xf[..., im_i]
    c, s = c.to(cd), s.to(cd)
    out = xf.clone()
    out[..., re_i] = re * c - im * s
    out[..., im_i] = re * s + im * c
    return out.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _position_tables(spec: RopeSpec, frame_offset: int, grid: Tuple[int, ...],
                     device: torch.device, heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 ``cos, sin [L, 1, P]`` of every token of a row-major grid at absolute frame ``frame_offset``
    (``[L, heads, P]`` for a spec with ``head_scale``).

    Cached: the five passes of a block (and every layer) rotate at the same positions."""
    axes = [torch.arange(n, dtype=torch.int64) for n in grid]
    pos = torch.stack([m.reshape(-1) for m in torch.meshgrid(*axes, indexing="ij")], dim=-1)
    pos[:, 0] += frame_offset
    if spec.head_scale is not None:
        ang = pos.to(torch.float64)[:, spec.pair_axes()][:, None, :] * spec.head_pair_freqs(heads)  # [L, H, P]
        return torch.cos(ang).to(device), torch.sin(ang).to(device)
    ang = pos.to(torch.float64)[:, spec.pair_axes()] * spec.pair_freqs()  # [L, P]
    return torch.cos(ang)[:, None].to(device), torch.sin(ang)[:, None].to(device)


def apply_rope(x: torch.Tensor, spec: RopeSpec, *, frame_offset: int = 0, grid: Sequence[int]) -> torch.Tensor:
    """Rotate ``x`` [B, L, H, D] at absolute positions (angles in float64 from integer positions: no length cap).

    Args:
        x: queries or keys, ``[B, L, H, D]`` with ``D == spec.head_dim``.
        spec: the RoPE layout.
        frame_offset: absolute position of the first frame (1-D specs: of the first token).
        grid: ``(frames, rows, cols)`` for 3-D specs or ``(L,)`` for 1-D specs; ``prod(grid) == L``, row-major.

    Returns:
        A new tensor of ``x``'s dtype (rotation in float32, float64 for float64 inputs).
    """
    check_tensor("x", x, ndim=4)
    check_rope("spec", spec, x.shape[-1])
    check_int("frame_offset", frame_offset, minimum=INT64_MIN, maximum=INT64_MAX)
    if not isinstance(grid, (tuple, list)) or len(grid) != spec.num_axes:
        raise ValueError(f"grid must be a tuple of {spec.num_axes} ints for this spec, got {grid!r}")
    grid = tuple(check_int("grid", n, minimum=1) for n in grid)
    total = 1
    for n in grid:
        total *= n
    if total != x.shape[1]:
        raise ValueError(f"grid {grid} has {total} tokens but x has L={x.shape[1]}")
    heads = 1
    if spec.head_scale is not None:
        spec.check_heads(x.shape[2])
        heads = x.shape[2]
    c, s = _position_tables(spec, int(frame_offset), grid, x.device, heads)
    return _rotate(x, spec.interleaved, c, s)


def rephase(k: torch.Tensor, spec: RopeSpec, shift: Shift) -> torch.Tensor:
    """Rotate the temporal band of ``k`` [B, L, H, D] by ``shift`` positions (a key rotated at ``p`` and re-phased
    by ``d`` equals the key rotated at ``p + d``); spatial pairs are copied unchanged.

    Args:
        k: keys already rotated at some position, ``[B, L, H, D]``.
        spec: the RoPE layout.
        shift: an int (int64 range), or an integer tensor ``[L]`` or ``[B, L]`` (one shift per token).

    Returns:
        A new tensor of ``k``'s dtype.
    """
    check_tensor("k", k, ndim=4)
    check_rope("spec", spec, k.shape[-1])
    B, L = k.shape[0], k.shape[1]
    if isinstance(shift, torch.Tensor):
        if shift.dim() == 1:
            s = normalise_key_shift(shift, 1, L, k.device, "shift")
        else:
            s = normalise_key_shift(shift, B, L, k.device, "shift")
    else:
        s = torch.full((1, 1), check_int("shift", shift, minimum=INT64_MIN, maximum=INT64_MAX), dtype=torch.int64,
                       device=k.device)
    if spec.head_scale is not None:
        c, sn = shift_tables(spec, s, k.shape[2])  # [B|1, L|1, H, T]
        return _rotate(k, spec.interleaved, c, sn)
    c, sn = shift_tables(spec, s)  # [B|1, L|1, T]
    return _rotate(k, spec.interleaved, c[:, :, None, :], sn[:, :, None, :])


def rotate_at_frames(x: torch.Tensor, spec: RopeSpec, frames: torch.Tensor, grid: Optional[Sequence[int]] = None,
                     *, inverse: bool = False) -> torch.Tensor:
    """The full RoPE (temporal and spatial pairs) of whole frames at given temporal positions, or its exact
    inverse: what works on un-rotated keys (MemRoPE's averages) needs both, and they live here, once.

    Args:
        x: ``[B, Nf * n, H, D]``, ``Nf`` whole frames of ``n`` tokens (row-major over ``grid``).
        spec: the RoPE layout.
        frames: int64 ``[B, Nf]`` or ``[Nf]``: the temporal position of each frame.
        grid: ``(rows, cols)`` of a frame for a 3-D spec (``rows * cols == n``); None for a 1-D spec, whose
            every token of frame slot ``i`` sits at position ``frames[i]`` (the unit the cache shifts keys by).
        inverse: rotate by the negated angles (un-rotates keys rotated at those positions).

    Returns:
        A new tensor of ``x``'s dtype; angles in float64 from the integer positions, rotation in float32 (float64
        for float64 inputs), as :func:`apply_rope`.
    """
    check_tensor("x", x, ndim=4)
    check_rope("spec", spec, x.shape[-1])
    B, L, H = x.shape[0], x.shape[1], x.shape[2]
    fr = frames.to(device=x.device, dtype=torch.int64).expand(B, -1)
    nf = fr.shape[1]
    if nf == 0 or L % nf:
        raise ValueError(f"x has {L} tokens, not whole frames of the {nf} frame positions given")
    n = L // nf
    pos = torch.zeros(B, L, spec.num_axes, dtype=torch.int64, device=x.device)
    pos[..., 0] = fr.repeat_interleave(n, dim=1)
    if spec.num_axes > 1:
        if grid is None or len(grid) != spec.num_axes - 1 or math.prod(grid) != n:
            raise ValueError(f"grid must give the {spec.num_axes - 1} spatial sizes of a {n}-token frame, got {grid!r}")
        axes = torch.meshgrid(*[torch.arange(g, device=x.device) for g in grid], indexing="ij")
        for a, m in enumerate(axes):
            pos[..., a + 1] = m.reshape(-1).repeat(nf)
    elif grid is not None:
        raise ValueError(f"a 1-D spec has no spatial grid, got {grid!r}")
    axes_of = spec.pair_axes().to(x.device)
    if spec.head_scale is not None:
        spec.check_heads(H)
        ang = pos.to(torch.float64)[..., axes_of][:, :, None, :] * spec.head_pair_freqs(H).to(x.device)
    else:
        ang = (pos.to(torch.float64)[..., axes_of] * spec.pair_freqs().to(x.device))[:, :, None, :]
    sn = torch.sin(ang)
    cs, sn = torch.cos(ang), (-sn if inverse else sn)
    if spec.interleaved:  # every pair rotates: one complex multiply (~7x faster on CPU than the strided path)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = torch.view_as_complex(x.to(cd).reshape(B, L, H, -1, 2))
        return torch.view_as_real(xc * torch.complex(cs.to(cd), sn.to(cd))).flatten(-2).to(x.dtype)
    return _rotate(x, spec.interleaved, cs, sn)
