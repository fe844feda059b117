"""Prepared passes: a block's passes as single C++ calls (csrc/pass_ops.h), with the Python executor as their oracle.

At a streaming cache's per-pass sizes the host work around the kernel (input checks, the K/V write, the rotation
tables, the carried mass, the Top-C choice and compaction) costs more than the kernel. A block's passes 2..5 attend
to the layout its first pass made, so :func:`prepare` builds, once per block, a ``_C.PreparedPass`` holding the
storage views, the rotation tables and the mass settings; each later pass of the block is then one call
(:func:`run_prepared`) that checks, writes, attends and carries. :func:`compress_native` does a mass-scored
Participative Compression (score, Top-C, compaction, reuse counters) in one call.

Both give the Python path's bytes exactly (tests/cache/test_prepared_pass.py compares them on random and
adversarial inputs). They apply only where that path is plain: the C++ backend on CPU, eager, no per-pass extras
(Rolling Sink's tape, MemRoPE's memories, Recency Forcing's bias, TetherCache's admission, the commit rule), the
mass score with the identity ``reduce_over_heads`` for the compression; every other case, and any input that does
not fit (the Python path then names the problem), runs the Python path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..rotation import rotation_tables
from ..schedule import ScheduleState
from .storage import LayerStorage

__all__ = ["Prepared", "layer_pass_ops", "prepare", "run_prepared", "compress_native"]


@dataclass(frozen=True)
class Prepared:
    """The passes of one block over one layout: valid while the layer's state is ``state`` (the same object: an
    overwrite pass leaves it as it is, anything else replaces it), for passes at ``start_frame`` through
    ``backend``."""

    state: ScheduleState
    start_frame: int
    backend: Any
    cpp: Any  # _C.PreparedPass


def layer_pass_ops(ctx: Any, layer: Any) -> Optional[Any]:
    """The extension's pass helpers for ``layer`` (a :class:`~.executor.CacheLayer`), or None where its passes must
    run in Python: a backend without them, a device other than the CPU, or per-pass work the helpers do not do."""
    from .scoring import MassScorer

    if ctx.device.type != "cpu" or (layer.scorer is not None and not isinstance(layer.scorer, MassScorer)):
        return None
    if any(x is not None for x in (layer.bank, layer.memory, layer.recency, layer.admission, layer.shadow)):
        return None
    return ctx.backend_impl.pass_ops()


def prepare(ops: Any, storage: LayerStorage, args: Dict[str, Any], length: int, q: torch.Tensor,
            check_finite: bool, tail: int = 0, carry: Optional[torch.Tensor] = None) -> Any:
    """A ``_C.PreparedPass`` attending ``q``-shaped queries to slots ``[0, length)`` with the layout ``args`` (the
    backend arguments :meth:`~.executor.CacheLayer._attend` passes: ``rope``, ``sink_len``, ``sink_shift``,
    ``key_shift``, ``softmax_scale``), writing a pass's K/V at the last ``q.shape[1]`` of them; with ``tail`` it
    returns the mass of the pass's last ``tail`` query rows, and with ``carry`` keeps it there summed over heads."""
    rope, Lq = args["rope"], q.shape[1]
    cos, sin, rot_len = rotation_tables(rope, args["sink_len"], args["sink_shift"], args["key_shift"], q.shape[0],
                                        length, q.device, storage.kv_heads)
    return ops.PreparedPass(storage.k, storage.v, length - Lq, length, cos, sin, rot_len,
                            True if rope is None else rope.interleaved, args["softmax_scale"], list(q.shape),
                            check_finite, tail > 0, max(0, Lq - tail) if tail else 0, Lq, carry)


def run_prepared(prep: Optional[Prepared], state: ScheduleState, backend: Any, start_frame: Any, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """An overwrite pass as one call when ``prep`` still holds (same state, block start and backend, eager) and the
    inputs fit; else None, with nothing changed."""
    if prep is None or prep.state is not state or prep.backend is not backend or type(start_frame) is not int or \
            start_frame != prep.start_frame or torch.compiler.is_compiling():
        return None
    return prep.cpp.run(q, k, v)


def compress_native(ops: Optional[Any], storage: LayerStorage, policy: Any, n: int, mass: torch.Tensor, end: int,
                    scorer: Any) -> bool:
    """:func:`~.scoring.compress_step` of ``policy``'s mass score (``scorer``'s carried parts, in the order of its
    :attr:`~.scoring.MassScorer.names`, plus ``mass [B, Hkv, >= end]`` summed over heads, as
    :meth:`~.scoring.MassScorer.candidate_scores` adds them) over slots ``[0, end)`` of ``n``-token frames, as one
    call; False, with nothing changed, without ``ops`` (the layer's passes run in Python: :func:`layer_pass_ops`)
    or where the tensors do not qualify (the caller runs Python)."""
    if ops is None:
        return False
    ts = storage.per_slot()
    if torch.compiler.is_compiling() or not all(t.device.type == "cpu" and t.is_contiguous() for t in ts) or \
            not mass.is_contiguous():
        return False
    parts = [storage.extra[name] for name in scorer.names]
    ops.compress_pass(ts, storage.extra["reuse"], mass, parts, policy.sink_frames * n, policy.topc_frames * n,
                      policy.recent_frames * n, end, -1 if policy.topc_max_reuse is None else policy.topc_max_reuse)
    return True
