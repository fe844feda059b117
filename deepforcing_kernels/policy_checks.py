"""The per-kind checks of :class:`~deepforcing_kernels.policy.CachePolicy` that need more than a field or two
(MemRoPE's memories, TetherCache's regions and rates, Recency Forcing's bias constants), called by its
``__post_init__`` on the policy being built: each raises ValueError naming the field, and stores a normalised value
back (a tuple for a list read from JSON, floats for ints) the way the policy stores its own checked fields."""
from __future__ import annotations

from typing import Any

__all__ = ["check_memory", "check_tether", "check_recency"]


def check_memory(policy: Any) -> None:
    """``memrope``: a sink of >= 0 frames, >= 1 rates in (0, 1], a window holding sink + memories + a block,
    its sink re-phased contiguously (``sink_gap=0``)."""
    S, F = policy._store_checked_int("sink_frames", 0), policy.block_frames
    a = policy.memory_alphas
    if isinstance(a, list):
        a = tuple(a)  # a policy dict read back from JSON
    if not isinstance(a, tuple) or not a or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in a):
        raise ValueError(f"memory_alphas must be a non-empty tuple of rates in (0, 1], got {a!r}")
    object.__setattr__(policy, "memory_alphas", tuple(float(x) for x in a))
    if S + len(a) + F > policy.window_frames:
        raise ValueError(f"sink_frames + memory frames + block_frames ({S} + {len(a)} + {F}) must be <= "
                         f"window_frames ({policy.window_frames})")
    if not policy.rephase_sink or policy.sink_gap != 0:
        raise ValueError("memrope attends its sink and memories contiguously (rephase_sink=True, sink_gap=0)")


def check_tether(policy: Any) -> None:
    """``tethercache``: sink >= 0, recent >= one block, memory = window - sink - recent >= 0, alpha >= 0,
    temperature > 0, tau in [0, 1], contiguous re-phasing (``sink_gap=0``); no Deep Forcing fields."""
    S, F = policy._store_checked_int("sink_frames", 0), policy.block_frames
    R = policy._store_checked_int("recent_frames", 1)
    if R < F:
        raise ValueError(f"recent_frames ({R}) must be >= block_frames ({F}): the new block lands in recent")
    if S + R > policy.window_frames:
        raise ValueError(f"sink_frames + recent_frames ({S} + {R}) must be <= window_frames "
                         f"({policy.window_frames}): the memory holds the rest")
    for name, ok, what in (("grab_alpha", lambda x: x >= 0, ">= 0"), ("grab_temperature", lambda x: x > 0, "> 0"),
                           ("tame_tau", lambda x: 0 <= x <= 1, "in [0, 1]")):
        x = getattr(policy, name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not ok(x) or x != x:
            raise ValueError(f"{name} must be a number {what}, got {x!r}")
        object.__setattr__(policy, name, float(x))
    if not policy.rephase_sink or policy.sink_gap != 0:
        raise ValueError("tethercache attends every slot at contiguous positions (rephase_sink=True, sink_gap=0)")
    policy._only(budget_frames=None, score=None, topc_max_reuse=None, unify_topc_rope=False, tape_frames=None,
               frame_tokens=None)


def check_recency(policy: Any) -> None:
    """``recency_forcing``: the sink re-phased right behind the oldest frame read (``sink_gap=0``, the authors'
    placement), ``beta >= 0`` and ``gamma0 > 0`` finite, ``recent_chunks >= 0``, ``history_chunks >= 1``."""
    if not policy.rephase_sink or policy.sink_gap != 0:
        raise ValueError("recency_forcing re-phases its sink right behind the oldest frame read "
                         "(rephase_sink=True, sink_gap=0)")
    for name, ok, what in (("recency_beta", lambda x: x >= 0, ">= 0"), ("recency_gamma0", lambda x: x > 0, "> 0")):
        x = getattr(policy, name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or not ok(x) or x == float("inf"):
            raise ValueError(f"{name} must be a finite number {what}, got {x!r}")
        object.__setattr__(policy, name, float(x))
    policy._store_checked_int("recency_recent_chunks", 0)
    policy._store_checked_int("recency_history_chunks", 1)
