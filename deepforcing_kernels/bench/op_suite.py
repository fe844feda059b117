"""The "ops" section of ``deepforcing bench``: the fused op per backend against torch SDPA and the bare GEMMs.

One case group is (dtype, KV frames, tokens per frame): a 3-frame query block over a KV cache of 16..24 frames,
12 heads, head_dim 128 (the real head geometry, fewer tokens per frame than the 1560 of production). Inside a
group every candidate is timed interleaved with the others: ``sink_attention`` for each backend with re-phasing
on/off and mass on/off, ``torch.nn.functional.scaled_dot_product_attention`` (the baseline of every ratio) and the
two bare GEMMs ``Q K^T`` and ``P V`` in the input dtype (the floor any attention kernel sits on).

If the C++ engineer's :mod:`deepforcing_kernels.bench.ops` provides a per-case timing function, its figures are
the ones reported for the kernels (see :func:`_ops_module`); this module still owns the case grid and the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..attention import available_backends, sink_attention
from ..rope import RopeSpec
from . import ops
from .ops import attention_flops
from .timing import interleaved, median

#: The head geometry of Wan2.1-1.3B: every op case uses it.
HEADS, HEAD_DIM, BLOCK_FRAMES = 12, 128, 3
#: Deep-Forcing-shaped re-phasing: a 10-frame sink moved by 11 positions (docs/spec.md section 2).
SINK_FRAMES, SINK_SHIFT = 10, 11


@dataclass(frozen=True)
class OpGrid:
    """Which cases to run. ``kv_frames`` are total KV lengths in frames (the block included)."""

    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)
    kv_frames: Sequence[int] = (16, 19, 21, 24)
    tokens_per_frame: Sequence[int] = (64, 128)
    repeats: int = 5
    backends: Optional[Sequence[str]] = None  # None: every backend that can run here (triton only on CUDA)
    device: str = "cpu"

    @classmethod
    def quick(cls) -> "OpGrid":
        return cls(kv_frames=(16, 24), tokens_per_frame=(64,), repeats=3)

    @classmethod
    def tiny(cls) -> "OpGrid":
        """For tests: seconds, not minutes."""
        return cls(dtypes=(torch.float32,), kv_frames=(4,), tokens_per_frame=(8,), repeats=1)


def op_backends(device: str = "cpu") -> List[str]:
    """Backends to time on ``device``: the Triton interpreter is a correctness tool, never timed on CPU."""
    names = list(available_backends(device))
    if torch.device(device).type != "cuda":
        names = [b for b in names if b != "triton"]
    return names


def _group_candidates(dtype: torch.dtype, kv_frames: int, tpf: int, backends: Sequence[str], device: str,
                      seed: int) -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(seed)
    lq, lk = BLOCK_FRAMES * tpf, kv_frames * tpf
    q = torch.randn(1, lq, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, lk, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(1, lk, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    # SDPA and the GEMMs get their preferred [B, H, L, D] layout made up front: the baseline is the best torch
    # can do, not torch plus our transposes.
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    p = torch.softmax(torch.randn(1, HEADS, lq, lk, generator=g), dim=-1).to(device=device, dtype=dtype)
    rope = RopeSpec.wan(HEAD_DIM)
    sink_len = min(SINK_FRAMES, kv_frames - BLOCK_FRAMES) * tpf
    fns: Dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        # the two GEMMs alone (S = Q K^T, O = P V) with a ready-made P: the floor under any attention kernel
        "gemms": lambda: (torch.matmul(qt, kt.transpose(-1, -2)), torch.matmul(p, vt)),
    }
    for b in backends:
        for rephase in (False, True):
            for mass in (False, True):
                kw = dict(rope=rope, backend=b, return_mass=mass)
                if rephase:
                    kw.update(sink_len=sink_len, sink_shift=SINK_SHIFT)
                fns[f"{b}|{int(rephase)}|{int(mass)}"] = (lambda kw=kw: sink_attention(q, k, v, **kw))
    return fns


def _rows_from_ops(grid: OpGrid, backends: Sequence[str], log) -> List[dict]:
    """The CPU grid through ``bench.ops.bench_op_case``: one call per (dtype, T, KV, rephase, mass), each timing
    the backends, SDPA and the GEMM pair interleaved; baselines are listed once per group (from its first call)."""
    rows: List[dict] = []
    for dtype in grid.dtypes:
        for tpf in grid.tokens_per_frame:
            for kvf in grid.kv_frames:
                first = True
                for rephase in (False, True):
                    for mass in (False, True):
                        rep = ops.bench_op_case(tokens_per_frame=tpf, q_frames=BLOCK_FRAMES, kv_frames=kvf,
                                                sink_frames=min(SINK_FRAMES, kvf - BLOCK_FRAMES), heads=HEADS,
                                                head_dim=HEAD_DIM, dtype=dtype, rephase=rephase, mass=mass,
                                                backends=tuple(backends), repeats=grid.repeats, warmup=1)
                        sh = rep["shape"]
                        for name, r in rep["results"].items():
                            base = name in ("sdpa", "gemm")
                            if base and not first:
                                continue
                            rows.append({
                                "dtype": rep["dtype"], "kv_frames": kvf, "tokens_per_frame": tpf, "lq": sh["lq"],
                                "lk": sh["lk"], "impl": "gemms" if name == "gemm" else name,
                                "rephase": None if base else rephase, "mass": None if base else mass,
                                "time_s": r["ms"] / 1e3, "ratio_to_sdpa": r["vs_sdpa"], "gflops": r["gflops"],
                                "samples": len(r.get("ms_all", [])),
                            })
                        first = False
                if log:
                    log(f"  ops {str(dtype).replace('torch.', '')} T={tpf} KV={kvf} frames done")
    # baselines first inside each group, as in the table
    return rows


def run_ops(grid: OpGrid = OpGrid(), *, seed: int = 0, log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Time every case of ``grid``; return one row per (case group, candidate).

    Row keys: ``dtype, kv_frames, tokens_per_frame, lq, lk, impl`` (``sdpa``, ``gemms`` or a backend name),
    ``rephase, mass`` (None for the baselines), ``time_s`` (median), ``ratio_to_sdpa`` (time / SDPA's median,
    interleaved in the same call), ``gflops`` (attention FLOPs / time).

    On CPU the timing is :func:`deepforcing_kernels.bench.ops.bench_op_case`; on CUDA (Triton rows) the
    interleaved loop below. Both time with :func:`deepforcing_kernels.bench.timing.interleaved`.
    """
    backends = list(grid.backends) if grid.backends is not None else op_backends(grid.device)
    if torch.device(grid.device).type == "cpu":
        return _rows_from_ops(grid, backends, log)
    rows: List[dict] = []
    for dtype in grid.dtypes:
        for tpf in grid.tokens_per_frame:
            for kvf in grid.kv_frames:
                fns = _group_candidates(dtype, kvf, tpf, backends, grid.device, seed)
                samples = interleaved(fns, repeats=grid.repeats, warmup=1)
                lq, lk = BLOCK_FRAMES * tpf, kvf * tpf
                flops = attention_flops(1, HEADS, lq, lk, HEAD_DIM)
                sdpa = median(samples["sdpa"])
                for name, xs in samples.items():
                    impl, rephase, mass = (name.split("|") + [None, None])[:3]
                    t = median(xs)
                    rows.append({
                        "dtype": str(dtype).replace("torch.", ""), "kv_frames": kvf, "tokens_per_frame": tpf,
                        "lq": lq, "lk": lk, "impl": impl,
                        "rephase": None if rephase is None else bool(int(rephase)),
                        "mass": None if mass is None else bool(int(mass)),
                        "time_s": t, "ratio_to_sdpa": t / sdpa, "gflops": flops / t / 1e9, "samples": len(xs),
                    })
                if log:
                    log(f"  ops {rows[-1]['dtype']} T={tpf} KV={kvf} frames: sdpa {sdpa * 1e3:.2f} ms")
    return rows
