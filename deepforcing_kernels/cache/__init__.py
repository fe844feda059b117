"""The streaming KV cache: one object, one attention op and one schedule engine for every policy.

The package's parts: :mod:`.storage` (slot tensors, rolls, compaction, Top-C gather, state tensors),
:mod:`.scoring` (the Top-C scorer contract and its two scorers with their buffers, the ``reduce_over_heads`` hook,
and :func:`~.scoring.compress_step`), :mod:`.executor` (:class:`CacheLayer`, which runs a pass plan),
:mod:`.context` (the :class:`~.context.LayerContext` a cache hands its layers) and :mod:`.state` (the checks of a
saved state). This module holds :class:`StreamingKVCache`, which owns the geometry, resolves the attention backend
once and builds the layers.

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
    ``positions()`` / ``frames()`` / ``shifts()`` ``[B, L]``, ``kinds()`` (``"sink"`` / ``"topc"`` / ``"memory"`` /
    ``"recent"`` per slot, shared by the batch), ``memories()`` (MemRoPE's un-rotated EMAs), ``reuse_counts()``, ``attention_args()`` (``sink_len``, ``sink_shift``,
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
from ..rope import RopeSpec, head_jitter
from .context import LayerContext
from .executor import CacheLayer
from .layout import attention_layout
from .scoring import compress_step, release_logit_score
from .state import check_state
from .storage import select_topc

__all__ = ["CachePolicy", "StreamingKVCache", "CacheLayer", "select_topc", "compress_step", "release_logit_score",
           "attention_layout"]

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
        frame_grid: ``(rows, cols)`` of a frame's tokens (row-major, ``rows * cols == tokens_per_frame``) for a
            3-D ``rope``: required by ``memrope`` and ``tethercache``, which work on un-rotated keys; ignored by
            other policies.
        head_shard: ``(rank, world)`` for a cache holding rank ``rank``'s contiguous group of the KV heads of a
            head-sharded model (Ulysses; :func:`~deepforcing_kernels.models.build_cache` passes the model's): a
            policy's ``head_jitter`` then gives these heads the scales they have in one process. Default None.

    With a policy's ``head_jitter`` the cache's :attr:`rope` is ``rope`` with LoL's per-head temporal frequencies
    (:func:`deepforcing_kernels.rope.head_jitter` over the KV heads): queries and keys must be rotated with
    ``cache.rope`` (the Wan model does), so the model and the cache re-phase with the same per-head angles.

    Raises:
        ValueError (or :class:`~deepforcing_kernels.policy.ArgumentTypeError`, also a TypeError) naming the bad
        argument.
    """

    def __init__(self, policy: CachePolicy, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 tokens_per_frame: int, rope: Optional[RopeSpec], dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu", num_kv_heads: Optional[int] = None,
                 backend: str = "auto", reserve_frames: Optional[int] = None, check_finite: bool = True,
                 reduce_over_heads: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 frame_grid: Optional[Tuple[int, ...]] = None,
                 head_shard: Optional[Tuple[int, int]] = None) -> None:
        if not isinstance(policy, CachePolicy):
            raise ArgumentTypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        # the policy at this frame size (Rolling Sink's window in the authors' 1560-token frames); what runs
        policy = policy.for_tokens_per_frame(check_int("tokens_per_frame", tokens_per_frame, minimum=1))
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
            if policy.rephase_sink or policy.has_tape:
                raise ValueError(f"a {policy.kind!r} policy re-phases {'its sink' if policy.rephase_sink else 'replayed frames'}"
                                 ", so rope (a RopeSpec) is required")
        else:
            try:
                check_rope("rope", rope, self.head_dim)
            except TypeError as e:
                raise ArgumentTypeError(str(e)) from None
        if policy.head_jitter:
            rope = _jittered_rope(policy, rope, self.num_kv_heads, head_shard)
        self.rope = rope
        self.frame_grid = _check_frame_grid(policy, rope, frame_grid, self.tokens_per_frame)
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        # resolve now: a device or backend that cannot run here must fail at construction, not inside a pass
        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {self.device} is not available here: {e}") from None
        uses = ("head_rope",) if rope is not None and getattr(rope, "head_scale", None) is not None else ()
        uses += ("key_bias",) if policy.recency_bias else ()  # Recency Forcing's per-key logit bias
        impl = resolve(backend, self.device, self.head_dim, dtype, features=uses)
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
        C_tok = policy.topc_frames * n
        self._ctx = LayerContext(
            policy=policy, batch_size=self.batch_size, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, tokens_per_frame=n, dtype=dtype, device=self.device, rope=rope,
            check_finite=check_finite, reduce_over_heads=reduce_over_heads, backend_impl=impl,
            capacity_frames=self.capacity_frames, block_tokens=self.block_tokens,
            want_q=torch.Size((self.batch_size, self.block_tokens, self.num_heads, self.head_dim)),
            want_kv=torch.Size((self.batch_size, self.block_tokens, self.num_kv_heads, self.head_dim)),
            # the arguments every pass passes to the backend besides the layout (validated here, once)
            run_kw={"rope": rope, "softmax_scale": 1.0 / self.head_dim ** 0.5, "return_lse": False},
            # one scratch buffer for the Top-C gather of K then V, shared by all layers (they run one at a time)
            scratch=(torch.empty(self.batch_size, C_tok, self.num_kv_heads, self.head_dim, dtype=dtype,
                                 device=self.device) if C_tok else None),
            frame_grid=self.frame_grid)
        self.layers: Tuple[CacheLayer, ...] = tuple(CacheLayer(self._ctx, i) for i in range(self.num_layers))

    def __repr__(self) -> str:
        return (f"StreamingKVCache({self.policy!r}, num_layers={self.num_layers}, batch_size={self.batch_size}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"tokens_per_frame={self.tokens_per_frame}, dtype={self.dtype}, device={self.device}, "
                f"backend={self.backend!r})")

    @property
    def backend_impl(self) -> Any:
        """The attention backend every layer calls (:class:`~deepforcing_kernels.backends.Backend`)."""
        return self._ctx.backend_impl

    @backend_impl.setter
    def backend_impl(self, impl: Any) -> None:  # e.g. a test's failing backend; every layer sees it at once
        self._ctx.backend_impl = impl

    @property
    def backend(self) -> str:
        """Name of the attention backend this cache resolved to."""
        return self.backend_impl.name

    # ------------------------------------------------------------------ whole-cache operations
    def reset(self) -> None:
        """Forget the stream (keeps the allocated storage): the next pass starts a new video."""
        for layer in self.layers:
            layer.reset()

    def switch(self, *, scene_cut: bool = False) -> None:
        """Announce a prompt switch before the next block (call it between blocks). ``infinity_rope`` flushes then
        (the sink and the last ``flush_frames`` frames stay: the authors' kv_flush) and, with ``scene_cut``, places
        that block at ``cut_position`` (rope_cut); every other policy's cache is unchanged (ValueError for a
        ``scene_cut`` there). The event is part of :meth:`state_dict` until the block runs."""
        for layer in self.layers:
            layer.switch(scene_cut)

    @property
    def wants_pass_marks(self) -> bool:
        """Whether the policy needs to know which pass is a block's clean pass (``tethercache``,
        ``recency_forcing``, and every policy with the commit rule): the model then calls :meth:`mark_pass` before
        each pass."""
        return self.policy.marks_passes or self.policy.commit_rule is not None

    def mark_pass(self, *, clean: bool) -> None:
        """Say whether the passes that follow (every layer's, until the next mark) are a block's clean pass
        (``t = 0``, the authors' ``context_noise``), for policies that act there (:attr:`wants_pass_marks`)."""
        if not isinstance(clean, bool):
            raise ArgumentTypeError(f"clean must be a bool, got {type(clean).__name__}")
        self._ctx.clean_pass = clean

    def geometry(self) -> Dict[str, Any]:
        """Shapes, dtype and RoPE layout as plain values (what a state dict must match)."""
        rope = None
        if self.rope is not None:
            rope = {"head_dim": self.rope.head_dim, "theta": self.rope.theta, "layout": self.rope.layout,
                    "band_dims": list(self.rope.band_dims)}
            if self.rope.head_scale is not None:  # only where set: states saved without per-head scales still match
                rope["head_scale"] = list(self.rope.head_scale)
        g = {"num_layers": self.num_layers, "batch_size": self.batch_size, "num_heads": self.num_heads,
             "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
             "tokens_per_frame": self.tokens_per_frame, "dtype": dtype_name(self.dtype), "rope": rope}
        if self.frame_grid is not None:  # only where the state depends on it (MemRoPE's un-rotated averages)
            g["frame_grid"] = list(self.frame_grid)
        return g

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the stream bit for bit: cloned tensors (on the cache's device) and plain
        Python values only, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"format": CACHE_STATE_FORMAT, "policy": self.policy.to_dict(), "geometry": self.geometry(),
                "layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Raises ValueError, leaving the cache unchanged, when the state comes
        from another policy or geometry or is malformed (:mod:`.state` checks everything before any layer
        changes)."""
        checked = check_state(self._ctx, self.layers, self.geometry(), state)
        for layer, (st, d) in zip(self.layers, checked):
            layer.load_state(st, d)


def _check_frame_grid(policy: CachePolicy, rope: Optional[RopeSpec], grid: Any,
                      tokens_per_frame: int) -> Optional[Tuple[int, ...]]:
    """The frame grid a policy that un-rotates keys needs (None for every other policy, whatever was given)."""
    if not policy.unrotates_keys or rope is None:
        return None
    if rope.num_axes == 1:
        if grid not in (None, (), [], (tokens_per_frame,), [tokens_per_frame]):
            raise ValueError(f"frame_grid={grid!r}: a 1-D rope has no spatial grid")
        return None
    if grid is None:
        raise ValueError(f"a {policy.kind!r} policy averages un-rotated keys, so frame_grid=(rows, cols) of a "
                         f"{tokens_per_frame}-token frame is required with a {rope.num_axes}-D rope")
    if not isinstance(grid, (tuple, list)) or len(grid) != rope.num_axes - 1:
        raise ValueError(f"frame_grid must be {rope.num_axes - 1} ints (rows, cols), got {grid!r}")
    g = tuple(check_int("frame_grid", x, minimum=1) for x in grid)
    prod = 1
    for x in g:
        prod *= x
    if prod != tokens_per_frame:
        raise ValueError(f"frame_grid {g} has {prod} tokens, but a frame has tokens_per_frame={tokens_per_frame}")
    return g


def _jittered_rope(policy: CachePolicy, rope: Optional[RopeSpec], kv_heads: int,
                   shard: Optional[Tuple[int, int]]) -> RopeSpec:
    """``rope`` with the policy's head jitter over ``kv_heads`` KV heads (this shard's of ``kv_heads * world``)."""
    if rope is None:
        raise ValueError("a policy with head_jitter rotates every head at its own temporal frequencies, so rope "
                         "(a RopeSpec) is required")
    if rope.head_scale is not None:
        raise ValueError("rope already has head_scale and the policy sets head_jitter: give one of them")
    if shard is None:
        return head_jitter(rope, kv_heads, policy.head_jitter, policy.head_jitter_seed)
    if not isinstance(shard, (tuple, list)) or len(shard) != 2:
        raise ValueError(f"head_shard must be (rank, world), got {shard!r}")
    rank, world = (check_int("head_shard", x, minimum=0) for x in shard)
    return head_jitter(rope, kv_heads * max(world, 1), policy.head_jitter, policy.head_jitter_seed,
                       shard=(rank, world))
