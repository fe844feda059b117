"""Checking a saved cache state before anything is loaded: its top-level structure, each layer's structure, and
values no stream of the cache's policy can reach (a damaged or hand-edited state fails here, naming the layer)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..formats import CACHE_STATE_FORMAT
from ..schedule import ScheduleState
from .commit import SHADOW_KEYS, check_shadow_state, needs_shadow
from .context import LayerContext
from .executor import CacheLayer
from .scoring import mass_part_keys

__all__ = ["check_state", "check_layer_state", "STATE_KEYS", "LAYER_KEYS"]

#: the keys of a cache state and of each of its layers (anything else is refused)
STATE_KEYS = frozenset({"format", "policy", "geometry", "layers"})
LAYER_KEYS = frozenset({"schedule", "k", "v", "frames", "reuse", "mass", "qbuf"})
#: the further keys of a layer of a policy with a tape (Rolling Sink): slot positions and the frame bank
TAPE_KEYS = frozenset({"pos", "bank_k", "bank_v"})
#: the further keys of a layer of a policy with memories (MemRoPE): the un-rotated float32 EMAs
MEMORY_KEYS = frozenset({"memory_k", "memory_v"})
#: the further keys of a TetherCache layer: the frames set aside for the next clean pass's admission (or none)
STASH_KEYS = frozenset({"stash_k", "stash_v", "stash_frames"})
#: the further key of a Recency Forcing layer: the passes of its current block run so far (an int)
RECENCY_KEYS = frozenset({"recency_pass"})



def check_state(ctx: LayerContext, layers: Tuple[CacheLayer, ...], geometry: Dict[str, Any],
                state: Any) -> list:
    """Validate a whole :meth:`StreamingKVCache.state_dict` against this cache (policy, geometry, every layer);
    returns the ``(schedule state, tensors)`` of each layer. ValueError naming what does not fit."""
    if not isinstance(state, dict) or state.get("format") != CACHE_STATE_FORMAT:
        raise ValueError(f"not a StreamingKVCache state dict (expected format {CACHE_STATE_FORMAT!r})")
    extra = sorted(str(k) for k in set(state) - STATE_KEYS)
    if extra:
        raise ValueError(f"the state dict holds unknown keys {extra}: expected only {sorted(STATE_KEYS)}")
    if state.get("policy") != ctx.policy.to_dict():
        raise ValueError(f"the state dict was saved with policy {state.get('policy')!r}, this cache runs "
                         f"{ctx.policy.to_dict()!r}")
    if state.get("geometry") != geometry:
        raise ValueError(f"the state dict was saved with geometry {state.get('geometry')!r}, this cache has "
                         f"{geometry!r}")
    saved = state.get("layers")
    if not isinstance(saved, list) or len(saved) != len(layers):
        raise ValueError(f"the state dict must hold {len(layers)} layer states")
    return [check_layer_state(ctx, layer, i, s) for i, (layer, s) in enumerate(zip(layers, saved))]


def check_layer_state(ctx: LayerContext, layer: CacheLayer, index: int, d: Any) -> Tuple[ScheduleState, Dict[str, Any]]:
    """Validate one layer's state against the cache's context and ``layer``'s storage and scorer; returns
    ``(schedule state, tensors)`` for :meth:`CacheLayer.load_state`. ValueError naming the layer otherwise."""
    keys = LAYER_KEYS | TAPE_KEYS if ctx.policy.has_tape else LAYER_KEYS
    parts = mass_part_keys(ctx.policy)
    keys = keys | set(parts)
    if ctx.policy.memory_frames:
        keys = keys | MEMORY_KEYS
    if ctx.policy.recency_bias:
        keys = keys | RECENCY_KEYS
    if ctx.policy.tether_frames:
        keys = keys | STASH_KEYS
    if needs_shadow(ctx.policy):
        keys = keys | SHADOW_KEYS
    if not isinstance(d, dict) or set(d) != keys:
        raise ValueError(f"layer {index}: malformed layer state")
    try:
        st = ScheduleState.from_dict(d["schedule"])
    except TypeError as e:
        raise ValueError(f"layer {index}: {e}") from None
    L = st.frames * ctx.tokens_per_frame
    p = ctx.policy
    if p.kind != "full" and st.frames > p.window_frames:
        raise ValueError(f"layer {index}: {st.frames} frames exceed the window")
    if (st.frames == 0) != (st.block_start is None) or (st.block_start is None) != (st.stream_start is None):
        raise ValueError(f"layer {index}: inconsistent schedule state {st}")
    if (st.sink_start is not None and not p.rephase_sink) or (st.compressed and not p.compresses) or \
            ((st.pending is not None or st.cut) and not p.block_relative):
        raise ValueError(f"layer {index}: schedule state {st} cannot come from a {p.kind!r} policy")
    if p.recency_bias:  # a count of the current block's passes: none before the stream, at least one after
        c = d["recency_pass"]
        if isinstance(c, bool) or not isinstance(c, int) or not (0 if st.block_start is None else 1) <= c < 2 ** 31 \
                or (st.block_start is None and c):
            raise ValueError(f"layer {index}: 'recency_pass' must count the current block's passes (an int >= 1, "
                             f"0 before the first pass), got {c!r}")
    want: Dict[str, Any] = dict(layer.storage.expected(L))
    want.setdefault("reuse", None)
    want.setdefault("mass", None)
    want["qbuf"] = layer.scorer.state_spec() if layer.scorer is not None else None
    if p.has_tape:
        from .bank import FrameBank

        bank = FrameBank.filled(p.tape_frames, st.block_start, st.stream_start) * ctx.tokens_per_frame
        shape = (ctx.batch_size, bank, ctx.num_kv_heads, ctx.head_dim)
        want["bank_k"] = want["bank_v"] = (shape, ctx.dtype)
    if p.memory_frames:
        want["memory_k"] = want["memory_v"] = ((ctx.batch_size, p.memory_frames, ctx.num_kv_heads, ctx.head_dim),
                                               torch.float32)
    if p.tether_frames:  # set-aside frames: none, or one block's
        stash = d["stash_k"].shape[1] if isinstance(d["stash_k"], torch.Tensor) else -1
        stash = stash if stash in (0, p.block_frames * ctx.tokens_per_frame) else p.block_frames * ctx.tokens_per_frame
        shape = (ctx.batch_size, stash, ctx.num_kv_heads, ctx.head_dim)
        want["stash_k"] = want["stash_v"] = (shape, ctx.dtype)
        want["stash_frames"] = ((ctx.batch_size, stash), torch.int64)
    for name, w in want.items():
        t = d[name]
        if w is None:
            if t is not None:
                raise ValueError(f"layer {index}: unexpected {name!r} for this policy")
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(w[0]) or t.dtype != w[1]:
            got = (list(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"layer {index}: {name!r} must be a {w[1]} tensor of shape {list(w[0])}, "
                             f"got {got}")
    _check_layer_values(ctx, index, st, d)  # values inside the valid structure, before anything is copied
    if needs_shadow(p):
        stream = None if st.stream_start is None else (st.stream_start, st.block_start + st.current_block_frames(p))
        why = check_shadow_state(ctx, p.commit_frames, d, stream)
        if why:
            raise ValueError(f"layer {index}: {why}")
    return st, d


_INT_LIMIT = 2 ** 62  # frame numbers far beyond any stream, still exact in int64 after the schedule's arithmetic


def _check_layer_values(ctx: LayerContext, index: int, st: ScheduleState, d: Dict[str, Any]) -> None:
    """Reject a layer state whose structure is right but whose values no stream of this policy can reach: the
    schedule's numbers (ranges, the compressed flag, the sink placement), where the tensors live, and the tensors'
    values (finite K / V / mass / query sums, non-negative reuse counts, slot frames in time order that match the
    schedule: whole sink and recent frames, the current block last, Top-C picks between them). ValueError naming
    the layer and the value."""
    p, n, F = ctx.policy, ctx.tokens_per_frame, ctx.policy.block_frames

    def bad(msg: str) -> None:
        raise ValueError(f"layer {index}: {msg}")

    for name in ("block_start", "stream_start", "sink_start"):
        v = getattr(st, name)
        if v is not None and not -_INT_LIMIT < v < _INT_LIMIT:
            bad(f"{name}={v} is out of range")
    for name in ("k", "v", "frames", "reuse", "mass", "qbuf", "pos", "bank_k", "bank_v", "memory_k", "memory_v",
                 "stash_k", "stash_v", "stash_frames") + mass_part_keys(p):
        t = d.get(name)
        if t is not None and (t.layout != torch.strided or t.device.type not in ("cpu", ctx.device.type)):
            bad(f"{name!r} must be a dense tensor on the CPU or {ctx.device}, got {t.layout} on {t.device}")
    if st.stream_start is None:
        return
    # the current block may be a short first block (an image prefix); every other block has F frames
    cur, first = st.current_block_frames(p), st.first_block_frames
    if first is not None and not 1 <= first < F:
        bad(f"first_block_frames={first} must lie in [1, {F})")

    def whole(frames: int) -> bool:  # whole blocks, counting a short first block
        return frames % F == 0 or (first is not None and (frames - first) % F == 0)
    if st.stream_start < 0:
        bad(f"stream_start={st.stream_start} is negative")
    if st.block_start < st.stream_start:
        bad(f"block_start={st.block_start} is before stream_start={st.stream_start}")
    produced = st.block_start + cur - st.stream_start
    if not cur <= st.frames <= produced:
        bad(f"{st.frames} frames cannot be held after the stream produced {produced} (and the current block "
            f"has {cur})")
    W = p.window_frames
    if p.compresses:
        if st.compressed != (st.sink_start is not None):
            bad(f"compressed={st.compressed} with sink_start={st.sink_start}: a compressed cache has a re-phased "
                "sink and an uncompressed one does not")
        if st.compressed and (st.frames < p.budget_frames or (st.frames - p.budget_frames) % F):
            bad(f"a compressed cache holds {p.budget_frames} frames plus whole blocks, not {st.frames}")
        if not st.compressed and not whole(st.frames):
            bad(f"an uncompressed cache holds whole blocks, not {st.frames} frames")
    elif p.kind != "full":
        if not whole(st.frames) and st.frames != W:
            bad(f"the cache holds whole blocks or its window, not {st.frames} frames")
        if st.sink_start is not None and st.frames != W and not p.block_relative:
            bad(f"sink_start={st.sink_start} (a re-phased sink) with {st.frames} frames: the sink is re-phased "
                f"only once the window ({W}) rolls")
    elif not whole(st.frames):
        bad(f"a full cache holds whole blocks, not {st.frames} frames")
    if st.sink_start is not None and p.block_relative:
        if not st.block_start - max(W, p.cut_position) <= st.sink_start <= st.block_start:
            bad(f"sink_start={st.sink_start} is not where a block-relative window puts slot 0")
    elif st.sink_start is not None:
        lo_s, hi_s = st.stream_start - p.gap_frames, st.block_start + cur - st.frames - p.gap_frames
        if not lo_s <= st.sink_start <= hi_s:
            bad(f"sink_start={st.sink_start} is outside [{lo_s}, {hi_s}], where this schedule puts it")
    # tensor values
    for name in ("k", "v", "mass", "qbuf", "bank_k", "bank_v", "memory_k", "memory_v", "stash_k",
                 "stash_v") + mass_part_keys(p):
        t = d.get(name)
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            bad(f"{name!r} holds NaN or inf")
    if p.has_tape:
        _check_tape_values(p, n, st, d, bad)
        return
    if any(d[m] is not None and bool((d[m] < 0).any()) for m in ("mass",) + mass_part_keys(p)):
        bad("'mass' holds negative values")
    fr = d["frames"]
    B, L = fr.shape
    lo, hi = st.stream_start, st.block_start + cur
    if bool((fr < lo).any()) or bool((fr >= hi).any()):
        bad(f"slot frames outside the stream's frames [{lo}, {hi})")
    if L > 1 and bool((fr[:, 1:] < fr[:, :-1]).any()):
        bad("slot frames are not in time order")
    block = st.block_start + torch.arange(cur, device=fr.device).repeat_interleave(n)
    if not bool((fr[:, L - cur * n:] == block).all()):
        bad(f"the last {cur * n} slots do not hold the current block (frames {st.block_start}..{hi - 1})")
    S_tok = min(p.sink_frames, st.frames) * n
    C_tok = p.topc_frames * n if st.compressed else 0
    if p.tether_frames and st.sink_start is not None:  # admitted frames: per video, checked like Top-C picks
        C_tok = p.tether_frames * n
        _check_stash_values(p, n, st, d, bad)
    fixed = torch.cat([fr[:, :S_tok], fr[:, S_tok + C_tok:]], dim=1).view(B, -1, n)
    if not bool((fixed == fixed[:, :, :1]).all()) or bool((fixed[:, 1:, 0] <= fixed[:, :-1, 0]).any()):
        bad("sink and recent slots must hold whole frames, each once")
    if B > 1 and not bool((fixed == fixed[:1]).all()):
        bad("sink and recent frames differ across the batch")
    if C_tok:
        topc = fr[:, S_tok:S_tok + C_tok]
        below = fr[:, S_tok - 1:S_tok] if S_tok else torch.full((B, 1), lo - 1, device=fr.device)
        if bool((topc <= below).any()) or bool((topc >= fr[:, S_tok + C_tok:S_tok + C_tok + 1]).any()):
            bad("Top-C slots hold frames outside the gap between the sink and the recent frames")
        if C_tok > n and bool((topc[:, n:] <= topc[:, :-n]).any()):
            bad(f"a frame fills more than its {n} token slots in the Top-C region")
    if p.memory_frames:
        _check_memory_values(p, n, st, d, bad)
    reuse = d["reuse"]
    if reuse is not None:
        if bool((reuse < 0).any()):
            bad("'reuse' holds negative counts")
        others = torch.cat([reuse[:, :S_tok], reuse[:, S_tok + C_tok:]], dim=1)
        if bool((others != 0).any()):
            bad("'reuse' counts of sink or recent slots must be 0 (only Top-C picks are reused)")
        if C_tok and bool((reuse[:, S_tok:S_tok + C_tok] < 1).any()):
            bad("'reuse' counts of Top-C picks must be >= 1")


def _check_tape_values(p: Any, n: int, st: ScheduleState, d: Dict[str, Any], bad: Any) -> None:
    """Rolling Sink: slot positions are whole frames in time order ending with the current block, and each slot
    holds either the frame at its position or a replayed frame of the tape (the stream's first ``tape_frames``),
    only in positions the tape has reached."""
    pos, fr = d["pos"], d["frames"]
    B, L = fr.shape
    lo, hi = st.stream_start, st.block_start + st.current_block_frames(p)
    if bool((pos < lo).any()) or bool((pos >= hi).any()):
        bad(f"slot positions outside the stream's frames [{lo}, {hi})")
    pf = pos.view(B, -1, n)
    if not bool((pf == pf[:, :, :1]).all()) or bool((pf[:, 1:, 0] != pf[:, :-1, 0] + 1).any()) or \
            bool((pos[:, L - n:] != hi - 1).any()):
        bad("slot positions must be consecutive whole frames ending with the current block")
    replayed = fr != pos
    if bool((replayed & ((fr < lo) | (fr >= lo + p.tape_frames))).any()):
        bad(f"replayed slots hold frames outside the tape [{lo}, {lo + p.tape_frames})")
    if bool((replayed & (pos >= st.block_start - p.block_frames)).any()) or \
            bool((replayed & (pos < lo + (st.first_block_frames or 0) + p.window_frames - p.block_frames)).any()):
        bad("replayed slots sit where the tape has not been written")


def _check_memory_values(p: Any, n: int, st: ScheduleState, d: Dict[str, Any], bad: Any) -> None:
    """MemRoPE: before the first roll the EMAs are zero; after it the memory slots sit at frames
    ``stream_start + sink_frames + i`` and hold the EMA values."""
    mk, mv = d["memory_k"], d["memory_v"]
    if st.sink_start is None:
        if bool((mk != 0).any()) or bool((mv != 0).any()):
            bad("the memories hold values before the first roll")
        return
    S, M = p.sink_frames, p.memory_frames
    want = st.stream_start + S + torch.arange(M, device=d["frames"].device).repeat_interleave(n)
    if not bool((d["frames"][:, S * n:(S + M) * n] == want).all()):
        bad(f"memory slots must sit at frames {st.stream_start + S}..{st.stream_start + S + M - 1}")
    v = d["v"][:, S * n:(S + M) * n].reshape(mv.shape[0], M, n, *mv.shape[2:])
    if not bool((v == mv.to(device=v.device, dtype=v.dtype)[:, :, None]).all()):
        bad("the memory slots' values differ from 'memory_v'")


def _check_stash_values(p: Any, n: int, st: ScheduleState, d: Dict[str, Any], bad: Any) -> None:
    """TetherCache: the memory holds whole frames (checked with the Top-C rules); set-aside frames exist only
    between a roll and its clean pass and are the frames that left ``recent``: ``block_start - recent ..``."""
    sf = d["stash_frames"]
    if not sf.shape[1]:
        return
    want = st.block_start - p.recent_frames + torch.arange(p.block_frames, device=sf.device).repeat_interleave(n)
    if not bool((sf == want).all()):
        bad(f"set-aside frames must be {int(want[0])}..{int(want[-1])}, the frames the last roll evicted")
