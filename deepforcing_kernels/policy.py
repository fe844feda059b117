"""Cache policies: plain data that drives the one schedule engine (:mod:`deepforcing_kernels.schedule`).

A :class:`CachePolicy` says *what* a streaming KV cache keeps (docs/spec.md section 4); it holds no tensors and no code
paths of its own. Every policy is validated when it is built, so a policy that exists is one the engine can run.

===================  =======================================  =====================================
policy               keeps                                    RoPE of kept keys
===================  =======================================  =====================================
``full``             everything (the cache grows)             absolute
``sliding``          the last ``window_frames``, FIFO         absolute
``frame_sink``       first ``sink_frames`` + FIFO             absolute, never moved
``deep_sink``        first ``sink_frames`` + FIFO             sink re-phased (docs/spec.md section 2)
``deep_forcing``     sink + Top-C + ``recent_frames``         sink re-phased; Top-C optionally unified
``rolling_sink``     FIFO window; a tape of early frames      tape frames at their slots' positions
                     replays into the older slots
``memrope``          sink + EMA memory frames + FIFO          sink and memory re-phased, contiguous
``infinity_rope``    first ``sink_frames`` + FIFO; a prompt   block-relativistic: slot ``i`` at
                     switch keeps sink + ``flush_frames``     ``base + i``; a scene cut moves the
                                                              block to ``cut_position``
``tethercache``      sink + admitted memory frames + recent   every slot at contiguous positions
                     (GRAB admission, TAME AdaIN)
``recency_forcing``  first ``sink_frames`` + FIFO; denoising  sink re-phased right behind the
                     passes bias history chunks' logits       oldest frame (``sink_gap = 0``)
===================  =======================================  =====================================

The methods of other authors (``rolling_sink``, ``memrope``, ``tethercache``, ``recency_forcing``, and the options
their presets set) are described, with the source repository and commit each one follows, in docs/methods.md.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from . import commit_option
from ._scalars import ArgumentTypeError, check_int  # noqa: F401  (ArgumentTypeError: part of this module's API)
from .policy_checks import check_memory, check_recency, check_tether

KINDS = ("full", "sliding", "frame_sink", "deep_sink", "deep_forcing", "rolling_sink", "memrope", "infinity_rope",
         "tethercache", "recency_forcing")
#: Rolling Sink's hard-coded tokens per frame (Wan at 832x480): its window is ``window_frames * 1560`` tokens
AUTHORS_FRAME_TOKENS = 1560
SCORES = ("mass", "logits")


#: Latent frames per block in the Self-Forcing family (docs/spec.md section 1): the default of every policy.
BLOCK_FRAMES = 3


@dataclass(frozen=True)
class CachePolicy:
    """What a :class:`~deepforcing_kernels.StreamingKVCache` keeps. Build it with the class methods.

    All sizes are in latent frames.

    Attributes:
        kind: ``"full"``, ``"sliding"``, ``"frame_sink"``, ``"deep_sink"`` or ``"deep_forcing"``.
        block_frames: frames generated per block (each block runs several passes over the same slots).
        window_frames: the most frames the cache may hold when a pass attends (None for ``full``).
        sink_frames: leading frames kept forever (0: no sink).
        rephase_sink: whether the sink's temporal RoPE follows the live context (Deep Sink).
        sink_gap: empty frame positions between the re-phased sink and where a contiguous cache would start;
            None is the release placement (one block, ``g = block_frames``). Only with ``rephase_sink``.
        budget_frames: frames kept after a Participative Compression (``deep_forcing`` only).
        recent_frames: newest frames always kept by a compression (``deep_forcing`` only).
        score: Top-C scoring, ``"mass"`` (attention mass, this package's design) or ``"logits"`` (the release).
        topc_max_reuse: a token chosen as Top-C this many times is only used as a filler; None: no cap.
        unify_topc_rope: Top-C tokens take the temporal positions right after the sink (Algorithm 1 of the
            paper); off in the release.
        tape_frames: ``rolling_sink`` only: length of the tape (frames ``0 .. tape_frames - 1`` of the stream)
            that replays back and forth into the slots of the block before the newest; the authors use
            ``window_frames - 3``.
        frame_tokens: ``rolling_sink`` only: the tokens per frame the authors' code hard-codes (1560) when it sizes
            the window as ``window_frames * 1560`` tokens. A cache with another frame size resolves the window to
            ``window_frames * frame_tokens // tokens_per_frame`` whole frames (:meth:`for_tokens_per_frame`), as
            that code does; None sizes the window in frames at any frame size.
        memory_alphas: ``memrope`` only: the update rate of each EMA memory frame kept after the sink (the
            authors' long- and short-term memories, ``(0.01, 0.1)``); one memory frame per rate.
        average_first_roll: ``memrope`` only: False (the authors' code) starts the memories at the first roll from
            the mean of the evicted frames alone, so the frames the memory slots held until then are dropped
            without being averaged; True averages them in too.
        flush_frames: ``infinity_rope`` only: frames after the sink a prompt switch keeps (the authors' kv_flush
            keeps sink + 2); None: a switch does not flush.
        cut_position: ``infinity_rope`` only: temporal position, relative to the sink at 0, where a scene cut
            places the block after the switch (the authors' rope_cut ``transition_from = 45``).
        recency_beta, recency_gamma0, recency_recent_chunks, recency_history_chunks: ``recency_forcing`` only:
            the temporal recency bias of a denoising pass at step index ``t`` (0-based),
            ``-beta * dt ** (gamma0 * 2 ** (t + 1))`` with ``dt = min(1, (d - recent_chunks) / history_chunks)``
            on the keys of frames ``d > recent_chunks`` chunks (of the pass's frames) behind the newest, counted
            over the frames read; 0 on the sink and at the clean pass (:mod:`deepforcing_kernels.cache.recency`).
        grab_alpha, grab_temperature, tame_tau: ``tethercache`` only: GRAB's diversity weight (score = softmax of
            the candidates' mean logits at ``grab_temperature`` + ``grab_alpha`` x temporal diversity) and TAME's
            AdaIN strength (admitted K/V move ``tame_tau`` of the way to the sink + memory statistics).
        head_jitter, head_jitter_seed: any policy: LoL's multi-head RoPE jitter (docs/methods.md, "Head jitter"):
            strength in ``[0, 2)`` of the per-head perturbation of the temporal band's frequencies, and the seed
            that assigns the scales to heads (:func:`deepforcing_kernels.rope.head_jitter`). The cache built for
            the policy carries the jittered :class:`~deepforcing_kernels.RopeSpec` (``cache.rope``) and the model
            rotates its queries and keys with it. 0 (default): off, and the seed is stored as 0. Set them with
            :meth:`with_head_jitter` or ``make_policy(..., head_jitter=)``.
        commit_rule: any policy (every constructor takes ``commit_rule=``): the commit rule (docs/methods.md), the
            block's clean pass reading the newest N really committed frames at their own positions instead of the
            cache. None / False: off; True: the authors' N (:attr:`commit_frames`); an int: that N.
    """

    kind: str
    block_frames: int = BLOCK_FRAMES
    window_frames: Optional[int] = None
    sink_frames: int = 0
    rephase_sink: bool = False
    sink_gap: Optional[int] = None
    budget_frames: Optional[int] = None
    recent_frames: Optional[int] = None
    score: Optional[str] = None
    topc_max_reuse: Optional[int] = None
    unify_topc_rope: bool = False
    tape_frames: Optional[int] = None
    frame_tokens: Optional[int] = None
    memory_alphas: Optional[Tuple[float, ...]] = None
    average_first_roll: bool = False
    flush_frames: Optional[int] = None
    cut_position: Optional[int] = None
    recency_beta: Optional[float] = None
    recency_gamma0: Optional[float] = None
    recency_recent_chunks: Optional[int] = None
    recency_history_chunks: Optional[int] = None
    grab_alpha: Optional[float] = None
    grab_temperature: Optional[float] = None
    tame_tau: Optional[float] = None
    head_jitter: float = 0.0
    head_jitter_seed: int = 0
    commit_rule: Union[None, bool, int] = None

    # ------------------------------------------------------------------ constructors (API.md)
    @classmethod
    def full(cls, *, block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Keep every frame (the cache grows; for short clips and as ground truth)."""
        return cls("full", block_frames=block_frames)

    @classmethod
    def sliding(cls, window_frames: int = 21, *, block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Self-Forcing: the last ``window_frames`` frames, first in first out."""
        return cls("sliding", block_frames=block_frames, window_frames=window_frames)

    @classmethod
    def frame_sink(cls, window_frames: int = 21, sink_frames: int = 3, *, block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """LongLive / StreamingLLM: the first ``sink_frames`` frames forever at their own positions, then FIFO."""
        return cls("frame_sink", block_frames=block_frames, window_frames=window_frames, sink_frames=sink_frames)

    @classmethod
    def deep_sink(cls, window_frames: int = 21, sink_frames: int = 14, sink_gap: Optional[int] = None, *,
                  block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Deep Sink: the first ``sink_frames`` frames forever, re-phased behind the live context, then FIFO."""
        return cls("deep_sink", block_frames=block_frames, window_frames=window_frames, sink_frames=sink_frames,
                   rephase_sink=True, sink_gap=sink_gap)

    @classmethod
    def deep_forcing(cls, window_frames: int = 21, sink_frames: int = 10, budget_frames: int = 16,
                     recent_frames: int = 4, score: str = "mass", topc_max_reuse: Optional[int] = 7,
                     unify_topc_rope: bool = False, sink_gap: Optional[int] = None, *,
                     block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Deep Sink + Participative Compression (docs/spec.md section 3).

        When a new block would push the cache past ``window_frames``, it is compressed to ``budget_frames``:
        the sink, ``budget - sink - recent`` frames' worth of individually chosen Top-C tokens, and the last
        ``recent_frames`` frames.
        """
        return cls("deep_forcing", block_frames=block_frames, window_frames=window_frames,
                   sink_frames=sink_frames, rephase_sink=True, sink_gap=sink_gap, budget_frames=budget_frames,
                   recent_frames=recent_frames, score=score, topc_max_reuse=topc_max_reuse,
                   unify_topc_rope=unify_topc_rope)

    @classmethod
    def rolling_sink(cls, window_frames: int = 21, tape_frames: Optional[int] = None,
                     frame_tokens: Optional[int] = AUTHORS_FRAME_TOKENS, *,
                     block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Rolling Sink (docs/methods.md): a FIFO window of ``window_frames``; once it has filled, the slots of the
        block before the newest are overwritten by ``block_frames`` frames of a tape that runs back and forth over
        the stream's frames ``0 .. tape_frames - 1`` (default ``window_frames - block_frames``, the authors'
        ``21 - 3``), attended at the slots' own positions. ``frame_tokens``: see the class docstring."""
        return cls("rolling_sink", block_frames=block_frames, window_frames=window_frames,
                   tape_frames=window_frames - block_frames if tape_frames is None else tape_frames,
                   frame_tokens=frame_tokens)

    @classmethod
    def memrope(cls, window_frames: int = 12, sink_frames: int = 3, memory_alphas: Sequence[float] = (0.01, 0.1),
                average_first_roll: bool = False, *, block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """MemRoPE (docs/methods.md): ``[sink][one EMA memory frame per alpha][recent][new block]`` in a window of
        ``window_frames``. At each roll the evicted frames' un-rotated K/V, averaged over all their tokens, are
        folded into every memory (``m = a * mean + (1 - a) * m``); sink, memories and recent frames are attended
        at contiguous positions right behind the block. ``average_first_roll``: see the class docstring."""
        return cls("memrope", block_frames=block_frames, window_frames=window_frames, sink_frames=sink_frames,
                   rephase_sink=True, sink_gap=0, memory_alphas=tuple(memory_alphas),
                   average_first_roll=average_first_roll)

    @classmethod
    def infinity_rope(cls, window_frames: int = 6, sink_frames: int = 1, flush_frames: Optional[int] = 2,
                      cut_position: int = 45, *, block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Infinity-RoPE (docs/methods.md): the first ``sink_frames`` frames + FIFO, ``window_frames`` in all (the
        authors' ``local_attn_size = 6``, ``sink_size = 1``). Block-relativistic RoPE: every pass attends to its
        window as if slot ``i`` sat at position ``i`` and its queries at ``window_frames - block_frames``, i.e.
        slot ``i`` at ``base + i`` with ``base = f0 + block_frames - window_frames`` once the window has filled
        (in the steady state: a sink re-phased right behind the recent frames, ``sink_gap = 0``). A prompt switch
        (:meth:`StreamingKVCache.switch <deepforcing_kernels.StreamingKVCache.switch>`) keeps the sink and the
        last ``flush_frames`` frames (kv_flush); a scene cut places the next block at ``cut_position`` (rope_cut)."""
        return cls("infinity_rope", block_frames=block_frames, window_frames=window_frames, sink_frames=sink_frames,
                   rephase_sink=True, sink_gap=0, flush_frames=flush_frames, cut_position=cut_position)

    @classmethod
    def tethercache(cls, window_frames: int = 21, sink_frames: int = 3, recent_frames: int = 4,
                    grab_alpha: float = 0.35, grab_temperature: float = 1.0, tame_tau: float = 0.35, *,
                    block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """TetherCache (docs/methods.md): ``[sink][memory][recent]`` in a window of ``window_frames``, the memory
        holding ``window - sink - recent`` frames. Each roll sets the frames that leave ``recent`` aside; the
        block's clean pass (``timestep 0``) scores them against the memory (GRAB: softmax over the candidates of
        their mean un-rotated logit with the pass's queries, plus ``grab_alpha`` x temporal diversity), keeps the
        best, and blends the newly admitted frames' un-rotated K and V toward the per-channel mean / std of sink +
        memory (TAME: AdaIN, strength ``tame_tau``). Every slot is attended at contiguous positions behind the
        block."""
        return cls("tethercache", block_frames=block_frames, window_frames=window_frames, sink_frames=sink_frames,
                   rephase_sink=True, sink_gap=0, recent_frames=recent_frames, grab_alpha=grab_alpha,
                   grab_temperature=grab_temperature, tame_tau=tame_tau)

    @classmethod
    def recency_forcing(cls, window_frames: int = 21, sink_frames: int = 3, beta: float = 4.0, gamma0: float = 0.1,
                        recent_chunks: int = 1, history_chunks: int = 4, *,
                        block_frames: int = BLOCK_FRAMES) -> "CachePolicy":
        """Recency Forcing, training-free (docs/methods.md): the first ``sink_frames`` frames, re-phased right
        behind the oldest frame read (``sink_gap = 0``), + FIFO, ``window_frames`` read in all (the authors' sink 3
        + newest 18). Each denoising pass adds ``-beta * dt ** (gamma0 * 2 ** (t + 1))`` (step index ``t`` from
        0) to the logits of the keys ``d > recent_chunks`` chunks behind the newest, ``dt = min(1, (d -
        recent_chunks) / history_chunks)``, fused into the attention call as a per-key bias; the sink and the
        block's clean pass are unbiased."""
        return cls("recency_forcing", block_frames=block_frames, window_frames=window_frames,
                   sink_frames=sink_frames, rephase_sink=True, sink_gap=0, recency_beta=beta, recency_gamma0=gamma0,
                   recency_recent_chunks=recent_chunks, recency_history_chunks=history_chunks)

    def for_tokens_per_frame(self, tokens_per_frame: int) -> "CachePolicy":
        """The policy a cache with ``tokens_per_frame`` tokens per frame runs: ``rolling_sink`` with
        ``frame_tokens`` set resolves its window to ``window_frames * frame_tokens // tokens_per_frame`` whole
        frames (its tape to that minus ``window_frames - tape_frames``, cut to whole blocks), as the authors' code
        does at any frame size; every other policy is returned unchanged."""
        n = check_int("tokens_per_frame", tokens_per_frame, minimum=1)
        if self.frame_tokens is None:
            return self
        W = self.window_frames * self.frame_tokens // n
        if W == self.window_frames:
            return self
        if W < self.block_frames + (self.window_frames - self.tape_frames) + 1:
            raise ValueError(f"frame_tokens={self.frame_tokens}: the authors' window of {self.window_frames} x "
                             f"{self.frame_tokens} tokens holds only {W} frames of {n} tokens; use frame_tokens=None")
        T = W - (self.window_frames - self.tape_frames)
        # where the authors' lap is not whole blocks their slices run past the tape's ends; cut it to whole blocks
        return CachePolicy.rolling_sink(W, T - T % self.block_frames, None, block_frames=self.block_frames,
                                        commit_rule=self.commit_rule).with_head_jitter(self.head_jitter,
                                                                                       self.head_jitter_seed)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        F = self._store_checked_int("block_frames", 1)
        self._check_jitter()
        commit_option.check_commit_rule(self)
        if not isinstance(self.rephase_sink, bool) or not isinstance(self.unify_topc_rope, bool) or \
                not isinstance(self.average_first_roll, bool):
            raise ArgumentTypeError("rephase_sink, unify_topc_rope and average_first_roll must be bools")
        if self.kind == "full":
            self._only(window_frames=None, sink_frames=0)
        else:
            W = self._store_checked_int("window_frames", 1)
            if W < F:
                raise ValueError(f"window_frames ({W}) must hold at least one block ({F} frames)")
        if self.kind in ("sliding", "rolling_sink"):
            self._only(sink_frames=0)
        if self.kind in ("frame_sink", "deep_sink", "deep_forcing", "infinity_rope", "recency_forcing"):
            S = self._store_checked_int("sink_frames", 1)
            if S >= self.window_frames:
                raise ValueError(f"sink_frames ({S}) must be < window_frames ({self.window_frames})")
            if S + F > self.window_frames:
                raise ValueError(f"sink_frames + block_frames ({S} + {F}) must be <= window_frames "
                                 f"({self.window_frames}): a rolled cache must hold the sink and the new block")
        if self.kind in ("full", "sliding", "frame_sink", "rolling_sink"):
            self._only(rephase_sink=False, sink_gap=None)
        if self.kind == "memrope":
            check_memory(self)
        else:
            self._only(memory_alphas=None, average_first_roll=False)
        if self.kind == "infinity_rope":
            if not self.rephase_sink or self.sink_gap != 0:
                raise ValueError("infinity_rope places its window contiguously (rephase_sink=True, sink_gap=0)")
            if self.flush_frames is not None:
                self._store_checked_int("flush_frames", 0)
            self._store_checked_int("cut_position", 0)
        else:
            self._only(flush_frames=None, cut_position=None)
        if self.kind == "recency_forcing":
            check_recency(self)
        else:
            self._only(recency_beta=None, recency_gamma0=None, recency_recent_chunks=None,
                       recency_history_chunks=None)
        if self.kind == "tethercache":
            check_tether(self)
            return
        self._only(grab_alpha=None, grab_temperature=None, tame_tau=None)
        if self.kind in ("deep_sink", "deep_forcing", "infinity_rope", "recency_forcing"):
            if not self.rephase_sink:
                raise ValueError(f"{self.kind} re-phases its sink (rephase_sink=True)")
            if self.sink_gap is not None:
                self._store_checked_int("sink_gap", 0)
        if self.kind == "rolling_sink":
            T = self._store_checked_int("tape_frames", F)
            if T % F:
                raise ValueError(f"tape_frames ({T}) must be a multiple of block_frames ({F}): the tape moves "
                                 "by whole blocks")
            if T > self.window_frames - F:
                raise ValueError(f"tape_frames ({T}) must be <= window_frames - block_frames "
                                 f"({self.window_frames} - {F}): the tape replays frames the first window held")
            if self.frame_tokens is not None:
                self._store_checked_int("frame_tokens", 1)
        else:
            self._only(tape_frames=None, frame_tokens=None)
        if self.kind != "deep_forcing":
            self._only(budget_frames=None, recent_frames=None, score=None, topc_max_reuse=None,
                       unify_topc_rope=False)
            return
        S, W = self.sink_frames, self.window_frames
        N = self._store_checked_int("budget_frames", 1)
        R = self._store_checked_int("recent_frames", 1)
        if R < F:
            raise ValueError(f"recent_frames ({R}) must be >= block_frames ({F}): the block being generated "
                             "must survive its own compression")
        if N < S + R:
            raise ValueError(f"budget_frames ({N}) must be >= sink_frames + recent_frames ({S} + {R}): "
                             "no room is left for Top-C")
        if N > W:
            raise ValueError(f"budget_frames ({N}) must be <= window_frames ({W}): compression must shrink "
                             "the cache")
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.score == "mass" and R - F > F and (R - F) % F:
            raise ValueError(f"score='mass' carries the last recent_frames - block_frames frames of queries from "
                             f"whole earlier blocks when they span more than one, so recent_frames - block_frames "
                             f"({R - F}) must be at most block_frames or a multiple of it ({F}); use "
                             "score='logits' for any length")
        if self.topc_max_reuse is not None:
            self._store_checked_int("topc_max_reuse", 1)

    def _check_jitter(self) -> None:
        """``head_jitter``: a finite number in ``[0, 2)`` (stored as a float), its seed an int >= 0 (stored as 0
        when the jitter is off, so every policy without jitter has one spelling)."""
        s = self.head_jitter
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 2:  # NaN fails the comparison
            raise ValueError(f"head_jitter must be a number in [0, 2), got {s!r}")
        object.__setattr__(self, "head_jitter", float(s))
        seed = self._store_checked_int("head_jitter_seed", 0)
        if seed >= 2 ** 63:
            raise ValueError(f"head_jitter_seed must be < 2**63, got {seed}")
        if not s:
            object.__setattr__(self, "head_jitter_seed", 0)

    def with_head_jitter(self, strength: float, seed: int = 0) -> "CachePolicy":
        """This policy with LoL's multi-head RoPE jitter of ``strength`` (in ``[0, 2)``; 0 turns it off) drawn by
        ``seed``; ValueError naming ``head_jitter`` / ``head_jitter_seed`` for a bad value."""
        return replace(self, head_jitter=strength, head_jitter_seed=seed)

    def __repr__(self) -> str:
        # the dataclass repr with the optional fields (jitter, recency bias, commit rule) only where they are set:
        # every other policy reads as it always has (saved runs compare policies by their repr)
        shown = [f for f in fields(self) if (self.head_jitter or not f.name.startswith("head_jitter"))
                 and (self.recency_bias or not f.name.startswith("recency_"))
                 and (f.name != "commit_rule" or self.commit_rule is not None)]
        return f"{type(self).__qualname__}(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in shown) + ")"

    def _store_checked_int(self, name: str, minimum: int) -> int:
        """Check the int field ``name`` with :func:`check_int` and store it back (numpy / 0-d tensor ints are stored as Python ints)."""
        value = check_int(name, getattr(self, name), minimum=minimum)
        object.__setattr__(self, name, value)
        return value

    def _only(self, **defaults: Any) -> None:
        """Reject fields that mean nothing for this kind (a typo'd policy should fail, not be ignored)."""
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default or type(value) is not type(default):
                raise ValueError(f"{name}={value!r} does not apply to a {self.kind!r} policy")

    # ------------------------------------------------------------------ derived facts
    @property
    def compresses(self) -> bool:
        """Whether the policy runs Participative Compression."""
        return self.kind == "deep_forcing"

    @property
    def mass_parts(self) -> int:
        """Earlier blocks whose queries' attention mass the ``mass`` score carries to a compression: the last
        ``recent_frames - block_frames`` frames of queries, from the previous block alone when they fit in it
        (chunk-wise: 1 of 3 frames), else from that many whole blocks (frame-wise, 1 frame a block: 3)."""
        R, F = self.recent_frames or 0, self.block_frames
        return 1 if R - F <= F else (R - F) // F

    @property
    def topc_frames(self) -> int:
        """C = budget - sink - recent: frames' worth of Top-C tokens after a compression (0 without PC)."""
        if not self.compresses:
            return 0
        return self.budget_frames - self.sink_frames - self.recent_frames

    @property
    def has_tape(self) -> bool:
        """Whether the policy replays a tape of early frames (Rolling Sink)."""
        return self.kind == "rolling_sink"

    @property
    def memory_frames(self) -> int:
        """EMA memory frames after the sink (``memrope``; 0 otherwise)."""
        return len(self.memory_alphas) if self.memory_alphas else 0

    @property
    def tether_frames(self) -> int:
        """TetherCache's memory frames, ``window - sink - recent`` (``tethercache``; 0 otherwise)."""
        if self.kind != "tethercache":
            return 0
        return self.window_frames - self.sink_frames - self.recent_frames

    @property
    def unrotates_keys(self) -> bool:
        """Whether the policy works on un-rotated keys (MemRoPE's averages, TetherCache's scores and AdaIN), so a
        3-D RoPE cache needs its frame grid."""
        return bool(self.memory_frames) or self.kind == "tethercache"

    @property
    def prefix_frames(self) -> int:
        """Frames at the head of a rolled cache that never roll out: the sink and the memory frames (MemRoPE's
        EMAs, TetherCache's admitted frames). A roll evicts right after them."""
        return self.sink_frames + self.memory_frames + self.tether_frames

    @property
    def recency_bias(self) -> bool:
        """Whether denoising passes add a temporal recency bias to the keys' logits (``recency_forcing``)."""
        return self.kind == "recency_forcing"

    @property
    def marks_passes(self) -> bool:
        """Whether the cache must be told which pass is a block's clean pass (TetherCache admits there; Recency
        Forcing leaves it unbiased)."""
        return self.kind in ("tethercache", "recency_forcing")

    @property
    def block_relative(self) -> bool:
        """Whether the window is attended block-relativistically (Infinity-RoPE: slot ``i`` at ``base + i``)."""
        return self.kind == "infinity_rope"

    @property
    def gap_frames(self) -> int:
        """The effective sink gap g (``block_frames`` when ``sink_gap`` is None, the release)."""
        return self.block_frames if self.sink_gap is None else self.sink_gap

    commit_frames = property(commit_option.commit_frames)
    commit_from_frames = property(commit_option.commit_from_frames)

    @property
    def head_jitter_setting(self) -> Optional[list]:
        """``[head_jitter, head_jitter_seed]`` as a saved run's settings hold it (None: no jitter)."""
        return [self.head_jitter, self.head_jitter_seed] if self.head_jitter else None

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values only (safe for ``torch.save`` / ``torch.load(weights_only=True)``); the head jitter's
        fields only when it is on (a state saved without them reads back as jitter off), the recency bias's and
        the commit rule's only where set (every other policy's dict is what it was before they existed)."""
        d = asdict(self)
        if not self.head_jitter:
            del d["head_jitter"], d["head_jitter_seed"]
        if not self.recency_bias:
            for name in ("recency_beta", "recency_gamma0", "recency_recent_chunks", "recency_history_chunks"):
                del d[name]
        if self.commit_rule is None:
            del d["commit_rule"]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CachePolicy":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a policy dict is expected, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        extra = set(d) - names
        if extra:
            raise ValueError(f"unknown policy fields {sorted(extra)}")
        if "kind" not in d:
            raise ValueError(f"a policy dict needs 'kind' (one of {', '.join(KINDS)}), got the fields {sorted(d)}")
        try:
            return cls(**d)
        except TypeError as e:
            if isinstance(e, ArgumentTypeError):
                raise
            raise ValueError(f"a policy dict cannot be built: {e}") from None


commit_option.take_commit_rule_keyword(CachePolicy)
