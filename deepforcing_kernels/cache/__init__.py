"""The streaming KV cache: one object, one attention op and one schedule engine for every policy.

The package has three parts: :mod:`.storage` (slot tensors, rolls, compaction, Top-C gather, state tensors),
:mod:`.scoring` (the two Top-C scorers with their buffers, the ``reduce_over_heads`` hook, and
:func:`~.scoring.compress_step`), and :mod:`.executor` (:class:`CacheLayer`, which runs a pass plan). This module
holds :class:`StreamingKVCache`, which owns the geometry, resolves the attention backend once and builds the
layers.

:class:`StreamingKVCache` holds one :class:`CacheLayer` per transformer layer. A layer's
:meth:`CacheLayer.attend` writes a pass's K/V, runs the plan of :func:`deepforcing_kernels.schedule.plan_pass`
(append / overwrite / roll / compress, sink placement) on tensors, and calls
:func:`deepforcing_kernels.sink_attention`. The policy (:class:`CachePolicy`) is data; no policy has code of its
own here.

Storage
    Each layer's K and V are preallocated once at ``window + one block`` frames (the augmented cache a
    compression looks at) and never reallocated; eviction moves slots in place (non-overlapping chunks) and
    compaction gathers Top-C tokens through one scratch buffer shared by all layers. ``full`` has no window: it
    starts at ``reserve_frames`` (default 8 blocks) and doubles its capacity when full (amortised; the only
    policy that reallocates). Slots are in time order: the sink first, then Top-C, then recent frames.

RoPE
    Keys are stored exactly as given (RoPE'd at their absolute positions) and never rotated in place. Attention
    gets ``sink_len`` / ``sink_shift`` (the sink's temporal shift in frames), or a per-key ``key_shift [B, L]``
    with ``unify_topc_rope``. The temporal RoPE position unit is the frame: a frame's tokens share one temporal
    position (Wan's frame axis; with a 1-D spec use ``tokens_per_frame=1`` or rotate per frame).

Dtypes
    ``q``, ``k``, ``v`` must already be in the cache's dtype (the model casts them and casts the output back);
    a mismatch raises instead of silently changing precision.

Participative Compression (``deep_forcing``)
    Top-C is chosen per batch element; the schedule is shared. ``score="logits"`` reproduces the release: every
    pass adds its queries to a recent-query buffer (kept as per-frame query sums in float32, the only thing
    the score needs), and the compressing pass scores the augmented cache with
    :func:`~deepforcing_kernels.release_logit_score`, compresses, then attends. ``score="mass"`` (default)
    attends to the augmented cache with ``return_mass=True`` and scores by attention mass: the mass from the
    current pass's queries plus a carried per-slot mass vector from the previous pass's last
    ``recent - block`` frames of queries (the same query set as the release); mass is summed over query heads.
    Candidates are slots ``[S_tok, T - R_tok)``; tokens already chosen ``topc_max_reuse`` times are used only
    to fill up when too few others remain; reuse counters travel with their tokens.

Accessors (per layer)
    ``keys()`` (as stored), ``effective_keys()`` (float32, re-phased as attention sees them), ``values()``,
    ``positions()`` / ``frames()`` / ``shifts()`` ``[B, L]``, ``kinds()`` (``"sink"`` / ``"topc"`` / ``"recent"``
    per slot, shared by the batch), ``reuse_counts()``, ``attention_args()`` (``sink_len``, ``sink_shift``,
    ``key_shift`` for :func:`~deepforcing_kernels.sink_attention` over ``keys()`` / ``values()``) and ``state``
    (the :class:`~deepforcing_kernels.schedule.ScheduleState`).

State
    ``state_dict()`` = ``{"format", "policy": policy.to_dict(), "geometry": {...}, "layers": [{"schedule",
    "k", "v", "frames", "reuse", "mass", "qbuf"}, ...]}`` with only the used slots; ``load_state_dict`` checks
    everything before touching any layer.

Distributed use
    ``reduce_over_heads`` (default identity) is applied to every Top-C score after the sum over this cache's
    heads, so a cache holding a shard of the heads can combine the partial scores of its peers.

Failed calls (bad shapes, dtypes, frames, NaN / inf inputs) raise before anything is mutated, so the cache is
unchanged. See :mod:`deepforcing_kernels.schedule` for running the schedule without tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .._checks import FLOAT_DTYPES, ArgumentTypeError, check_int, check_rope
from ..backends import resolve
from ..formats import CACHE_STATE_FORMAT
from ..policy import CachePolicy
from ..presets import BACKEND_NAMES, dtype_name
from ..rope import RopeSpec
from ..schedule import ScheduleState
from .executor import CacheLayer, attention_layout
from .scoring import LogitScorer as _LogitScorer
from .scoring import compress_step, release_logit_score
from .storage import select_topc

__all__ = ["CachePolicy", "StreamingKVCache", "CacheLayer", "select_topc", "compress_step", "release_logit_score",
           "attention_layout"]

_LAYER_KEYS = {"schedule", "k", "v", "frames", "reuse", "mass", "qbuf"}


class StreamingKVCache:
    """A per-layer streaming KV cache driven by a :class:`CachePolicy`.

    Args:
        policy: what to keep (:class:`CachePolicy`).
        num_layers: transformer layers; ``cache.layers[i]`` serves layer ``i``.
        batch_size: videos generated together (each its own stream; the schedule is shared).
        num_heads: query heads.
        head_dim: channels per head.
        tokens_per_frame: tokens of one latent frame (1560 for Wan at 832x480).
        rope: the RoPE layout of the keys; required by policies that re-phase (``deep_sink``,
            ``deep_forcing``), may be None otherwise.
        dtype: storage and attention dtype (float32, float16, bfloat16).
        device: where the cache lives.
        num_kv_heads: KV heads (GQA); default ``num_heads``.
        backend: attention backend (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``), resolved here, once, for
            this geometry; a backend that cannot take it fails now with the reason.
        reserve_frames: ``full`` only: initial capacity in frames (it doubles when exceeded).
        check_finite: reject q, k, v holding NaN / inf before anything is stored (a NaN key would poison every
            later pass). Costs one reduction and one host sync per pass; pass False where inputs are trusted and
            the sync matters.
        reduce_over_heads: ``partial [B, L] -> [B, L]``, applied to every Top-C score after the sum over this
            cache's heads (default identity); a head-sharded cache sums its peers' partial scores here.

    Raises:
        ValueError (or :class:`~deepforcing_kernels.policy.ArgumentTypeError`, also a TypeError) naming the bad
        argument.
    """

    def __init__(self, policy: CachePolicy, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 tokens_per_frame: int, rope: Optional[RopeSpec], dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu", num_kv_heads: Optional[int] = None,
                 backend: str = "auto", reserve_frames: Optional[int] = None, check_finite: bool = True,
                 reduce_over_heads: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if not isinstance(policy, CachePolicy):
            raise ArgumentTypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        self.policy = policy
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame, minimum=1)
        self.num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None
        if rope is None:
            if policy.rephase_sink:
                raise ValueError(f"a {policy.kind!r} policy re-phases its sink, so rope (a RopeSpec) is required")
        else:
            try:
                check_rope("rope", rope, self.head_dim)
            except TypeError as e:
                raise ArgumentTypeError(str(e)) from None
        self.rope = rope
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        # resolve now: a device or backend that cannot run here must fail at construction, not inside a pass
        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {self.device} is not available here: {e}") from None
        self.backend_impl = resolve(backend, self.device, self.head_dim, dtype)
        if reduce_over_heads is not None and not callable(reduce_over_heads):
            raise ArgumentTypeError("reduce_over_heads must be callable(partial_scores) -> scores")
        self.reduce_over_heads = reduce_over_heads
        if not isinstance(check_finite, bool):
            raise ArgumentTypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        n, F = self.tokens_per_frame, policy.block_frames
        if policy.kind == "full":
            reserve = 8 * F if reserve_frames is None else check_int("reserve_frames", reserve_frames, minimum=1)
            self.capacity_frames = max(reserve, F)
        else:
            if reserve_frames is not None:
                raise ValueError("reserve_frames only applies to the 'full' policy (others have a fixed capacity)")
            self.capacity_frames = policy.window_frames + F
        self.block_tokens = F * n
        self._want_q = torch.Size((self.batch_size, self.block_tokens, self.num_heads, self.head_dim))
        self._want_kv = torch.Size((self.batch_size, self.block_tokens, self.num_kv_heads, self.head_dim))
        # the arguments every pass passes to the backend besides the layout (validated here, once)
        self._run_kw = {"rope": rope, "softmax_scale": 1.0 / self.head_dim ** 0.5, "return_lse": False}
        # one scratch buffer for the Top-C gather of K then V, shared by all layers (they run one at a time)
        C_tok = policy.topc_frames * n
        self._scratch = (torch.empty(self.batch_size, C_tok, self.num_kv_heads, self.head_dim, dtype=dtype,
                                     device=self.device) if C_tok else None)
        self.layers: Tuple[CacheLayer, ...] = tuple(CacheLayer(self, i) for i in range(self.num_layers))

    def __repr__(self) -> str:
        return (f"StreamingKVCache({self.policy!r}, num_layers={self.num_layers}, batch_size={self.batch_size}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"tokens_per_frame={self.tokens_per_frame}, dtype={self.dtype}, device={self.device}, "
                f"backend={self.backend!r})")

    @property
    def backend(self) -> str:
        """Name of the attention backend this cache resolved to."""
        return self.backend_impl.name

    # ------------------------------------------------------------------ whole-cache operations
    def reset(self) -> None:
        """Forget the stream (keeps the allocated storage): the next pass starts a new video."""
        for layer in self.layers:
            layer._reset()

    def geometry(self) -> Dict[str, Any]:
        """Shapes, dtype and RoPE layout as plain values (what a state dict must match)."""
        rope = None
        if self.rope is not None:
            rope = {"head_dim": self.rope.head_dim, "theta": self.rope.theta, "layout": self.rope.layout,
                    "band_dims": list(self.rope.band_dims)}
        return {"num_layers": self.num_layers, "batch_size": self.batch_size, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "tokens_per_frame": self.tokens_per_frame, "dtype": dtype_name(self.dtype), "rope": rope}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the stream bit for bit: cloned tensors (on the cache's device) and plain
        Python values only, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"format": CACHE_STATE_FORMAT, "policy": self.policy.to_dict(), "geometry": self.geometry(),
                "layers": [layer._state_dict() for layer in self.layers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Raises ValueError, leaving the cache unchanged, when the state comes
        from another policy or geometry or is malformed."""
        if not isinstance(state, dict) or state.get("format") != CACHE_STATE_FORMAT:
            raise ValueError(f"not a StreamingKVCache state dict (expected format {CACHE_STATE_FORMAT!r})")
        if state.get("policy") != self.policy.to_dict():
            raise ValueError(f"the state dict was saved with policy {state.get('policy')!r}, this cache runs "
                             f"{self.policy.to_dict()!r}")
        if state.get("geometry") != self.geometry():
            raise ValueError(f"the state dict was saved with geometry {state.get('geometry')!r}, this cache has "
                             f"{self.geometry()!r}")
        layers = state.get("layers")
        if not isinstance(layers, list) or len(layers) != self.num_layers:
            raise ValueError(f"the state dict must hold {self.num_layers} layer states")
        checked = [self._check_layer_state(i, s) for i, s in enumerate(layers)]  # all checks, then mutate
        for layer, (st, d) in zip(self.layers, checked):
            _load_layer(layer, st, d)

    def _check_layer_state(self, index: int, d: Any) -> Tuple[ScheduleState, Dict[str, Any]]:
        """Validate one layer's state against this cache; returns ``(schedule state, tensors)``."""
        layer = self.layers[index]
        if not isinstance(d, dict) or set(d) != _LAYER_KEYS:
            raise ValueError(f"layer {index}: malformed layer state")
        try:
            st = ScheduleState.from_dict(d["schedule"])
        except TypeError as e:
            raise ValueError(f"layer {index}: {e}") from None
        L = st.frames * self.tokens_per_frame
        p = self.policy
        if p.kind != "full" and st.frames > p.window_frames:
            raise ValueError(f"layer {index}: {st.frames} frames exceed the window")
        if (st.frames == 0) != (st.block_start is None) or (st.block_start is None) != (st.stream_start is None):
            raise ValueError(f"layer {index}: inconsistent schedule state {st}")
        if (st.sink_start is not None and not p.rephase_sink) or (st.compressed and not p.compresses):
            raise ValueError(f"layer {index}: schedule state {st} cannot come from a {p.kind!r} policy")
        want: Dict[str, Any] = dict(layer.storage.expected(L))
        want.setdefault("reuse", None)
        want.setdefault("mass", None)
        qbuf = layer.scorer.state() if isinstance(layer.scorer, _LogitScorer) else None
        want["qbuf"] = (tuple(qbuf.shape), torch.float32) if qbuf is not None else None
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
        _check_layer_values(self, index, st, d)  # values inside the valid structure, before anything is copied
        return st, d


