"""The schedule engine: one pure-Python state machine that runs every :class:`CachePolicy`.

The engine works on whole frames and integers only (no tensors, no devices): given a policy, the current
:class:`ScheduleState` of a layer and the ``start_frame`` of a pass, :func:`plan_pass` decides what the pass does
and where the sink sits. :class:`~deepforcing_kernels.StreamingKVCache` executes the plan on tensors; the
``deepforcing trace`` command and the tests run it alone.

What a pass does (docs/spec.md sections 1-3):

* ``overwrite`` — ``start_frame`` is the current block's start: passes 2..5 of a block rewrite the block's slots.
* ``append`` — a new block (``start_frame >= block end``) that fits in the window (``full`` always appends).
* ``roll`` — a new block that would overflow the window: the oldest frames after the sink are evicted (FIFO)
  so that exactly ``window_frames`` remain.
* ``compress`` — ``deep_forcing`` only: a new block that would overflow the window. The augmented cache
  ``[cache, new block]`` is reduced to ``budget_frames``: sink + Top-C tokens + the last ``recent_frames``.
  With ``score="logits"`` the compression runs before attention (the release); with ``score="mass"`` the pass
  attends to the augmented cache (that is where the mass comes from) and compresses after.

Sink placement (Deep Sink, docs/spec.md section 2): re-phasing happens only on the first pass of a block that
overflows; the sink then encodes temporal positions ``sink_start + i`` with
``sink_start = f0 + block_frames - frames_in_cache - g`` (``g = sink_gap``, or ``block_frames`` when None),
where ``frames_in_cache`` is what the pass attends to. Before the first overflow the sink sits at its own
positions. All other passes reuse the placement.

Running the schedule alone (what ``deepforcing trace`` draws)::

    from deepforcing_kernels import CachePolicy
    from deepforcing_kernels.schedule import simulate

    for blk in simulate(CachePolicy.deep_forcing(score="logits"), num_frames=45, tokens_per_frame=1):
        print(blk.start_frame, blk.action, blk.attended.describe())
        # blk.attended / blk.after: Layout(frames, positions, kinds), one entry per token slot

Rolling Sink (``rolling_sink``, docs/methods.md) adds two steps to the first pass of a new block, both what the
authors' code does right after the previous block's clean pass (deferred to here, where nothing has attended in
between, so every pass attends to the same window): the previous block's frames among the stream's first
``tape_frames`` are copied to a frame bank (``PassPlan.bank``), and, once the previous block started at or after
``window_frames``, the slots of the block before it are overwritten by ``block_frames`` banked frames
(``PassPlan.tape``, taken by :func:`tape_frames_at`) attended at those slots' positions (``PassPlan.tape_at``).

MemRoPE (``memrope``, docs/methods.md) rolls like Deep Sink with ``sink_gap = 0``, but evicts after the sink *and*
its memory frames (``policy.prefix_frames``), and each roll first folds the evicted frames into the memories
(``PassPlan.fold``: which frame slots are averaged; ``PassPlan.fold_init``: the first roll starts the memories
from that mean). The memories hold no frame; :func:`simulate` marks them with frame ``-2``. Once the memories
exist (the first roll) ``sink_start`` is set, so a schedule state needs no further field.

TetherCache (``tethercache``, docs/methods.md) rolls the same way after its sink and memory frames (``prefix_frames``
counts them), with every slot at contiguous positions behind the block (``sink_gap = 0``). What the memory holds
is data-dependent (admission at the clean pass, :mod:`deepforcing_kernels.cache.admission`): :func:`simulate` marks
it with frame ``-2`` too.

Top-C picks depend on the data, so :func:`simulate` marks Top-C slots with frame ``-1`` (and position ``-1``
unless ``unify_topc_rope``). To see real picks, run a tiny cache and read its accessors::

    cache = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=1, head_dim=8, tokens_per_frame=1,
                             rope=RopeSpec.gptj(8), dtype=torch.float32)
    layer = cache.layers[0]
    for f0 in range(0, 45, 3):
        q, k, v = torch.randn(3, 1, 3, 1, 8).unbind(0)
        layer.attend(q, k, v, start_frame=f0)
        print(f0, layer.frames()[0].tolist(), layer.positions()[0].tolist(), layer.kinds())
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from ._scalars import check_int
from .blockrel import EVENTS, placement
from .policy import CachePolicy

SINK, TOPC, RECENT, MEMORY = "sink", "topc", "recent", "memory"
UNKNOWN_FRAME = -1  # a Top-C slot in simulate(): which token the data picks is not known without tensors
MEMORY_FRAME = -2  # a memory slot in simulate(): an average of frames, not one frame


@dataclass(frozen=True)
class ScheduleState:
    """Where one layer's stream stands, in whole frames.

    Attributes:
        frames: frames in the cache now.
        block_start: start frame of the current (last written) block; None before the first pass.
        stream_start: start frame of the first block (the sink's first frame); None before the first pass.
        sink_start: temporal position of sink frame 0; None while the sink sits at its own positions (never
            re-phased yet, or a policy that does not re-phase).
        compressed: a Top-C region (``topc_frames`` frames' worth of tokens) follows the sink.
        first_block_frames: frames of the stream's first block when it is shorter than ``block_frames`` (an
            image prefix run as its own block, Self-Forcing's ``independent_first_frame``); None otherwise.
        pending: ``infinity_rope``: the event a prompt switch left for the next block (``"flush"`` or ``"cut"``,
            :mod:`deepforcing_kernels.blockrel`); None otherwise.
        cut: ``infinity_rope``: the current block was placed by a scene cut (its own slots at its own frames).
    """

    frames: int = 0
    block_start: Optional[int] = None
    stream_start: Optional[int] = None
    sink_start: Optional[int] = None
    compressed: bool = False
    first_block_frames: Optional[int] = None
    pending: Optional[str] = None
    cut: bool = False

    def current_block_frames(self, policy: CachePolicy) -> int:
        """Frames of the current (last written) block."""
        if self.first_block_frames is not None and self.block_start == self.stream_start:
            return self.first_block_frames
        return policy.block_frames

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ScheduleState":
        keys = {"frames", "block_start", "stream_start", "sink_start", "compressed"}
        if not isinstance(d, dict) or not keys <= set(d) <= keys | {"first_block_frames", "pending", "cut"}:
            raise ValueError(f"a schedule state dict is expected, got {d!r}")
        if d.get("pending") not in (None,) + EVENTS or not isinstance(d.get("cut", False), bool):
            raise ValueError(f"pending must be None or one of {EVENTS} and cut a bool, got {d!r}")
        check_int("frames", d["frames"], minimum=0)
        for name in ("block_start", "stream_start", "sink_start"):
            if d[name] is not None:
                check_int(name, d[name])
        if not isinstance(d["compressed"], bool):
            raise ValueError("compressed must be a bool")
        if d.get("first_block_frames") is not None:
            check_int("first_block_frames", d["first_block_frames"], minimum=1)
        return cls(**d)


@dataclass(frozen=True)
class PassPlan:
    """What one pass does; returned by :func:`plan_pass`.

    Attributes:
        action: ``"overwrite"``, ``"append"``, ``"roll"`` or ``"compress"``.
        start_frame: the pass's first frame f0.
        frames_before: frames in the cache before the pass.
        evict_frames: ``roll``: frames evicted right after the sink.
        attend_frames: frames the pass attends to (its own block included).
        attend_sink_start: sink placement for the attention (None: own positions).
        attend_compressed: a Top-C region is present in the attended cache.
        compress_after_attend: ``compress`` in mass mode: attend to the augmented cache, then compress.
        carry_mass: mass mode: the next block compresses, so this pass records the attention mass of its last
            ``recent - block`` frames of queries (the "previous pass" part of the next compression's score).
        state: the layer's state after the pass.
        bank: ``rolling_sink``: frames of the previous block to copy into the frame bank (before anything moves).
        tape_at: ``rolling_sink``: first frame position of the slots the tape overwrites (the block before the
            previous one), or None.
        tape: ``rolling_sink``: the banked frames written there, slot by slot (a frame's tokens keep their order).
        fold: ``memrope``: ``(first frame slot, frames)`` of the cache before the pass whose tokens are averaged
            into the memories (before the eviction), or None.
        fold_init: ``memrope``: the first roll: the memories start from that mean.
    """

    action: str
    start_frame: int
    frames_before: int
    evict_frames: int
    attend_frames: int
    attend_sink_start: Optional[int]
    attend_compressed: bool
    compress_after_attend: bool
    carry_mass: bool
    state: ScheduleState
    bank: Tuple[int, ...] = ()
    tape_at: Optional[int] = None
    tape: Tuple[int, ...] = ()
    fold: Optional[Tuple[int, int]] = None
    fold_init: bool = False

    @property
    def new_block(self) -> bool:
        return self.action != "overwrite"

    def attend_sink_shift(self) -> int:
        """Shift (frames) applied to the sink keys by this pass's attention."""
        if self.attend_sink_start is None:
            return 0
        return self.attend_sink_start - self.state.stream_start


def plan_pass(policy: CachePolicy, state: ScheduleState, start_frame: int,
              frames: Optional[int] = None) -> PassPlan:
    """Decide what a pass starting at ``start_frame`` does. Pure: nothing is mutated.

    Args:
        policy: the cache policy.
        state: the layer's state before the pass.
        start_frame: f0 of the pass. The current block's start overwrites its slots; anything at or after the
            current block's end starts a new block; the first pass of a stream may start at any frame >= 0.
        frames: frames of the pass (default ``policy.block_frames``). Only a stream's first block may be shorter
            (``1 <= frames <= block_frames``: an image prefix as its own block); passes over the current block
            must repeat its length.

    Returns:
        A :class:`PassPlan` whose ``state`` is the layer's state after the pass.

    Raises:
        ValueError: ``start_frame`` is negative, inside the current block, or before it; or ``frames`` is not
        allowed here.
    """
    f0 = check_int("start_frame", start_frame, minimum=0)
    B = policy.block_frames
    F = B if frames is None else check_int("frames", frames, minimum=1)
    if state.block_start is not None:
        cur = state.current_block_frames(policy)
        if f0 == state.block_start:
            if F != cur:
                raise ValueError(f"a pass over the current block must have its {cur} frames, got {F}")
            carry = _carry_mass(policy, state.frames)
            return PassPlan("overwrite", f0, state.frames, 0, state.frames, state.sink_start, state.compressed,
                            False, carry, state)
        if f0 < state.block_start + cur:
            raise ValueError(f"start_frame {f0} is neither the current block's start ({state.block_start}) nor "
                             f"at or after its end ({state.block_start + cur}): streams only move forward by "
                             "whole blocks")
        if F != B:
            raise ValueError(f"only a stream's first block may have other than {B} frames, got {F}")
        if (policy.has_tape or policy.unrotates_keys) and f0 != state.block_start + cur:
            why = ("its tape replays every frame" if policy.has_tape else
                   "its keys sit at their slots' positions, as the authors' code places them")
            raise ValueError(f"a {policy.kind} stream moves block after block ({why}), so "
                             f"start_frame must be {state.block_start + cur}, got {f0}")
    elif F > B:
        raise ValueError(f"a stream's first block has at most block_frames={B} frames, got {F}")
    first = state.first_block_frames if state.block_start is not None else (F if F != B else None)
    stream_start = f0 if state.stream_start is None else state.stream_start
    if policy.block_relative:
        return _block_relative(policy, state, f0, F, first, stream_start)
    L, W = state.frames, policy.window_frames
    if policy.kind == "full" or L + F <= W:
        after = ScheduleState(L + F, f0, stream_start, state.sink_start, state.compressed, first)
        plan = PassPlan("append", f0, L, 0, L + F, state.sink_start, state.compressed, False,
                        _carry_mass(policy, L + F), after)
        return _with_tape(policy, state, plan) if policy.has_tape else plan
    g = policy.gap_frames
    if policy.compresses:
        N = policy.budget_frames
        sink_after = f0 + F - N - g
        after = ScheduleState(N, f0, stream_start, sink_after, True, first)
        if policy.score == "mass":
            # the pass attends to the augmented cache, so that is the cache the placement rule applies to
            return PassPlan("compress", f0, L, 0, L + F, f0 + F - (L + F) - g, state.compressed, True,
                            _carry_mass(policy, N), after)
        return PassPlan("compress", f0, L, 0, N, sink_after, True, False, False, after)
    sink_after = f0 + F - W - g if policy.rephase_sink else None
    after = ScheduleState(W, f0, stream_start, sink_after, False, first)
    plan = PassPlan("roll", f0, L, L + F - W, W, sink_after, False, False, False, after)
    if policy.memory_frames:
        return replace(plan, **_fold(policy, state, plan.evict_frames))
    return _with_tape(policy, state, plan) if policy.has_tape else plan


def _fold(policy: CachePolicy, state: ScheduleState, evict: int) -> Dict[str, Any]:
    """MemRoPE's fold of a roll: the evicted frames (right after the sink and the memories); at the first roll
    (no memories yet) the memory slots still hold frames, which the authors' code overwrites without averaging
    them (``average_first_roll`` averages them in)."""
    first = state.sink_start is None
    if first and policy.average_first_roll:
        return {"fold": (policy.sink_frames, policy.memory_frames + evict), "fold_init": True}
    return {"fold": (policy.prefix_frames, evict), "fold_init": first}


def _block_relative(policy: CachePolicy, state: ScheduleState, f0: int, F: int, first: Optional[int],
                    stream_start: int) -> PassPlan:
    """A new block of an ``infinity_rope`` stream (:mod:`deepforcing_kernels.blockrel`): the flush / roll
    eviction, then slot ``i`` at ``sink_start + i`` (``sink_start = f0 - q``); None while every slot is still at
    its own frame (the first window, before any event)."""
    evict, L, q, cut = placement(policy, state.frames, f0 - stream_start, F, state.pending)
    moved = state.sink_start is not None or evict or cut or q != f0 - stream_start
    sink = f0 - q if moved else None
    after = ScheduleState(L, f0, stream_start, sink, False, first, None, cut)
    return PassPlan("roll" if evict else "append", f0, state.frames, evict, L, sink, False, False, False, after)


def switch_state(policy: CachePolicy, state: ScheduleState, cut: bool = False) -> ScheduleState:
    """The state after a prompt switch announced before the next block: ``infinity_rope`` flushes at that
    block (``flush_frames`` set) and, with ``cut``, places it at ``cut_position``; other policies are unchanged.
    ValueError for a cut on a policy without one."""
    if not isinstance(cut, bool):
        raise TypeError(f"cut must be a bool, got {type(cut).__name__}")
    if not policy.block_relative:
        if cut:
            raise ValueError(f"a scene cut needs the infinity_rope policy (rope_cut), not {policy.kind!r}")
        return state
    if not cut and policy.flush_frames is None:
        return state
    return replace(state, pending="cut" if cut else "flush")


def tape_frames_at(policy: CachePolicy, rel: int) -> Tuple[int, ...]:
    """Rolling Sink's tape: the ``block_frames`` frames (relative to the stream's start) written into the slots
    of the block at relative frame ``rel``. The tape runs over frames ``0 .. tape_frames - 1`` in laps of
    ``tape_frames``; odd laps run forward, even laps backward, the first (``rel == tape_frames``) backward from
    frame ``tape_frames - 1`` (the authors' ``reverse = (rel // T) % 2 == 1``)."""
    T, F = policy.tape_frames, policy.block_frames
    if (rel // T) % 2 == 1:
        right = T - rel % T
        return tuple(range(right - 1, right - F - 1, -1))
    left = rel % T
    return tuple(range(left, left + F))


def _with_tape(policy: CachePolicy, state: ScheduleState, plan: PassPlan) -> PassPlan:
    """Add Rolling Sink's bank and tape steps to the first pass of a new block (see the module docstring)."""
    if state.block_start is None:
        return plan
    F, s, ss = policy.block_frames, state.block_start, state.stream_start
    bank = tuple(f for f in range(s, s + state.current_block_frames(policy)) if f - ss < policy.tape_frames)
    # the tape's laps are counted from the first whole block (a short first block, an image, shifts the grid;
    # the authors' pipeline runs whole blocks only), its frames from the stream's first frame
    base = ss + (state.first_block_frames or 0)
    tape_at, tape = None, ()
    if s - base >= policy.window_frames:
        tape_at = s - F
        tape = tuple(ss + f for f in tape_frames_at(policy, tape_at - base))
    return replace(plan, bank=bank, tape_at=tape_at, tape=tape)


def _carry_mass(policy: CachePolicy, frames_after: int) -> bool:
    """Mass mode records the tail mass of a pass only when one of the next ``mass_parts`` blocks will compress
    (no wasted work; chunk-wise that is the next block)."""
    return (policy.compresses and policy.score == "mass" and policy.recent_frames > policy.block_frames
            and frames_after + policy.mass_parts * policy.block_frames > policy.window_frames)


# ---------------------------------------------------------------------------------------------- slot layout
def slot_kinds(policy: CachePolicy, frames: int, compressed: bool, tokens_per_frame: int,
               memory: bool = False) -> Tuple[str, ...]:
    """Kind of every token slot of a cache holding ``frames`` frames: ``"sink"``, ``"topc"``, ``"memory"``
    (``memory``: MemRoPE's memories exist, i.e. its sink has been re-phased) or ``"recent"``."""
    S = min(policy.sink_frames, frames)
    C = policy.topc_frames if compressed else 0
    M = policy.prefix_frames - policy.sink_frames if memory else 0
    n = tokens_per_frame
    return (SINK,) * (S * n) + (TOPC,) * (C * n) + (MEMORY,) * (M * n) + (RECENT,) * ((frames - S - C - M) * n)


def topc_positions_unified(sink_start: int, first_slot: int, count: int, tokens_per_frame: int) -> List[int]:
    """Algorithm 1's Top-C RoPE unification: Top-C slot ``s`` (slot order) sits at ``sink_start + s // n``,
    i.e. ``sink_start + S + rank // n``: the C frame positions right after the sink."""
    return [sink_start + s // tokens_per_frame for s in range(first_slot, first_slot + count)]


@dataclass(frozen=True)
class Layout:
    """One token slot per entry, in slot (= time) order.

    Attributes:
        frames: the frame each slot's token came from (``-1``: a Top-C pick, data-dependent).
        positions: the temporal position each slot is attended at (``-1``: a Top-C pick at its own, unknown
            position).
        kinds: ``"sink"``, ``"topc"`` or ``"recent"``.
    """

    frames: Tuple[int, ...]
    positions: Tuple[int, ...]
    kinds: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def describe(self) -> str:
        """Compact ``frame@position`` runs separated by ``|`` at kind changes, e.g.
        ``0@5..9@14 | topc x2 | 20@20..23@23`` (one entry per frame; Top-C picks counted in tokens)."""
        parts: List[str] = []
        i, n = 0, len(self.frames)
        while i < n:
            j = i
            while j < n and self.kinds[j] == self.kinds[i]:
                j += 1
            parts.append(_run(self.frames[i:j], self.positions[i:j]))
            i = j
        return " | ".join(parts)


def _run(frames: Tuple[int, ...], positions: Tuple[int, ...]) -> str:
    """One kind's slots: ``f@p..f@p`` per distinct frame; Top-C picks of simulate() as ``topc xK`` (tokens),
    with ``@p..p`` when their positions are known (``unify_topc_rope``)."""
    if frames and frames[0] == UNKNOWN_FRAME:
        known = [p for p in positions if p != UNKNOWN_FRAME]
        where = f"@{known[0]}..{known[-1]}" if known else ""
        return f"topc x{len(frames)}{where}"
    if frames and frames[0] == MEMORY_FRAME:
        return f"memory@{positions[0]}..{positions[-1]}" if positions[0] != positions[-1] else f"memory@{positions[0]}"
    items: List[str] = []
    for f, p in zip(frames, positions):
        s = f"{f}@{p}"
        if not items or items[-1] != s:  # further tokens of the same frame
            items.append(s)
    return ",".join(items) if len(items) <= 2 else f"{items[0]}..{items[-1]}"


@dataclass(frozen=True)
class BlockTrace:
    """The schedule of one block, from :func:`simulate`.

    Attributes:
        start_frame: f0.
        plan: the first pass's :class:`PassPlan`.
        attended: the layout the first pass attends to.
        after: the layout after the first pass (what the block's other passes attend to).
    """

    start_frame: int
    plan: PassPlan
    attended: Layout
    after: Layout

    @property
    def action(self) -> str:
        return self.plan.action


def _layout(policy: CachePolicy, slot_frames: List[int], state_frames: int, compressed: bool,
            sink_start: Optional[int], stream_start: int, n: int) -> Layout:
    kinds = slot_kinds(policy, state_frames, compressed, n,
                       policy.prefix_frames > policy.sink_frames and sink_start is not None)
    assert len(kinds) == len(slot_frames)
    shift = 0 if sink_start is None else sink_start - stream_start
    pos = []
    S_tok, C_tok = policy.sink_frames * n, (policy.topc_frames * n if compressed else 0)
    unified = (topc_positions_unified(sink_start, S_tok, C_tok, n)
               if policy.unify_topc_rope and compressed and sink_start is not None else None)
    for s, (f, k) in enumerate(zip(slot_frames, kinds)):
        if k == SINK:
            pos.append(f + shift)
        elif k == TOPC:
            pos.append(unified[s - S_tok] if unified is not None else f)
        elif k == MEMORY:  # contiguous after the sink
            pos.append(sink_start + s // n)
        else:
            pos.append(f)
    return Layout(tuple(slot_frames), tuple(pos), kinds)


def simulate(policy: CachePolicy, num_frames: int, tokens_per_frame: int = 1, *,
             start_frame: int = 0, switches: Optional[Dict[int, bool]] = None) -> List[BlockTrace]:
    """Run the schedule alone (no tensors) over a stream of ``num_frames`` frames, block after block.

    Args:
        policy: the cache policy.
        num_frames: frames to generate; rounded up to whole blocks.
        tokens_per_frame: slots per frame in the returned layouts.
        start_frame: the first block's f0.
        switches: ``{frame: cut}``: prompt switches before the blocks at those frames (:func:`switch_state`).

    Returns:
        One :class:`BlockTrace` per block. Top-C slots have frame -1 (the data decides which tokens stay).
    """
    check_int("num_frames", num_frames, minimum=0)
    n = check_int("tokens_per_frame", tokens_per_frame, minimum=1)
    F = policy.block_frames
    S_tok, R = policy.sink_frames * n, policy.recent_frames or 0
    state = ScheduleState()
    slots: List[int] = []
    pos: List[int] = []  # tape policies: the position each slot is attended at
    out: List[BlockTrace] = []
    for f0 in range(start_frame, start_frame + num_frames, F):
        if switches and f0 in switches:
            state = switch_state(policy, state, switches[f0])
        plan = plan_pass(policy, state, f0)
        new = [f0 + i for i in range(F) for _ in range(n)]
        before = ScheduleState() if state.block_start is None else state
        if plan.tape_at is not None:  # the block before the previous one gets the tape
            at = len(slots) - 2 * F * n
            slots[at:at + F * n] = [f for f in plan.tape for _ in range(n)]
        if plan.action == "roll":
            P_tok = policy.prefix_frames * n  # the sink (and MemRoPE's memories) stay
            del slots[P_tok:P_tok + plan.evict_frames * n]
            del pos[P_tok:P_tok + plan.evict_frames * n]
            if plan.fold is not None or policy.tether_frames:
                slots[S_tok:P_tok] = [MEMORY_FRAME] * (P_tok - S_tok)
        pos = pos + new
        aug = slots + new
        after_slots = aug
        if plan.action == "compress":
            after_slots = aug[:S_tok] + [UNKNOWN_FRAME] * (policy.topc_frames * n) + aug[len(aug) - R * n:]
        ss = plan.state.stream_start
        if plan.compress_after_attend:
            attended = _layout(policy, aug, plan.attend_frames, before.compressed, plan.attend_sink_start, ss, n)
        else:
            attended = _layout(policy, after_slots, plan.attend_frames, plan.attend_compressed,
                               plan.attend_sink_start, ss, n)
        after = _layout(policy, after_slots, plan.state.frames, plan.state.compressed, plan.state.sink_start,
                        ss, n)
        if policy.has_tape:
            attended = after = Layout(tuple(after_slots), tuple(pos), after.kinds)
        if policy.block_relative and plan.state.sink_start is not None:  # slot i at sink_start + i
            st, L = plan.state, len(after_slots)
            rel = [st.sink_start + s // n for s in range(L)]
            if st.cut:
                rel[L - F * n:] = after_slots[L - F * n:]
            attended = after = Layout(tuple(after_slots), tuple(rel), after.kinds)
        out.append(BlockTrace(f0, plan, attended, after))
        slots, state = after_slots, plan.state
    return out
