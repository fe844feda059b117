"""Recency Forcing's cost per cache pass: ``python -m deepforcing_kernels.bench.recency [repeats] [--threads N]``.

One layer in the steady state (the window full: a 3-frame sink re-phased behind the newest 18 frames), one
denoising pass of the current block timed three ways, interleaved in one process (medians):

* ``recency``: a ``recency_forcing`` layer's pass, the bias fused into the one attention call (``key_bias``);
* ``unbiased``: the same layer's pass over the same slots without the bias (its clean pass): the cost the bias adds
  is ``recency / unbiased``;
* ``deep_sink``: the same pass of ``deep_sink(21, 3, sink_gap=0)`` (the same window, its own cache's storage);
* ``groups``: the authors' way to that bias over the same layer's keys: one attention call per group of frames of
  equal bias (keys gathered), merged by log-sum-exp (:func:`~deepforcing_kernels.bench.ops.group_and_merge`; only
  the attention, not the pass's K/V write, so the unfused figure is a lower bound).

Each ratio is timed as its own interleaved pair (A B A B ...; with more candidates in one round-robin, a rotating
order still runs each one after the same neighbour, and the grouped calls' gathers would always precede the same
entry). The machine is usually shared: only the ratios measured here, in one process, mean anything.
"""
from __future__ import annotations

import statistics
from typing import Dict, Optional

import torch

from ..cache import StreamingKVCache
from ..policy import CachePolicy
from ..rope import RopeSpec
from .args import add_threads, apply_threads
from .ops import group_and_merge, recency_frame_bias
from .timing import interleaved

__all__ = ["bench_recency_pass"]


def bench_recency_pass(*, tokens_per_frame: int = 128, heads: int = 12, head_dim: int = 128,
                       dtype: torch.dtype = torch.float32, step: int = 1, backend: str = "cpp", repeats: int = 15,
                       warmup: int = 2, threads: Optional[int] = None, seed: int = 0) -> Dict[str, object]:
    """Time one denoising pass (step index ``step``) of a full ``recency_forcing`` layer against its unbiased pass,
    ``deep_sink``'s and group-and-merge, each ratio as its own interleaved pair (see the module docstring). Returns ``{"shape", "dtype", "threads", "ms": {name:
    median}, "ms_all": {name: [...]}, "ratios": {"recency/unbiased", "recency/deep_sink", "groups/recency"},
    "max_diff_groups": the
    largest difference between the fused pass's output and the grouped calls'}``."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        n, F = tokens_per_frame, 3
        rope = RopeSpec.wan(head_dim)
        pols = {"recency": CachePolicy.recency_forcing(), "deep_sink": CachePolicy.deep_sink(21, 3, sink_gap=0)}
        caches = {k: StreamingKVCache(p, num_layers=1, batch_size=1, num_heads=heads, head_dim=head_dim,
                                      tokens_per_frame=n, rope=rope, dtype=dtype, backend=backend,
                                      check_finite=False) for k, p in pols.items()}
        g = torch.Generator().manual_seed(seed)
        f0 = 24  # blocks 0..7 fill the window; block 8 (frames 24..26) is the current one, its first pass done
        for b in range(f0 // F + 1):
            q, k, v = (torch.randn(1, F * n, heads, head_dim, generator=g).to(dtype) for _ in range(3))
            for c in caches.values():
                c.layers[0].attend(q, k, v, start_frame=b * F, clean=b < f0 // F)
        layer, base = caches["recency"].layers[0], caches["deep_sink"].layers[0]
        fb = recency_frame_bias(21, 3, step=step)
        args = layer.attention_args()

        def recency(clean=False):
            layer.recency.passes = step  # the next pass is denoising step `step` of the current block
            return layer.attend(q, k, v, start_frame=f0, clean=clean)

        fns = {"recency": recency, "unbiased": lambda: recency(clean=True),
               "deep_sink": lambda: base.attend(q, k, v, start_frame=f0, clean=False),
               "groups": lambda: group_and_merge(q, layer.storage.k[:, :21 * n], layer.storage.v[:, :21 * n], fb, n,
                                                 rope=rope, sink_len=args["sink_len"],
                                                 sink_shift=args["sink_shift"], backend=backend)}
        pairs = {"recency/unbiased": ("recency", "unbiased"), "recency/deep_sink": ("recency", "deep_sink"),
                 "groups/recency": ("groups", "recency")}
        times: Dict[str, list] = {}
        ratios: Dict[str, float] = {}
        with torch.no_grad():
            for key, (a, b) in pairs.items():
                t = interleaved({a: fns[a], b: fns[b]}, repeats=repeats, warmup=warmup)
                ratios[key] = statistics.median(t[a]) / statistics.median(t[b])
                for name in (a, b):
                    times.setdefault(name, t[name])  # the first pair an entry is timed in
            # like is compared with like: the fused pass and the grouped calls give the same attention
            diff = (recency().float() - fns["groups"]().float()).abs().max().item()
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        return {"shape": {"lq": F * n, "lk": 21 * n, "heads": heads, "head_dim": head_dim, "step": step,
                          "backend": backend},
                "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "ms": med,
                "ms_all": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
                "ratios": ratios, "max_diff_groups": diff}
    finally:
        torch.set_num_threads(old)


def _main() -> None:
    import argparse

    from .timing import machine_info

    ap = argparse.ArgumentParser(prog="python -m deepforcing_kernels.bench.recency", description=__doc__.split("\n")[0])
    ap.add_argument("repeats", nargs="?", type=int, default=15)
    add_threads(ap)
    ap.add_argument("--tokens-per-frame", type=int, default=128)
    a = ap.parse_args()
    apply_threads(ap, a.threads)
    mi = machine_info()
    print(f"{mi['cpu_model']} ({', '.join(mi['cpu_isa'])}), {mi['cpu_count']} cores, torch {mi['torch']}")
    print(f"{'dtype':9} {'step':4} {'recency ms':>10} {'unbiased ms':>11} {'deep_sink ms':>12} {'groups ms':>9} "
          f"{'recency/unbiased':>16} {'recency/deep_sink':>17} {'groups/recency':>14}")
    for dt in (torch.float32, torch.bfloat16):
        for step in (0, 3):
            r = bench_recency_pass(dtype=dt, step=step, repeats=a.repeats, threads=a.threads,
                                   tokens_per_frame=a.tokens_per_frame)
            m, q = r["ms"], r["ratios"]
            print(f"{r['dtype']:9} {step:4} {m['recency']:10.2f} {m['unbiased']:11.2f} {m['deep_sink']:12.2f} "
                  f"{m['groups']:9.2f} {q['recency/unbiased']:16.3f} {q['recency/deep_sink']:17.3f} "
                  f"{q['groups/recency']:14.3f}")
    print(f"shape {r['shape']}, threads {r['threads']}, {a.repeats} interleaved repeats, medians")


if __name__ == "__main__":
    _main()
