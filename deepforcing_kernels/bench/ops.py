"""Timing of the fused op against PyTorch baselines, in one process, with interleaved repeats.

Machines running these are often shared, so absolute times drift; every figure that matters here is a *ratio*
against a baseline timed in the same process, alternating with it (A B C A B C ...), and summarised by medians.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..attention import available_backends, sink_attention
from ..rope import RopeSpec
from .timing import interleaved

__all__ = ["bench_op_case", "op_case_fns", "make_case", "attention_flops"]


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int) -> float:
    """FLOPs of the two attention GEMMs (QK^T and PV): ``4 * B * H * Lq * Lk * D`` (softmax not counted)."""
    return 4.0 * batch * heads * lq * lk * head_dim


def make_case(*, tokens_per_frame: int = 128, q_frames: int = 3, kv_frames: int = 19, sink_frames: int = 10,
              heads: int = 12, kv_heads: Optional[int] = None, head_dim: int = 128, batch: int = 1,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random q, k, v of the Deep-Forcing streaming step: q is the live block (``q_frames`` frames), the cache
    holds ``kv_frames`` frames of which the first ``sink_frames`` are the sink. Layout ``[B, L, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    kvh = heads if kv_heads is None else kv_heads
    lq, lk = q_frames * tokens_per_frame, kv_frames * tokens_per_frame
    q = torch.randn(batch, lq, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, lk, kvh, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, lk, kvh, head_dim, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, sink_len=sink_frames * tokens_per_frame,
                # the release placement after a roll: the sink sits kv_frames + q_frames behind the live block
                sink_shift=kv_frames + q_frames - sink_frames, rope=RopeSpec.wan(head_dim))


def op_case_fns(*, tokens_per_frame: int = 128, q_frames: int = 3, kv_frames: int = 19, sink_frames: int = 10,
                heads: int = 12, kv_heads: Optional[int] = None, head_dim: int = 128, batch: int = 1,
                dtype: torch.dtype = torch.float32, rephase: bool = True, mass: bool = True,
                backends: Sequence[str] = ("cpp",)) -> Tuple[Dict[str, Callable[[], object]], dict]:
    """The callables that :func:`bench_op_case` times, for one shape (see there), and a description of the case.

    Returns ``(fns, meta)``: ``fns`` maps ``"<backend>"`` (each available one), ``"sdpa"`` and ``"gemm"`` to
    zero-argument callables; ``meta`` holds ``shape`` (a dict), ``gflop`` (GEMM FLOPs / 1e9) and ``skipped``
    (requested backends that are not available for CPU tensors here).
    """
    case = make_case(tokens_per_frame=tokens_per_frame, q_frames=q_frames, kv_frames=kv_frames,
                     sink_frames=sink_frames, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                     dtype=dtype)
    q, k, v = case["q"], case["k"], case["v"]
    lq, lk, kvh = q.shape[1], k.shape[1], k.shape[2]
    op_kwargs = dict(rope=case["rope"], sink_len=case["sink_len"] if rephase else 0,
                     sink_shift=case["sink_shift"] if rephase else 0, return_mass=mass)
    fns: Dict[str, Callable[[], object]] = {}
    skipped = []
    avail = available_backends("cpu")
    for name in backends:
        if name not in avail:
            skipped.append(name)
            continue
        fns[name] = (lambda name=name: sink_attention(q, k, v, backend=name, **op_kwargs))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    gqa = kvh != heads
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    # bare GEMMs at full head count (GQA: K/V repeated per query head beforehand)
    kx = kt.repeat_interleave(heads // kvh, dim=1) if gqa else kt
    vx = vt.repeat_interleave(heads // kvh, dim=1) if gqa else vt
    kxt = kx.transpose(-1, -2)
    p = torch.rand(batch, heads, lq, lk).to(dtype)

    def gemms():
        torch.matmul(qt, kxt)
        torch.matmul(p, vx)

    fns["gemm"] = gemms
    meta = {
        "shape": {"batch": batch, "lq": lq, "lk": lk, "heads": heads, "kv_heads": kvh, "head_dim": head_dim,
                  "sink_len": op_kwargs["sink_len"], "sink_shift": op_kwargs["sink_shift"], "mass": mass},
        "gflop": attention_flops(batch, heads, lq, lk, head_dim) / 1e9,
        "skipped": skipped,
    }
    return fns, meta


def bench_op_case(*, tokens_per_frame: int = 128, q_frames: int = 3, kv_frames: int = 19, sink_frames: int = 10,
                  heads: int = 12, kv_heads: Optional[int] = None, head_dim: int = 128, batch: int = 1,
                  dtype: torch.dtype = torch.float32, rephase: bool = True, mass: bool = True,
                  backends: Sequence[str] = ("cpp",), repeats: int = 7, warmup: int = 2,
                  threads: Optional[int] = None) -> dict:
    """Time ``sink_attention`` at one streaming shape against SDPA and against the bare GEMMs.

    Timed in one process, interleaved, ``repeats`` times each (medians reported):

    * ``<backend>``: :func:`deepforcing_kernels.sink_attention` with the sink re-phased (``rephase``) and the
      attention mass returned (``mass``), for each backend in ``backends`` that is available for CPU tensors;
    * ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the same q, k, v (layout ``[B, H, L, D]``,
      transposes made beforehand, GQA by ``enable_gqa``; no re-phasing, no mass);
    * ``gemm``: the two bare batched GEMMs of the same size in the same dtype, ``Q K^T`` then ``P V``
      (``torch.matmul``; its ``P`` is a constant tensor, so no softmax): what an unfused kernel could not beat.

    Args:
        tokens_per_frame, q_frames, kv_frames, sink_frames, heads, kv_heads, head_dim, batch: the shape
            (``Lq = q_frames * tokens_per_frame``, ``Lk = kv_frames * tokens_per_frame``; defaults: the
            Deep-Forcing step at 128 tokens per frame, 12 heads, D 128, a 10-frame sink in a 19-frame cache).
        dtype: float32 / bfloat16 / float16.
        rephase: re-phase the ``sink_frames`` sink (otherwise ``sink_shift = 0``).
        mass: ask the op for the attention mass.
        backends: op backends to time ("cpp", "reference", "triton"); unavailable ones are skipped and listed.
        repeats, warmup: timed rounds and untimed warm-up rounds.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); None keeps the current setting.

    Returns:
        A JSON-friendly dict: ``shape``, ``dtype``, ``threads``, ``gflop`` (GEMM FLOPs, 1e9), ``skipped``
        backends, and ``results[name] = {"ms": median ms, "ms_all": [...], "vs_sdpa": ratio of medians to SDPA,
        "vs_gemm": ratio to the GEMM pair, "gflops": GEMM FLOPs / median time}`` for every timed entry.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        fns, meta = op_case_fns(tokens_per_frame=tokens_per_frame, q_frames=q_frames, kv_frames=kv_frames,
                                sink_frames=sink_frames, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                batch=batch, dtype=dtype, rephase=rephase, mass=mass, backends=backends)
        times = interleaved(fns, repeats=repeats, warmup=warmup)
        gflop = meta["gflop"]
        med = {name: statistics.median(ts) for name, ts in times.items()}
        results = {}
        for name, ts in times.items():
            results[name] = {
                "ms": med[name] * 1e3,
                "ms_all": [t * 1e3 for t in ts],
                "vs_sdpa": med[name] / med["sdpa"],
                "vs_gemm": med[name] / med["gemm"],
                "gflops": gflop / med[name],
            }
        return {
            "shape": meta["shape"],
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "gflop": gflop,
            "skipped": meta["skipped"],
            "results": results,
        }
    finally:
        torch.set_num_threads(old_threads)


def _main() -> None:
    """``python -m deepforcing_kernels.bench.ops [repeats]``: the default case in fp32 and bf16, one table."""
    import sys

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print(f"{'dtype':9} {'entry':6} {'ms':>8} {'/SDPA':>7} {'/GEMM':>7} {'GFLOP/s':>8}")
    for dt in (torch.float32, torch.bfloat16):
        rep = bench_op_case(dtype=dt, repeats=repeats)
        for name, r in rep["results"].items():
            print(f"{rep['dtype']:9} {name:6} {r['ms']:8.2f} {r['vs_sdpa']:7.3f} {r['vs_gemm']:7.3f} "
                  f"{r['gflops']:8.1f}")
    print(f"shape {rep['shape']}, threads {rep['threads']}, {repeats} interleaved repeats, medians")


if __name__ == "__main__":
    _main()
