"""The streaming KV cache: one object, one attention op and one schedule engine for every policy.

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

Failed calls (bad shapes, dtypes, frames, NaN / inf inputs) raise before anything is mutated, so the cache is
unchanged. See :mod:`deepforcing_kernels.schedule` for running the schedule without tensors.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import _ext
from ._checks import FLOAT_DTYPES, all_finite, check_rope
from .attention import BACKENDS, _resolve_backend, sink_attention
from .policy import ArgumentTypeError, CachePolicy, _int
from .reference.attention import release_logit_score
from .reference.rope import rephase
from .rope import RopeSpec
from .schedule import PassPlan, ScheduleState, plan_pass, slot_kinds

__all__ = ["CachePolicy", "StreamingKVCache", "CacheLayer"]

STATE_FORMAT = "deepforcing_kernels.StreamingKVCache/1"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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
        backend: attention backend passed to :func:`~deepforcing_kernels.sink_attention`.
        reserve_frames: ``full`` only: initial capacity in frames (it doubles when exceeded).
        check_finite: reject q, k, v holding NaN / inf before anything is stored (a NaN key would poison every
            later pass). Costs one reduction and one host sync per pass; pass False where inputs are trusted and
            the sync matters.

    Raises:
        ValueError (or :class:`~deepforcing_kernels.policy.ArgumentTypeError`, also a TypeError) naming the bad
        argument.
    """

    def __init__(self, policy: CachePolicy, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 tokens_per_frame: int, rope: Optional[RopeSpec], dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu", num_kv_heads: Optional[int] = None,
                 backend: str = "auto", reserve_frames: Optional[int] = None, check_finite: bool = True) -> None:
        if not isinstance(policy, CachePolicy):
            raise ArgumentTypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        self.policy = policy
        self.num_layers = _int("num_layers", num_layers, minimum=1)
        self.batch_size = _int("batch_size", batch_size, minimum=1)
        self.num_heads = _int("num_heads", num_heads, minimum=1)
        self.head_dim = _int("head_dim", head_dim, minimum=1)
        self.tokens_per_frame = _int("tokens_per_frame", tokens_per_frame, minimum=1)
        self.num_kv_heads = num_heads if num_kv_heads is None else _int("num_kv_heads", num_kv_heads, minimum=1)
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
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # resolve now: a device or backend that cannot run here must fail at construction, not inside a pass
        try:
            probe = torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {self.device} is not available here: {e}") from None
        try:
            _resolve_backend(backend, probe)
        except RuntimeError as e:
            raise ValueError(f"backend {backend!r} cannot run on {self.device} here: {e}") from None
        self.backend = backend
        if not isinstance(check_finite, bool):
            raise ArgumentTypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        n, F = self.tokens_per_frame, policy.block_frames
        if policy.kind == "full":
            reserve = 8 * F if reserve_frames is None else _int("reserve_frames", reserve_frames, minimum=1)
            self.capacity_frames = max(reserve, F)
        else:
            if reserve_frames is not None:
                raise ValueError("reserve_frames only applies to the 'full' policy (others have a fixed capacity)")
            self.capacity_frames = policy.window_frames + F
        self.block_tokens = F * n
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
                "tokens_per_frame": self.tokens_per_frame, "dtype": _DTYPE_NAMES[self.dtype], "rope": rope}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the stream bit for bit: cloned tensors (on the cache's device) and plain
        Python values only, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {"format": STATE_FORMAT, "policy": self.policy.to_dict(), "geometry": self.geometry(),
                "layers": [layer._state_dict() for layer in self.layers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Raises ValueError, leaving the cache unchanged, when the state comes
        from another policy or geometry or is malformed."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a StreamingKVCache state dict (expected format {STATE_FORMAT!r})")
        if state.get("policy") != self.policy.to_dict():
            raise ValueError(f"the state dict was saved with policy {state.get('policy')!r}, this cache runs "
                             f"{self.policy.to_dict()!r}")
        if state.get("geometry") != self.geometry():
            raise ValueError(f"the state dict was saved with geometry {state.get('geometry')!r}, this cache has "
                             f"{self.geometry()!r}")
        layers = state.get("layers")
        if not isinstance(layers, list) or len(layers) != self.num_layers:
            raise ValueError(f"the state dict must hold {self.num_layers} layer states")
        checked = [layer._check_state(s) for layer, s in zip(self.layers, layers)]  # all checks, then mutate
        for layer, s in zip(self.layers, checked):
            layer._load_state(*s)


class CacheLayer:
    """One layer's slice of a :class:`StreamingKVCache` (``cache.layers[i]``)."""

    def __init__(self, cache: StreamingKVCache, index: int) -> None:
        self.cache = cache
        self.index = index
        self.policy = cache.policy
        c = cache
        self._alloc(c.capacity_frames)
        p = self.policy
        B = c.batch_size
        # reuse counters of Top-C (travel with their tokens) and the carried per-slot mass (mass mode)
        self._reuse = (torch.zeros(B, self._cap_tok, dtype=torch.int32, device=c.device)
                       if p.compresses else None)
        self._mass = (torch.zeros(B, self._cap_tok, dtype=torch.float32, device=c.device)
                      if p.compresses and p.score == "mass" else None)
        # logits mode: per-frame query sums of the last `recent_frames` frames of queries, oldest first
        self._qbuf = (torch.zeros(B, p.recent_frames, c.num_heads, c.head_dim, dtype=torch.float32,
                                  device=c.device) if p.compresses and p.score == "logits" else None)
        self._state = ScheduleState()
        self._args_cache: Optional[Dict[str, Any]] = None  # attention args of the current layout

    def _alloc(self, frames: int) -> None:
        c = self.cache
        self._cap_tok = frames * c.tokens_per_frame
        shape = (c.batch_size, self._cap_tok, c.num_kv_heads, c.head_dim)
        self._k = torch.zeros(shape, dtype=c.dtype, device=c.device)
        self._v = torch.zeros(shape, dtype=c.dtype, device=c.device)
        self._frames = torch.zeros(c.batch_size, self._cap_tok, dtype=torch.int64, device=c.device)

    def _grow(self, frames: int) -> None:
        """``full`` only: double the capacity (amortised O(1) per appended token)."""
        new_frames = max(frames, 2 * (self._cap_tok // self.cache.tokens_per_frame))
        L = self._len
        old = self._k, self._v, self._frames
        self._alloc(new_frames)
        self._k[:, :L].copy_(old[0][:, :L])
        self._v[:, :L].copy_(old[1][:, :L])
        self._frames[:, :L].copy_(old[2][:, :L])

    def _reset(self) -> None:
        self._state = ScheduleState()
        self._args_cache = None
        if self._qbuf is not None:
            self._qbuf.zero_()

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> ScheduleState:
        """The layer's schedule state (frames in cache, current block, sink placement)."""
        return self._state

    @property
    def _len(self) -> int:
        return self._state.frames * self.cache.tokens_per_frame

    def __len__(self) -> int:
        """Token slots in use."""
        return self._len

    def keys(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` keys as stored (RoPE'd at their original positions), a copy."""
        return self._k[:, :self._len].clone()

    def values(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` values, a copy."""
        return self._v[:, :self._len].clone()

    def frames(self) -> torch.Tensor:
        """``[B, L]`` int64: the frame each slot's token came from."""
        return self._frames[:, :self._len].clone()

    def kinds(self) -> Tuple[str, ...]:
        """Kind of each slot (shared by the batch): ``"sink"``, ``"topc"`` or ``"recent"``."""
        s = self._state
        return slot_kinds(self.policy, s.frames, s.compressed, self.cache.tokens_per_frame)

    def reuse_counts(self) -> Optional[torch.Tensor]:
        """``[B, L]`` int32: how often each token was chosen as Top-C (``deep_forcing`` only, else None)."""
        return None if self._reuse is None else self._reuse[:, :self._len].clone()

    def attention_args(self) -> Dict[str, Any]:
        """``sink_len``, ``sink_shift`` and ``key_shift`` that attention uses over the current cache (pass them
        to :func:`~deepforcing_kernels.sink_attention` with ``keys()`` / ``values()``)."""
        s = self._state
        return self._attn_args(s.frames, s.sink_start, s.compressed, self._frames)

    def shifts(self) -> torch.Tensor:
        """``[B, L]`` int64: the temporal shift each slot's key gets at attention (position - frame)."""
        a = self.attention_args()
        B, L = self.cache.batch_size, self._len
        if a["key_shift"] is not None:
            return a["key_shift"].clone()
        s = torch.zeros(B, L, dtype=torch.int64, device=self.cache.device)
        s[:, :a["sink_len"]] = a["sink_shift"]
        return s

    def positions(self) -> torch.Tensor:
        """``[B, L]`` int64: the temporal position each slot is attended at."""
        return self.frames() + self.shifts()

    def effective_keys(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` float32: the keys as attention sees them (re-phasing applied, in float32 as the
        kernels rotate them)."""
        k = self._k[:, :self._len].float()
        if self.cache.rope is None:
            return k
        return rephase(k, self.cache.rope, self.shifts())

    # ------------------------------------------------------------------ the pass
    @torch.no_grad()  # inference only: a graph through the persistent storage would grow with the stream
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_frame: int) -> torch.Tensor:
        """Write this pass's K/V, run the schedule, and attend.

        Args:
            q: queries ``[B, block_tokens, num_heads, head_dim]`` (RoPE'd at absolute positions).
            k, v: keys / values ``[B, block_tokens, num_kv_heads, head_dim]`` (keys RoPE'd at absolute positions).
                All three in the cache's dtype and on its device.
            start_frame: the block's first frame. The current block's start overwrites its slots (passes 2..5);
                a frame at or after the current block's end starts a new block.

        Returns:
            ``[B, block_tokens, num_heads, head_dim]`` in the cache's dtype (computed under ``torch.no_grad``:
            the cache is for inference).

        Raises:
            ValueError (TypeError too for wrong kinds) before anything is mutated. (A failure inside the
            attention backend itself, such as running out of memory, can leave the layer half-updated: call
            ``cache.reset()`` or load a state dict before using it again.)
        """
        self._check_inputs(q, k, v)
        plan = plan_pass(self.policy, self._state, start_frame)
        c, p = self.cache, self.policy
        n, Lb = c.tokens_per_frame, c.block_tokens
        if plan.new_block and (plan.frames_before + p.block_frames) * n > self._cap_tok:
            self._grow(plan.frames_before + p.block_frames)  # `full` only (others never exceed window + block)
        L0 = plan.frames_before * n
        # ---- write the block's K/V (after FIFO eviction for a roll)
        if plan.action == "overwrite":
            off = L0 - Lb
        else:
            if plan.action == "roll" and plan.evict_frames:
                S_tok, e = p.sink_frames * n, plan.evict_frames * n
                for t in self._per_slot():
                    _move_left(t, S_tok + e, S_tok, L0 - S_tok - e)
                L0 -= e
            off = L0
            self._frames[:, off:off + Lb] = (plan.start_frame + torch.arange(p.block_frames, device=c.device)
                                             ).repeat_interleave(n)
            if self._reuse is not None:
                self._reuse[:, off:off + Lb] = 0
            if self._mass is not None:
                self._mass[:, off:off + Lb] = 0  # new slots carry no previous-pass mass
        self._k[:, off:off + Lb].copy_(k)
        self._v[:, off:off + Lb].copy_(v)
        if self._qbuf is not None:
            self._push_queries(q)
        T = off + Lb  # tokens in the (augmented) cache
        if plan.action == "compress" and not plan.compress_after_attend:
            S_tok, R_tok = p.sink_frames * n, p.recent_frames * n
            # the release scores the whole augmented cache; only the candidates' scores are ever read
            self._compress(release_logit_score(self._qbuf, self._k[:, S_tok:T - R_tok]), T)
        out = self._attend(q, plan, T)
        self._state = plan.state
        return out

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, q, k, v) -> None:
        c = self.cache
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != c.dtype:
                raise ArgumentTypeError(f"{name} has dtype {t.dtype} but the cache stores {c.dtype}: cast q, k, v "
                                        "to the cache's dtype (and the output back)")
            if t.device != c.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {c.device}")
        B, Lb, D = c.batch_size, c.block_tokens, c.head_dim
        want = {"q": (B, Lb, c.num_heads, D), "k": (B, Lb, c.num_kv_heads, D), "v": (B, Lb, c.num_kv_heads, D)}
        for name, t in (("q", q), ("k", k), ("v", v)):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{name} must have shape [batch, block_frames * tokens_per_frame, heads, head_dim]"
                                 f" = {list(want[name])}, got {list(t.shape)}")
        if c.check_finite:
            # one host sync for all three; name the culprit only on the (rare) failure path
            if not all_finite(q, k, v):
                bad = [name for name, t in (("q", q), ("k", k), ("v", v)) if not all_finite(t)]
                raise ValueError(f"{', '.join(bad)} contain(s) NaN or inf: refusing to store or attend to it "
                                 "(the cache would stay poisoned for the rest of the stream)")

    def _per_slot(self) -> List[torch.Tensor]:
        ts = [self._k, self._v, self._frames]
        return ts + [t for t in (self._reuse, self._mass) if t is not None]

    def _push_queries(self, q: torch.Tensor) -> None:
        """Logits mode: append this pass's per-frame query sums, keep the last ``recent_frames`` frames."""
        c, F = self.cache, self.policy.block_frames
        sums = _frame_sums(q, F)
        R = self._qbuf.shape[1]
        _move_left(self._qbuf, F, 0, R - F)
        self._qbuf[:, R - F:] = sums

    def _attn_args(self, frames: int, sink_start: Optional[int], compressed: bool,
                   frame_tab: torch.Tensor) -> Dict[str, Any]:
        p, n = self.policy, self.cache.tokens_per_frame
        stream_start = self._state.stream_start if self._state.stream_start is not None else 0
        shift = 0 if sink_start is None else sink_start - stream_start
        sink_len = min(p.sink_frames, frames) * n if shift else 0
        key_shift = None
        if p.unify_topc_rope and compressed and sink_start is not None:
            L, S_tok, C_tok = frames * n, p.sink_frames * n, p.topc_frames * n
            slot = torch.arange(S_tok, S_tok + C_tok, device=self.cache.device)
            key_shift = torch.zeros(self.cache.batch_size, L, dtype=torch.int64, device=self.cache.device)
            key_shift[:, :S_tok] = shift
            key_shift[:, S_tok:S_tok + C_tok] = sink_start + slot // n - frame_tab[:, S_tok:S_tok + C_tok]
            sink_len, shift = 0, 0
        return {"sink_len": sink_len, "sink_shift": shift, "key_shift": key_shift}

    def _attend(self, q: torch.Tensor, plan: PassPlan, T: int) -> torch.Tensor:
        c, p, n = self.cache, self.policy, self.cache.tokens_per_frame
        L = plan.attend_frames * n
        if self._args_cache is not None and not plan.new_block:
            args = self._args_cache  # passes 2..5 of a block attend to the same layout
        else:
            args = self._attn_args(plan.attend_frames, plan.attend_sink_start, plan.attend_compressed,
                                   self._frames)
        # a mass-mode compression attends to the augmented layout, which the block's later passes do not see
        self._args_cache = None if plan.compress_after_attend else args
        common = dict(rope=c.rope, backend=c.backend, **args)
        kk, vv = self._k[:, :L], self._v[:, :L]
        if not (plan.compress_after_attend or plan.carry_mass):
            return sink_attention(q, kk, vv, **common)
        Lq = q.shape[1]
        tail = (p.recent_frames - p.block_frames) * n  # queries whose mass the next compression reuses
        if not plan.compress_after_attend:
            res = sink_attention(q, kk, vv, return_mass=True, mass_q_range=(Lq - tail, Lq), **common)
            self._mass[:, :L] = res.mass.sum(dim=1)
            return res.out
        # mass-mode compression: score = carried mass + mass of every query of this pass, over Kaug
        if plan.carry_mass and tail:
            head = sink_attention(q[:, :Lq - tail], kk, vv, return_mass=True, **common)
            tl = sink_attention(q[:, Lq - tail:], kk, vv, return_mass=True, **common)
            out = torch.cat([head.out, tl.out], dim=1)
            tail_mass = tl.mass.sum(dim=1)
            score = self._mass[:, :L] + head.mass.sum(dim=1) + tail_mass
        else:
            res = sink_attention(q, kk, vv, return_mass=True, **common)
            out, tail_mass = res.out, None
            score = self._mass[:, :L] + res.mass.sum(dim=1)
        if tail_mass is not None:
            self._mass[:, :L] = tail_mass  # gathered with the tokens by the compaction below
        self._compress(score[:, p.sink_frames * n:T - p.recent_frames * n], T)
        return out

    def _compress(self, cand_score: torch.Tensor, T: int) -> None:
        """Keep sink ∪ Top-C ∪ last R_tok of the augmented cache ``[0, T)``, in slot order, per batch element.
        ``cand_score [B, T - S_tok - R_tok]`` scores the candidate slots ``[S_tok, T - R_tok)``."""
        p, n = self.policy, self.cache.tokens_per_frame
        S_tok, C_tok, R_tok = p.sink_frames * n, p.topc_frames * n, p.recent_frames * n
        idx = select_topc(cand_score, self._reuse[:, S_tok:T - R_tok], C_tok, p.topc_max_reuse) + S_tok
        for t in self._per_slot():
            scratch = self.cache._scratch if t is self._k or t is self._v else None
            _compact(t, idx, S_tok, T - R_tok, S_tok + C_tok, R_tok, scratch)
        self._reuse[:, S_tok:S_tok + C_tok] += 1

    # ------------------------------------------------------------------ state dict
    def _state_dict(self) -> Dict[str, Any]:
        L = self._len
        d: Dict[str, Any] = {"schedule": self._state.to_dict(), "k": self._k[:, :L].clone(),
                             "v": self._v[:, :L].clone(), "frames": self._frames[:, :L].clone()}
        for name in ("reuse", "mass"):
            t = getattr(self, "_" + name)
            d[name] = None if t is None else t[:, :L].clone()
        d["qbuf"] = None if self._qbuf is None else self._qbuf.clone()
        return d

    def _check_state(self, d: Any):
        c = self.cache
        if not isinstance(d, dict) or set(d) != {"schedule", "k", "v", "frames", "reuse", "mass", "qbuf"}:
            raise ValueError(f"layer {self.index}: malformed layer state")
        try:
            st = ScheduleState.from_dict(d["schedule"])
        except TypeError as e:
            raise ValueError(f"layer {self.index}: {e}") from None
        L = st.frames * c.tokens_per_frame
        p = c.policy
        if p.kind != "full" and st.frames > p.window_frames:
            raise ValueError(f"layer {self.index}: {st.frames} frames exceed the window")
        if (st.frames == 0) != (st.block_start is None) or (st.block_start is None) != (st.stream_start is None):
            raise ValueError(f"layer {self.index}: inconsistent schedule state {st}")
        if (st.sink_start is not None and not p.rephase_sink) or (st.compressed and not p.compresses):
            raise ValueError(f"layer {self.index}: schedule state {st} cannot come from a {p.kind!r} policy")
        B, Hkv, D = c.batch_size, c.num_kv_heads, c.head_dim
        want = {"k": ((B, L, Hkv, D), c.dtype), "v": ((B, L, Hkv, D), c.dtype), "frames": ((B, L), torch.int64),
                "reuse": ((B, L), torch.int32) if self._reuse is not None else None,
                "mass": ((B, L), torch.float32) if self._mass is not None else None,
                "qbuf": (tuple(self._qbuf.shape), torch.float32) if self._qbuf is not None else None}
        for name, w in want.items():
            t = d[name]
            if w is None:
                if t is not None:
                    raise ValueError(f"layer {self.index}: unexpected {name!r} for this policy")
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != w[0] or t.dtype != w[1]:
                got = (list(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"layer {self.index}: {name!r} must be a {w[1]} tensor of shape {list(w[0])}, "
                                 f"got {got}")
        return st, d

    def _load_state(self, st: ScheduleState, d: Dict[str, Any]) -> None:
        L = st.frames * self.cache.tokens_per_frame
        if L > self._cap_tok:
            self._alloc(st.frames)  # `full` only; reuse/mass do not exist for it
        self._k[:, :L].copy_(d["k"])
        self._v[:, :L].copy_(d["v"])
        self._frames[:, :L].copy_(d["frames"])
        for name in ("reuse", "mass", "qbuf"):
            t = getattr(self, "_" + name)
            if t is not None:
                t[:, :d[name].shape[1]].copy_(d[name]) if name != "qbuf" else t.copy_(d[name])
        self._state = st
        self._args_cache = None


# ---------------------------------------------------------------------------------------------- tensor helpers
def select_topc(score: torch.Tensor, reuse: torch.Tensor, count: int, max_reuse: Optional[int]) -> torch.Tensor:
    """Top-``count`` candidates per row, eligible ones first (``reuse < max_reuse``), then the best-scoring
    ineligible ones as filler; returns int64 indices ``[B, count]`` sorted ascending (slot order).

    Ties keep the lower slot first (stable sorts), so the choice is deterministic.
    """
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    if max_reuse is not None:
        ineligible = (reuse >= max_reuse).gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(ineligible, dim=1, stable=True).indices)  # eligible first
    return torch.sort(order[:, :count], dim=1).values


def _frame_sums(q: torch.Tensor, frames: int) -> torch.Tensor:
    """float32 ``[B, frames, H, D]``: the sum of each frame's query tokens. On CPU a single-threaded C++ loop
    (this runs on every pass, and a parallel ATen reduction of a block costs more in fork/join than in
    arithmetic); elsewhere a float32-accumulating sum, with no float32 copy of q."""
    if q.device.type == "cpu" and q.is_contiguous():
        mod = _ext.load()
        if mod is not None and hasattr(mod, "frame_sums"):
            return mod.frame_sums(q, frames)
    B, L, H, D = q.shape
    return q.reshape(B, frames, L // frames, H, D).sum(dim=2, dtype=torch.float32)


def _move_left(t: torch.Tensor, src: int, dst: int, length: int) -> None:
    """``t[:, dst:dst+length] = t[:, src:src+length]`` for ``dst < src``, in place: copies in chunks of
    ``src - dst`` slots so no copy reads what an earlier one wrote."""
    step = src - dst
    for off in range(0, length, step):
        m = min(step, length - off)
        t[:, dst + off:dst + off + m].copy_(t[:, src + off:src + off + m])


def _compact(t: torch.Tensor, idx: torch.Tensor, keep_head: int, recent_src: int, recent_dst: int,
             recent_len: int, scratch: Optional[torch.Tensor]) -> None:
    """In place: slots ``[0, keep_head)`` stay, ``idx`` (Top-C, ascending) are gathered right after them, then
    ``[recent_src, recent_src + recent_len)`` moves to ``recent_dst``."""
    C = idx.shape[1]
    # index_select per batch element copies whole [H, D] rows; a gather with an expanded 4-D index is ~40x slower
    picked = scratch[:, :C] if scratch is not None else t.new_empty((t.shape[0], C) + tuple(t.shape[2:]))
    for b in range(t.shape[0]):
        torch.index_select(t[b], 0, idx[b], out=picked[b])
    if recent_src != recent_dst:
        _move_left(t, recent_src, recent_dst, recent_len)
    t[:, keep_head:keep_head + C].copy_(picked)