_INT_LIMIT = 2 ** 62  # frame numbers far beyond any stream, still exact in int64 after the schedule's arithmetic


def _check_layer_values(cache: "StreamingKVCache", index: int, st: ScheduleState, d: Dict[str, Any]) -> None:
    """Reject a layer state whose structure is right but whose values no stream of this policy can reach: the
    schedule's numbers (ranges, the compressed flag, the sink placement), where the tensors live, and the tensors'
    values (finite K / V / mass / query sums, non-negative reuse counts, slot frames in time order that match the
    schedule: whole sink and recent frames, the current block last, Top-C picks between them). ValueError naming
    the layer and the value."""
    p, n, F = cache.policy, cache.tokens_per_frame, cache.policy.block_frames

    def bad(msg: str) -> None:
        raise ValueError(f"layer {index}: {msg}")

    for name in ("block_start", "stream_start", "sink_start"):
        v = getattr(st, name)
        if v is not None and not -_INT_LIMIT < v < _INT_LIMIT:
            bad(f"{name}={v} is out of range")
    for name in ("k", "v", "frames", "reuse", "mass", "qbuf"):
        t = d[name]
        if t is not None and (t.layout != torch.strided or t.device.type not in ("cpu", cache.device.type)):
            bad(f"{name!r} must be a dense tensor on the CPU or {cache.device}, got {t.layout} on {t.device}")
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
        if st.sink_start is not None and st.frames != W:
            bad(f"sink_start={st.sink_start} (a re-phased sink) with {st.frames} frames: the sink is re-phased "
                f"only once the window ({W}) rolls")
    elif not whole(st.frames):
        bad(f"a full cache holds whole blocks, not {st.frames} frames")
    if st.sink_start is not None:
        lo_s, hi_s = st.stream_start - p.gap_frames, st.block_start + cur - st.frames - p.gap_frames
        if not lo_s <= st.sink_start <= hi_s:
            bad(f"sink_start={st.sink_start} is outside [{lo_s}, {hi_s}], where this schedule puts it")
    # tensor values
    for name in ("k", "v", "mass", "qbuf"):
        t = d[name]
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            bad(f"{name!r} holds NaN or inf")
    if d["mass"] is not None and bool((d["mass"] < 0).any()):
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
    reuse = d["reuse"]
    if reuse is not None:
        if bool((reuse < 0).any()):
            bad("'reuse' holds negative counts")
        others = torch.cat([reuse[:, :S_tok], reuse[:, S_tok + C_tok:]], dim=1)
        if bool((others != 0).any()):
            bad("'reuse' counts of sink or recent slots must be 0 (only Top-C picks are reused)")
        if C_tok and bool((reuse[:, S_tok:S_tok + C_tok] < 1).any()):
            bad("'reuse' counts of Top-C picks must be >= 1")


def _load_layer(layer: CacheLayer, st: ScheduleState, d: Dict[str, Any]) -> None:
    L = st.frames * layer.cache.tokens_per_frame
    layer.storage.load(L, d)
    if layer.scorer is not None:
        layer.scorer.load(d["qbuf"])
    layer._state = st
    layer._args_cache = None
