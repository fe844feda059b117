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
from .report import format_machine
from .timing import interleaved, machine_info

__all__ = ["bench_op_case", "op_case_fns", "make_case", "attention_flops", "recency_frame_bias", "group_and_merge"]


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


def recency_frame_bias(kv_frames: int, sink_frames: int, *, step: int = 2, chunk: int = 3) -> torch.Tensor:
    """float32 ``[kv_frames]``: a Recency-Forcing-shaped per-frame bias (``-4 dt ** (0.1 * 2 ** step)``,
    ``dt = min(1, max(0, d - 1) / 4)``, ``d`` the distance in ``chunk``-frame chunks from the newest frame; 0 on the
    sink and the two newest chunks), the bias the cost figures are measured with."""
    d = (kv_frames - 1 - torch.arange(kv_frames)) // chunk
    dt = ((d - 1).clamp(min=0).double() / 4).clamp(max=1.0)
    b = torch.where(d > 1, -4.0 * dt ** (0.1 * 2 ** step), torch.zeros_like(dt))
    b[:sink_frames] = 0.0
    return b.float()


def group_and_merge(q, k, v, frame_bias: torch.Tensor, tokens_per_frame: int, *, rope, sink_len: int,
                    sink_shift: int, backend: str = "cpp") -> torch.Tensor:
    """The unfused way to a per-frame bias: one unbiased call per group of frames sharing a bias value (keys
    gathered by ``index_select``), the outputs merged by log-sum-exp with the group's bias added to its lse.
    The sink stays first in its group, so the group holding frame 0 re-phases its ``sink_len`` keys."""
    outs, lses = [], []
    tokens = torch.arange(tokens_per_frame)
    for value in torch.unique(frame_bias).tolist():
        frames = (frame_bias == value).nonzero().flatten()
        idx = (frames[:, None] * tokens_per_frame + tokens).flatten()
        kw = dict(rope=rope, sink_len=sink_len, sink_shift=sink_shift) if int(frames[0]) == 0 else dict(rope=rope)
        r = sink_attention(q, k.index_select(1, idx), v.index_select(1, idx), return_lse=True, backend=backend,
                           **kw)
        outs.append(r.out.float())
        lses.append(r.lse + value)
    lse = torch.stack(lses)  # [G, B, H, Lq]
    w = torch.exp(lse - torch.logsumexp(lse, dim=0)).permute(0, 1, 3, 2)[..., None]  # [G, B, Lq, H, 1]
    return (w * torch.stack(outs)).sum(dim=0).to(q.dtype)


def op_case_fns(*, tokens_per_frame: int = 128, q_frames: int = 3, kv_frames: int = 19, sink_frames: int = 10,
                heads: int = 12, kv_heads: Optional[int] = None, head_dim: int = 128, batch: int = 1,
                dtype: torch.dtype = torch.float32, rephase: bool = True, mass: bool = True,
                backends: Sequence[str] = ("cpp",),
                bias: bool = False) -> Tuple[Dict[str, Callable[[], object]], dict]:
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
        if bias:
            fb = recency_frame_bias(kv_frames, sink_frames if rephase else 0)
            kb = fb.repeat_interleave(tokens_per_frame)  # per key: Lk floats, built once
            fns[f"{name}+bias"] = (lambda name=name, kb=kb: sink_attention(q, k, v, backend=name, key_bias=kb,
                                                                         **op_kwargs))
            if not mass:  # the group-and-merge baseline has no mass to give
                fns[f"{name}:groups"] = (lambda name=name, fb=fb: group_and_merge(
                    q, k, v, fb, tokens_per_frame, rope=case["rope"], sink_len=op_kwargs["sink_len"],
                    sink_shift=op_kwargs["sink_shift"], backend=name))
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
                  threads: Optional[int] = None, bias: bool = False) -> dict:
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
        bias: also time ``<backend>+bias``, the same call with a Recency-Forcing-shaped per-frame ``key_bias``
            (:func:`recency_frame_bias`), and, without ``mass``, ``<backend>:groups``, that bias computed the
            unfused way (:func:`group_and_merge`: one call per bias group, merged by log-sum-exp).
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
                                batch=batch, dtype=dtype, rephase=rephase, mass=mass, backends=backends,
                                bias=bias)
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
    """``python -m deepforcing_kernels.bench.ops [repeats] [--bias]``: the default case in fp32 and bf16, one
    table. ``--bias`` adds the biased call (with the mass, as the cache runs it, and without) and the
    group-and-merge baseline, with the ratios of each to its unbiased call."""
    import sys

    args = [a for a in sys.argv[1:] if a != "--bias"]
    bias = "--bias" in sys.argv[1:]
    repeats = int(args[0]) if args else 15
    print(f"{'dtype':9} {'mass':5} {'entry':11} {'ms':>8} {'/SDPA':>7} {'/GEMM':>7} {'/cpp':>6} {'GFLOP/s':>8}")
    for dt in (torch.float32, torch.bfloat16):
        for mass in ((True, False) if bias else (True,)):
            # with --bias: Recency Forcing's reading (a 3-frame sink and the newest 18 frames, 5 bias groups)
            shape = dict(kv_frames=21, sink_frames=3) if bias else {}
            rep = bench_op_case(dtype=dt, repeats=repeats, bias=bias, mass=mass, **shape)
            base = rep["results"].get("cpp", {}).get("ms")
            for name, r in rep["results"].items():
                rel = f"{r['ms'] / base:6.3f}" if base else "     -"
                print(f"{rep['dtype']:9} {str(mass):5} {name:11} {r['ms']:8.2f} {r['vs_sdpa']:7.3f} "
                      f"{r['vs_gemm']:7.3f} {rel} {r['gflops']:8.1f}")
    print(f"shape {rep['shape']}, threads {rep['threads']}, {repeats} interleaved repeats, medians")
    print(format_machine(machine_info()))


if __name__ == "__main__":
    _main()
