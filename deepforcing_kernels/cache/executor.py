"""The pass executor: one cache layer runs a :class:`~deepforcing_kernels.schedule.PassPlan` on its storage.

:meth:`CacheLayer.attend` writes the pass's K/V (after a FIFO eviction for a roll), lets the scorer see the
queries, compresses before attention (logit score) or after it (mass score), and calls the backend resolved
once by the cache. :func:`~.layout.attention_layout` is the one place that turns a schedule state into what
attention applies to the keys.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .._checks import ArgumentTypeError
from ..rotation import key_shifts, rephase
from ..schedule import PassPlan, ScheduleState, plan_pass, slot_kinds, switch_state
from .admission import TetherAdmission
from .bank import FrameBank
from .commit import CommitShadow, reads_cache
from .context import LayerContext
from .layout import attention_layout
from .memory import EmaMemory
from .prepared import Prepared, compress_native, layer_pass_ops, prepare, run_prepared
from .recache import RecacheView  # noqa: F401  (re-exported: the driver's re-cache view)
from .recency import RecencyBias
from .scoring import LogitScorer, MassScorer, Scorer, compress_step, mass_part_keys
from .storage import LayerStorage

__all__ = ["CacheLayer", "RecacheView", "attention_layout"]  # attention_layout: re-exported from .layout


class CacheLayer:
    """One layer's slice of a :class:`~deepforcing_kernels.StreamingKVCache` (``cache.layers[i]``)."""

    def __init__(self, ctx: LayerContext, index: int) -> None:
        self.ctx = ctx
        self.index = index
        self.policy = p = ctx.policy
        c = ctx
        self.scorer: Optional[Scorer] = None
        if p.compresses:
            if p.score == "logits":
                self.scorer = LogitScorer(batch=c.batch_size, num_heads=c.num_heads, head_dim=c.head_dim,
                                          recent_frames=p.recent_frames, block_frames=p.block_frames,
                                          device=c.device, frame_sums=c.backend_impl.frame_sums,
                                          reduce_over_heads=c.reduce_over_heads)
            else:
                self.scorer = MassScorer(c.reduce_over_heads, parts=p.mass_parts)
        extra: Dict[str, torch.dtype] = {}
        if p.compresses:
            extra["reuse"] = torch.int32  # Top-C reuse counters travel with their tokens
            extra.update(self.scorer.slot_buffers)
        if p.has_tape:
            extra["pos"] = torch.int64  # the position each slot is attended at (a replayed frame's is not its own)
        self.storage = LayerStorage(batch=c.batch_size, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                    tokens_per_frame=c.tokens_per_frame, capacity_frames=c.capacity_frames,
                                    dtype=c.dtype, device=c.device, extra=extra, scratch=c.scratch,
                                    slot_ops=c.backend_impl.slot_ops())
        self.bank: Optional[FrameBank] = FrameBank(self.storage, p.tape_frames) if p.has_tape else None
        self.memory: Optional[EmaMemory] = (EmaMemory(self.storage, p, c.rope, c.frame_grid) if p.memory_frames
                                            else None)
        self.recency: Optional[RecencyBias] = (RecencyBias(p, c.tokens_per_frame, c.device, c.shared)
                                               if p.recency_bias else None)
        self.admission: Optional[TetherAdmission] = (
            TetherAdmission(self.storage, p, c.rope, c.frame_grid, c.num_heads, c.reduce_over_heads)
            if p.tether_frames else None)
        #: the commit rule's real committed frames, read by the clean pass (None without the rule)
        self.shadow: Optional[CommitShadow] = (CommitShadow(self.storage, p.commit_frames, reads_cache(p))
                                               if p.commit_rule is not None else None)
        self._state = ScheduleState()
        self._args_cache: Optional[Dict[str, Any]] = None  # attention args of the current layout
        self._plain_kw: Optional[Dict[str, Any]] = None  # ... and of a plain (no mass) call over it
        self._overwrite_plan: Optional[PassPlan] = None  # the plan of an overwrite pass of the current block
        self._ops, self._ops_backend = layer_pass_ops(c, self), c.backend_impl  # whole-pass helpers (.prepared)
        self._prepared: Optional[Prepared] = None  # the current block's passes as one call each

    def reset(self) -> None:
        """Forget the stream (the storage stays allocated)."""
        self._state = ScheduleState()
        self._args_cache = self._prepared = None
        if self.scorer is not None:
            self.scorer.reset()
        if self.memory is not None:
            self.memory.reset()
        if self.recency is not None:
            self.recency.reset()
        if self.admission is not None:
            self.admission.reset()
        if self.shadow is not None:
            self.shadow.reset()

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> ScheduleState:
        """The layer's schedule state (frames in cache, current block, sink placement)."""
        return self._state

    @property
    def _len(self) -> int:
        return self._state.frames * self.ctx.tokens_per_frame

    def __len__(self) -> int:
        """Token slots in use."""
        return self._len

    def keys(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` keys as stored (RoPE'd at their original positions), a copy."""
        return self.storage.k[:, :self._len].clone()

    def values(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` values, a copy."""
        return self.storage.v[:, :self._len].clone()

    def frames(self) -> torch.Tensor:
        """``[B, L]`` int64: the frame each slot's token came from."""
        return self.storage.frames[:, :self._len].clone()

    def kinds(self) -> Tuple[str, ...]:
        """Kind of each slot (shared by the batch): ``"sink"``, ``"topc"``, ``"memory"`` (MemRoPE) or
        ``"recent"``."""
        s = self._state
        return slot_kinds(self.policy, s.frames, s.compressed, self.ctx.tokens_per_frame, self._has_memory)

    @property
    def _has_memory(self) -> bool:
        """MemRoPE's memories exist (from the first roll on, which is also when its sink is first re-phased)."""
        return (self.memory is not None or self.admission is not None) and self._state.sink_start is not None

    def memories(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``memrope``: copies of the un-rotated float32 EMA keys and values ``[B, M, Hkv, D]`` (zeros before the
        first roll); None for other policies."""
        if self.memory is None:
            return None
        return self.memory.k.clone(), self.memory.v.clone()

    def reuse_counts(self) -> Optional[torch.Tensor]:
        """``[B, L]`` int32: how often each token was chosen as Top-C (``deep_forcing`` only, else None)."""
        t = self.storage.extra.get("reuse")
        return None if t is None else t[:, :self._len].clone()

    def attention_args(self) -> Dict[str, Any]:
        """``sink_len``, ``sink_shift`` and ``key_shift`` that attention uses over the current cache (pass them
        to :func:`~deepforcing_kernels.sink_attention` with ``keys()`` / ``values()``)."""
        s = self._state
        return attention_layout(self.policy, self.ctx.tokens_per_frame, s.frames, s.sink_start, s.stream_start,
                                s.compressed, self.storage.frames, self.storage.extra.get("pos"),
                                s.current_block_frames(self.policy) * self.ctx.tokens_per_frame if s.cut else 0)

    def shifts(self) -> torch.Tensor:
        """``[B, L]`` int64: the temporal shift each slot's key gets at attention (position - frame)."""
        B, L = self.ctx.batch_size, self._len
        s = key_shifts(B, L, device=self.ctx.device, **self.attention_args())
        return torch.zeros(B, L, dtype=torch.int64, device=self.ctx.device) if s is None else s.clone()

    def positions(self) -> torch.Tensor:
        """``[B, L]`` int64: the temporal position each slot is attended at."""
        return self.frames() + self.shifts()

    def effective_keys(self) -> torch.Tensor:
        """``[B, L, Hkv, D]`` float32: the keys as attention sees them (re-phasing applied, in float32 as the
        kernels rotate them)."""
        k = self.storage.k[:, :self._len].float()
        if self.ctx.rope is None:
            return k
        return rephase(k, self.ctx.rope, self.shifts())

    # ------------------------------------------------------------------ the pass
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_frame: int,
               clean: Optional[bool] = None) -> torch.Tensor:
        """Write this pass's K/V, run the schedule, and attend.

        Args:
            q: queries ``[B, block_tokens, num_heads, head_dim]`` (RoPE'd at absolute positions); a stream's first
                block may be shorter (whole frames: an image prefix as its own block).
            k, v: keys / values ``[B, block_tokens, num_kv_heads, head_dim]`` (keys RoPE'd at absolute positions).
                All three in the cache's dtype and on its device.
            start_frame: the block's first frame. The current block's start overwrites its slots (passes 2..5);
                a frame at or after the current block's end starts a new block.
            clean: whether this is the block's clean pass (``t = 0``); None: as the cache's
                :meth:`~deepforcing_kernels.StreamingKVCache.mark_pass` said (the model marks every pass). Only
                ``tethercache`` (its admission runs at the clean pass; there it must be known) and
                ``recency_forcing`` (which biases the other passes; told nothing, pass 4 of a block is the clean
                one) read it.

        Returns:
            ``[B, block_tokens, num_heads, head_dim]`` in the cache's dtype (computed under ``torch.no_grad``:
            the cache is for inference).

        Raises:
            ValueError (TypeError too for wrong kinds) before anything is mutated. (A failure inside the
            attention backend itself, such as running out of memory, can leave the layer half-updated: call
            ``cache.reset()`` or load a state dict before using it again.)
        """
        if torch.is_grad_enabled():  # inference only: a graph through the persistent storage would grow
            with torch.no_grad():
                return self._pass(q, k, v, start_frame, clean)
        return self._pass(q, k, v, start_frame, clean)

    def _pass(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_frame: int,
              clean: Optional[bool] = None) -> torch.Tensor:
        out = run_prepared(self._prepared, self._state, self.ctx.backend_impl, start_frame, q, k, v)
        if out is not None:  # passes 2..5 of a block: checked, written and attended in one call
            return out
        F = self._check_inputs(q, k, v)
        memo = self._overwrite_plan
        if memo is not None and memo.state is self._state and start_frame == memo.start_frame and \
                F == self.policy.block_frames and type(start_frame) is int:
            plan = memo  # passes 2..5 of a block: the engine's answer is the same plan (it is pure)
        else:
            plan = plan_pass(self.policy, self._state, start_frame, None if F == self.policy.block_frames else F)
            self._overwrite_plan = None
            if plan.action == "overwrite" and F == self.policy.block_frames:
                self._overwrite_plan = plan
        c, p, st = self.ctx, self.policy, self.storage
        if self.admission is not None or self.shadow is not None:
            clean = c.clean_pass if clean is None else clean
            if not isinstance(clean, bool):
                what = "a tethercache layer admits frames" if self.admission is not None else \
                    "the commit rule changes what a layer reads"
                raise ValueError(f"{what} at the block's clean pass: pass clean=True / "
                                 "False to attend(), or mark the pass with cache.mark_pass(clean=...)")
        if self.admission is not None:
            if plan.action == "roll" and plan.evict_frames != p.block_frames:
                raise ValueError(f"a tethercache window rolls whole blocks, but this pass would evict "
                                 f"{plan.evict_frames} frames (a first block of other than {p.block_frames} frames)")
        if self.recency is not None:  # Recency Forcing: count the pass, know its step (before anything changes)
            self.recency.begin(c.clean_pass if clean is None else clean, plan.new_block)
        n, Lb = c.tokens_per_frame, F * c.tokens_per_frame
        if plan.new_block and (plan.frames_before + F) * n > st.capacity:
            st.grow(plan.frames_before + F, self._len)  # `full` only (others fit window + block)
        L0 = plan.frames_before * n
        # ---- write the block's K/V (after FIFO eviction for a roll)
        if plan.action == "overwrite":
            st.write(L0 - Lb, k, v)
            T = L0
        else:
            if self.bank is not None:  # Rolling Sink: bank the previous block, replay the tape (before evicting)
                s0 = self._state
                self.bank.apply(st, plan, L0, s0.block_start, s0.current_block_frames(p), s0.stream_start,
                                p.block_frames)
            if plan.action == "roll" and plan.evict_frames:
                e = plan.evict_frames * n
                if plan.fold is not None:  # MemRoPE: average the evicted frames into the memories first
                    self.memory.fold(st, plan, self._state.stream_start)
                if self.admission is not None and p.tether_frames:  # TetherCache: set recent's head aside
                    self.admission.stash(st, p.prefix_frames * n)
                st.evict(p.prefix_frames * n, e, L0)
                L0 -= e
            st.write_new(L0, k, v, plan.start_frame, F)
            if "pos" in st.extra:
                st.extra["pos"][:, L0:L0 + Lb] = st.frames[:, L0:L0 + Lb]
            T = L0 + Lb  # tokens in the (augmented) cache
        if self.scorer is not None:
            self.scorer.observe(q, F)
        if plan.action == "compress" and not plan.compress_after_attend:
            S_tok, R_tok = p.sink_frames * n, p.recent_frames * n
            # the release scores the whole augmented cache; only the candidates' scores are ever read
            self._compress(self.scorer.candidate_scores(st, S_tok, T - R_tok), T)
        if self.admission is not None and clean and self.admission.pending:
            self.admission.admit(st, q, plan.start_frame)  # before the clean pass attends, as the authors' code
            self._args_cache = None  # the memory's frames, hence their shifts, changed
        out = self._commit(q, k, v, plan, T) if self.shadow is not None and clean else self._attend(q, plan, T)
        self._state = plan.state
        return out

    def _commit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PassPlan, T: int) -> torch.Tensor:
        """A clean pass under the commit rule: its K/V join the shadow, and it attends there, not to the cache."""
        self.shadow.commit(k, v, plan.start_frame)
        produced = plan.start_frame + k.shape[1] // self.ctx.tokens_per_frame - plan.state.stream_start
        if produced < self.policy.commit_from_frames:  # tethercache: the rule waits for a full cache
            return self._attend(q, plan, T)
        # read first: a read in place (reads_cache) must see the cache before a compression moves it
        c = self.ctx
        out = self.shadow.attend(q, c.backend_impl.run, c.run_kw, plan.attend_frames * c.tokens_per_frame)
        if plan.compress_after_attend:  # the policy still scores Top-C by where these queries look in its cache
            self._attend(q, plan, T)
        elif plan.carry_mass:  # ... and carries their mass: only the carried queries need to look
            self._attend(q[:, max(0, q.shape[1] - self._carried_tokens()):], plan, T)
        elif plan.new_block:
            self._args_cache = None  # no layout was made for this block's cache
        return out

    def switch(self, cut: bool = False) -> None:
        """A prompt switch before the next block (:func:`~deepforcing_kernels.schedule.switch_state`): an
        ``infinity_rope`` layer flushes at that block and, with ``cut``, places it at the cut position."""
        self._state = switch_state(self.policy, self._state, cut)

    # ------------------------------------------------------------------ re-cache (prompt switch)
    def whole_frame_groups(self) -> List[Tuple[int, int, int]]:
        """The frames this layer holds whole (the sink and the recent frames; not Top-C tokens), as
        ``(slot_start, first_frame, frames)`` groups of at most ``block_frames`` consecutive frames, in slot
        order: what :meth:`recompute` rewrites at a prompt switch."""
        n, p, st = self.ctx.tokens_per_frame, self.policy, self._state
        if st.frames == 0:
            return []
        fr = self.storage.frames[0, :self._len:n].tolist()  # one entry per frame slot (whole frames only)
        S = min(p.sink_frames, st.frames)
        # memories are not frames that a clean pass can rewrite (MemRoPE's averages, TetherCache's edited K/V)
        C = p.topc_frames if st.compressed else (p.prefix_frames - p.sink_frames if self._has_memory else 0)
        groups: List[Tuple[int, int, int]] = []
        for lo, hi in ((0, S), (S + C, st.frames)):
            f = lo
            while f < hi:
                g = 1
                while f + g < hi and g < p.block_frames and fr[f + g] == fr[f] + g:
                    g += 1
                groups.append((f * n, int(fr[f]), g))
                f += g
        return groups

    @torch.no_grad()
    def recompute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_start: int) -> torch.Tensor:
        """Rewrite the K/V of the whole frames at ``slot_start`` (a :meth:`whole_frame_groups` entry) and attend
        block-causally: over the slots before them and themselves, with the current layout (re-phased sink,
        unified Top-C). ``q, k`` are RoPE'd at the frames' own positions; for sink frames the queries are moved
        to where the sink now sits (the keys stay stored at their own positions, as always). The schedule is not
        touched."""
        c, n = self.ctx, self.ctx.tokens_per_frame
        Lb = q.shape[1]
        end = slot_start + Lb
        if slot_start < 0 or end > self._len or Lb % n:
            raise ValueError(f"slots [{slot_start}, {end}) are not whole frames held by layer {self.index}")
        self.storage.write(slot_start, k, v)
        if self.shadow is not None:  # the frames it also holds are committed again under the new text
            self.shadow.refresh(k, v, int(self.storage.frames[0, slot_start]))
        args = dict(self.attention_args())
        if args["key_shift"] is not None:
            args["key_shift"] = args["key_shift"][:, :end].contiguous()
            qshift = int(args["key_shift"][0, slot_start]) if slot_start < self.policy.sink_frames * n else 0
        else:
            qshift = args["sink_shift"] if slot_start < args["sink_len"] else 0
            args["sink_len"] = min(args["sink_len"], end)
        if qshift:
            q = rephase(q, c.rope, qshift)
        out, _, _ = c.backend_impl.run(q, self.storage.k[:, :end], self.storage.v[:, :end], return_mass=False,
                                       mass_q_range=(0, Lb), **args, **c.run_kw)
        return out

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, q, k, v) -> int:
        """Validate a pass's inputs; returns its frames (``block_frames``, or fewer for a first block)."""
        c = self.ctx
        want_q, want_kv = c.want_q, c.want_kv
        frames = self.policy.block_frames
        try:  # the common case in one expression; the loop below names the culprit otherwise
            ok = (q.shape == want_q and k.shape == want_kv and v.shape == want_kv and q.dtype == c.dtype
                  and k.dtype == c.dtype and v.dtype == c.dtype and q.device == c.device and k.device == c.device
                  and v.device == c.device)
        except AttributeError:
            ok = False
        if ok:
            if c.check_finite and not c.backend_impl.all_finite(q, k, v):
                self._reject_non_finite(q, k, v)
            return frames
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != c.block_tokens and \
                0 < q.shape[1] < c.block_tokens and q.shape[1] % c.tokens_per_frame == 0:
            frames = q.shape[1] // c.tokens_per_frame  # a short first block (the schedule checks it may be)
            want_q = torch.Size((want_q[0], q.shape[1]) + tuple(want_q[2:]))
            want_kv = torch.Size((want_kv[0], q.shape[1]) + tuple(want_kv[2:]))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != c.dtype:
                raise ArgumentTypeError(f"{name} has dtype {t.dtype} but the cache stores {c.dtype}: cast q, k, v "
                                        "to the cache's dtype (and the output back)")
            if t.device != c.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {c.device}")
            want = want_q if name == "q" else want_kv
            if t.shape != want:
                raise ValueError(f"{name} must have shape [batch, block_frames * tokens_per_frame, heads, head_dim]"
                                 f" = {list(want)}, got {list(t.shape)}")
        if c.check_finite and not c.backend_impl.all_finite(q, k, v):  # one host sync for all three
            self._reject_non_finite(q, k, v)
        return frames

    def _reject_non_finite(self, q, k, v) -> None:
        finite = self.ctx.backend_impl.all_finite
        bad = [name for name, t in (("q", q), ("k", k), ("v", v)) if not finite(t)]
        raise ValueError(f"{', '.join(bad)} contain(s) NaN or inf: refusing to store or attend to it "
                         "(the cache would stay poisoned for the rest of the stream)")

    def _layout(self, plan: PassPlan) -> Dict[str, Any]:
        st, n = plan.state, self.ctx.tokens_per_frame
        return attention_layout(self.policy, n, plan.attend_frames, plan.attend_sink_start, st.stream_start,
                                plan.attend_compressed, self.storage.frames, self.storage.extra.get("pos"),
                                st.current_block_frames(self.policy) * n if st.cut else 0)

    def _attend(self, q: torch.Tensor, plan: PassPlan, T: int) -> torch.Tensor:
        c, p, n = self.ctx, self.policy, self.ctx.tokens_per_frame
        L = plan.attend_frames * n
        if self._args_cache is not None and not plan.new_block:
            args = self._args_cache  # passes 2..5 of a block attend to the same layout
        else:
            args = dict(self._layout(plan), **c.run_kw)
            self._plain_kw = None
        # a mass-mode compression attends to the augmented layout, which the block's later passes do not see
        self._args_cache = None if plan.compress_after_attend else args
        run = c.backend_impl.run
        kk, vv = self.storage.k[:, :L], self.storage.v[:, :L]
        Lq = q.shape[1]
        ops = self._ops if c.backend_impl is self._ops_backend else None
        if ops is not None and not plan.compress_after_attend:  # this pass and the block's later ones, in C++
            tail = self._carried_tokens() if plan.carry_mass else 0  # carried as scorer.carry below, in C++
            part = tail and self.storage.extra[self.scorer.names[(plan.start_frame // p.block_frames) % p.mass_parts]]
            cpp = prepare(ops, self.storage, args, L, q, c.check_finite, tail, part if tail else None)
            self._prepared = Prepared(plan.state, plan.state.block_start, c.backend_impl, cpp)
            return cpp.attend(q)[0]
        if not (plan.compress_after_attend or plan.carry_mass):
            kw = self._plain_kw  # the whole call's arguments, built once per layout
            if kw is None or kw["mass_q_range"][1] != Lq:
                kw = self._plain_kw = dict(args, return_mass=False, mass_q_range=(0, Lq))
            bias = None if self.recency is None else self.recency.key_bias(plan.attend_frames, Lq // n)
            if bias is not None:  # Recency Forcing's denoising passes (cache/recency.py)
                return run(q, kk, vv, key_bias=bias, **kw)[0]
            return run(q, kk, vv, **kw)[0]
        # queries whose mass later compressions reuse: the last recent - block frames, or (frame-wise, when they
        # span several blocks) the whole pass, as part block % mass_parts
        K, tail = p.mass_parts, self._carried_tokens()
        part = (plan.start_frame // p.block_frames) % K
        scorer: Scorer = self.scorer
        S_tok, end = p.sink_frames * n, T - p.recent_frames * n
        if not plan.compress_after_attend:
            out, _, mass = run(q, kk, vv, return_mass=True, mass_q_range=(max(0, Lq - tail), Lq), **args)
            scorer.carry(self.storage, L, mass, part)
            return out
        # mass-mode compression: score = carried mass + mass of every query of this pass, over Kaug
        if plan.carry_mass and tail:
            if Lq > tail:
                h_out, _, h_mass = run(q[:, :Lq - tail], kk, vv, return_mass=True, mass_q_range=(0, Lq - tail),
                                       **args)
            else:  # every query of the pass is in the carried tail
                h_out = q[:, :0]
                h_mass = torch.zeros(q.shape[0], kk.shape[2], L, dtype=torch.float32, device=q.device)
            t_out, _, t_mass = run(q[:, Lq - tail:], kk, vv, return_mass=True, mass_q_range=(0, tail), **args)
            out = torch.cat([h_out, t_out], dim=1)
            score = scorer.candidate_scores(self.storage, S_tok, end, h_mass, t_mass)
            scorer.carry(self.storage, L, t_mass, part)  # gathered with the tokens by the compaction below
        else:
            out, _, mass = run(q, kk, vv, return_mass=True, mass_q_range=(0, Lq), **args)
            if c.reduce_over_heads is None and compress_native(ops, self.storage, p, n, mass, T, scorer):
                return out
            score = scorer.candidate_scores(self.storage, S_tok, end, mass)
        self._compress(score, T)
        return out

    def _carried_tokens(self) -> int:
        """Query tokens of a pass whose attention mass is carried to later compressions."""
        p = self.policy
        return (p.recent_frames - p.block_frames if p.mass_parts == 1 else p.block_frames) * self.ctx.tokens_per_frame

    def _compress(self, cand_score: torch.Tensor, T: int) -> None:
        p, n = self.policy, self.ctx.tokens_per_frame
        compress_step(self.storage, cand_score, sink_tokens=p.sink_frames * n, topc_tokens=p.topc_frames * n,
                      recent_tokens=p.recent_frames * n, end=T, max_reuse=p.topc_max_reuse)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> Dict[str, Any]:
        """This layer's part of :meth:`StreamingKVCache.state_dict` (the used slots only)."""
        d: Dict[str, Any] = {"schedule": self._state.to_dict()}
        tensors = self.storage.state(self._len)
        d.update(k=tensors["k"], v=tensors["v"], frames=tensors["frames"], reuse=tensors.get("reuse"),
                 mass=tensors.get("mass"))
        d.update({name: tensors[name] for name in mass_part_keys(self.policy)})
        d["qbuf"] = self.scorer.state() if self.scorer is not None else None
        if self.bank is not None:
            d["pos"] = tensors["pos"]
            d.update(self.bank.state(self.bank_frames()))
        if self.memory is not None:
            d.update(self.memory.state())
        if self.recency is not None:
            d.update(self.recency.state())
        if self.admission is not None:
            d.update(self.admission.state())
        if self.shadow is not None:
            d.update(self.shadow.state())
        return d

    def bank_frames(self) -> int:
        """Frames held by the Rolling Sink frame bank (0 without one)."""
        if self.bank is None:
            return 0
        return FrameBank.filled(self.policy.tape_frames, self._state.block_start, self._state.stream_start)

    def load_state(self, state: ScheduleState, tensors: Dict[str, Any]) -> None:
        """Restore a layer state already checked by :func:`~.state.check_layer_state`."""
        self.storage.load(state.frames * self.ctx.tokens_per_frame, tensors)
        if self.scorer is not None:
            self.scorer.load(tensors["qbuf"])
        self._state = state
        if self.bank is not None:
            self.bank.load(self.bank_frames(), tensors)
        if self.memory is not None:
            self.memory.load(tensors)
        if self.recency is not None:
            self.recency.load(tensors)
        if self.admission is not None:
            self.admission.load(tensors)
        if self.shadow is not None:
            self.shadow.load(tensors)
        self._args_cache = self._prepared = None
