"""Timing helpers shared by the benchmark sections: interleaved sampling, robust summaries, machine facts.

The machines this runs on are small and shared (2 cores, other test runs beside us), so single numbers lie.
Every comparison here is a *ratio measured in the same process*, with candidates and baselines interleaved
round-robin so that a burst of outside load hits all of them alike, summarised by medians.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ..runio.host import cpu_facts


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile ``p`` in [0, 100] of ``xs`` (nan for an empty list)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(xs: Sequence[float]) -> Dict[str, float]:
    """Median, p10, p90, min, mean and count of a list of seconds."""
    return {"median": median(xs), "p10": percentile(xs, 10), "p90": percentile(xs, 90),
            "min": min(xs) if xs else float("nan"), "mean": statistics.fmean(xs) if xs else float("nan"),
            "n": len(xs)}


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (CUDA work is synchronised on both sides)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                min_time_s: float = 0.0, max_repeats: Optional[int] = None) -> Dict[str, List[float]]:
    """Time every callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    The order inside a round rotates each round so that no candidate always runs right after the same
    neighbour (cache warmth, turbo boost). When ``min_time_s`` is given, rounds continue (up to
    ``max_repeats``) until the slowest candidate has accumulated that much time, so fast cases get more samples.

    Returns ``{name: [seconds, ...]}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: Dict[str, List[float]] = {n: [] for n in names}
    cap = max(repeats, max_repeats or repeats)
    r = 0
    while r < cap:
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            out[n].append(time_call(fns[n]))
        r += 1
        if r >= repeats and min(sum(v) for v in out.values()) >= min_time_s:
            break
    return out


def machine_info() -> Dict[str, object]:
    """What a reader needs to judge the numbers: CPU model, cores, torch threads and build, GPU if any."""
    model, flags = cpu_facts()
    model = model or platform.processor()
    # the matrix / vector units the kernels' GEMM paths care about, most capable first
    isa = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                   ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    info: Dict[str, object] = {
        "cpu_model": model or "unknown",
        "cpu_isa": isa,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from .. import _ext

        c = _ext.load()
        info["cpp_extension"] = None if c is None else {
            "version": c.version(), "openmp": bool(c.has_openmp()),
            # the GEMM path the C++ kernel chose for this CPU at load (probed once on a tiny product)
            "gemm": {"bfloat16": "brgemm (oneDNN micro-kernel)" if c.sink_attention_bf16_gemm_active()
                     else "converted to float32",
                     "float32": "brgemm (oneDNN micro-kernel)" if c.sink_attention_f32_microkernel_active()
                     else "BLAS sgemm (oneDNN micro-kernel below 128 query rows)"}}
    except Exception:  # noqa: BLE001 - informational only
        info["cpp_extension"] = None
    return info
