"""Where the time of a rollout goes: a cProfile of one policy's cache + attention rollout, grouped by the
pieces of the cache engine and the kernel, so that a missed target names its culprit.

The numbers are cumulative seconds under the profiler (which adds a little per Python call; the heavy work is
in C++ and is measured as is) and their share of the total time spent in ``CacheLayer.attend``.
"""
from __future__ import annotations

import cProfile
import pstats
from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

from .rollout import RolloutConfig, run_cache_rollout

#: (label, function, file) — ``function`` is the profiled function's name, matched exactly (a built-in's whole
#: ``<built-in method ...>`` / ``<method ...>`` text), ``file`` the end of its path ("" for built-ins). A test
#: profiles a rollout and checks every row matches, so a rename cannot silently blank the table.
PIECES: Tuple[Tuple[str, str, str], ...] = (
    ("CacheLayer.attend (total)", "attend", "cache/executor.py"),
    ("  schedule.plan_pass (the pass's plan)", "plan_pass", "schedule.py"),
    ("  prepared pass 2..5 (C++, one call)", "<built-in method deepforcing_kernels._C.run>", ""),
    ("  prepare (a block's C++ passes)", "prepare", "cache/prepared.py"),
    ("    C++ attend (a block's first pass)", "<built-in method deepforcing_kernels._C.attend>", ""),
    ("  _check_inputs (validation)", "_check_inputs", "cache/executor.py"),
    ("    all_finite (NaN / inf scan of q, k, v)", "_cpp_all_finite", "backends.py"),
    ("  rotation_tables (re-phasing cos / sin)", "rotation_tables", "rotation.py"),
    ("  fused op (backend dispatch)", "run", "backends.py"),
    ("    C++ kernel sink_attention_fwd", "<built-in method deepforcing_kernels._C.sink_attention_fwd>", ""),
    ("    reference backend", "sink_attention_reference", "reference/attention.py"),
    ("  scorer.observe (mass / query buffer)", "observe", "cache/scoring.py"),
    ("  scorer.candidate_scores (Top-C scores)", "candidate_scores", "cache/scoring.py"),
    ("    release_logit_score (logits scoring)", "release_logit_score", "cache/scoring.py"),
    ("      torch.bmm inside it (chunked GEMVs)", "<built-in method torch.bmm>", ""),
    ("  compress_native (C++ score, Top-C, move)", "compress_native", "cache/prepared.py"),
    ("    C++ compress_pass", "<built-in method deepforcing_kernels._C.compress_pass>", ""),
    ("  _compress (select + compact)", "_compress", "cache/executor.py"),
    ("    select_topc", "select_topc", "cache/storage.py"),
    ("    compact (index_select + moves)", "compact", "cache/storage.py"),
    ("  storage.move_left (window roll)", "move_left", "cache/storage.py"),
    ("  storage.write_new (a new block)", "write_new", "cache/storage.py"),
    ("    C++ write_block", "<built-in method deepforcing_kernels._C.write_block>", ""),
    ("  storage.write (new K/V)", "write", "cache/storage.py"),
    ("Tensor.copy_ (all K/V writes and moves)", "<method 'copy_' of 'torch._C.TensorBase' objects>", ""),
)


def _matches(key: Tuple[str, int, str], func: str, file: str) -> bool:
    fname, _line, name = key
    return name == func and fname.replace("\\", "/").endswith(file)


def profile_policies(policies: Sequence[str], cfg: RolloutConfig, *, num_frames: int = 36) -> Dict[str, Any]:
    """Profile a short rollout (``num_frames``, enough to pass the window and compress twice) of ``policies``,
    interleaved like the timed rollout, one profiler per policy enabled only during its own attend calls.

    Returns ``{policy: {"rows": [{"name", "calls", "cum_s", "share"}], "attend_s": float, "block_s_sum"}}``.
    """
    c = replace(cfg, num_frames=num_frames, policies=tuple(policies))
    run_cache_rollout(replace(c, num_frames=c.block_frames))  # imports and first-call set-up, unprofiled
    profs = {p: cProfile.Profile() for p in policies}
    res = run_cache_rollout(c, profilers=profs)
    out: Dict[str, Any] = {}
    for pol in policies:
        st = pstats.Stats(profs[pol]).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
        rows: List[Dict[str, Any]] = []
        total = None
        for label, name_part, file_part in PIECES:
            best = None
            for key, (_cc, nc, _tt, ct, _callers) in st.items():
                if _matches(key, name_part, file_part):
                    if best is None or ct > best[1]:
                        best = (nc, ct)
            if best is None:
                continue
            if total is None and label.startswith("CacheLayer.attend"):
                total = best[1]
            rows.append({"name": label, "calls": best[0], "cum_s": best[1]})
        total = total or sum(r["cum_s"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["cum_s"] / total
        out[pol] = {"rows": rows, "attend_s": total, "num_frames": num_frames,
                    "tokens_per_frame": cfg.tokens_per_frame, "block_s_sum": sum(res[pol]["series"]["block_s"])}
    return out
