"""Host overhead per call at a tiny geometry, where the kernel itself is nearly free.

    python -m deepforcing_kernels.bench.overhead [--backend cpp] [--json]

At 1 token per frame, 2 heads, head_dim 64, fp32 and one thread, attention is a few hundred FLOPs, so what a call
costs is what the host does around it: validation, backend resolution, dispatch, the cache's bookkeeping. On a GPU
that host time is what a layer-pass waits on. Reported, interleaved in one process (medians of ``--repeats``
rounds of ``--calls`` calls each):

* ``layer.attend`` — one pass of a :class:`~deepforcing_kernels.StreamingKVCache` layer (an overwrite pass over a
  full 21-frame window, as passes 2..5 of a block);
* ``public op`` — :func:`~deepforcing_kernels.sink_attention` with full validation, on the same 21 keys;
* ``torch SDPA`` — ``scaled_dot_product_attention`` on the same tensors, the yardstick;
* ``kernel`` — the backend's trusted entry alone (what the cache calls);
* ``attend (compressing)`` — one ``layer.attend`` of a ``deep_forcing`` cache in a stream that keeps moving
  forward: 5 passes per block (Self-Forcing's), so every other block's first pass runs a Participative
  Compression (Top-C over the augmented cache) and every pass of the block before it records attention mass;
  the mean over all passes.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from .timing import median


def _per_call(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def run_overhead(*, backend: str = "auto", calls: int = 2000, repeats: int = 7, threads: int = 1) -> Dict[str, Any]:
    """Microseconds per call of each row above; ``attend_us``, ``attend_compressing_us``, ``op_us``, ``sdpa_us``,
    ``kernel_us``, ratios."""
    from .. import CachePolicy, RopeSpec, StreamingKVCache, sink_attention

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        H, D, n = 2, 64, 1
        rope = RopeSpec.wan(D)
        cache = StreamingKVCache(CachePolicy.sliding(), num_layers=1, batch_size=1, num_heads=H, head_dim=D,
                                 tokens_per_frame=n, rope=rope, dtype=torch.float32, backend=backend)
        layer = cache.layers[0]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 3 * n, H, D, generator=g) for _ in range(3))
        for i in range(8):
            layer.attend(q, k, v, start_frame=3 * i)
        f0 = 21
        kk, vv = layer.keys(), layer.values()
        qt, kt, vt = q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)
        run = cache.backend_impl.run
        kw = dict(rope=rope, sink_len=0, sink_shift=0, key_shift=None, softmax_scale=D ** -0.5, return_lse=False,
                  return_mass=False, mass_q_range=(0, q.shape[1]))
        dcache = StreamingKVCache(CachePolicy.deep_forcing(), num_layers=1, batch_size=1, num_heads=H, head_dim=D,
                                  tokens_per_frame=n, rope=rope, dtype=torch.float32, backend=backend)
        dlayer, passes = dcache.layers[0], 5  # Self-Forcing: 5 passes over each block
        pool = [tuple(torch.randn(1, 3 * n, H, D, generator=g) for _ in range(3)) for _ in range(4)]
        step = [0]

        def compressing() -> None:
            i = step[0]
            step[0] = i + 1
            qq, kk_, vv_ = pool[i % len(pool)]
            dlayer.attend(qq, kk_, vv_, start_frame=3 * (i // passes))  # varied keys: Top-C picks change

        fns = {
            "attend": lambda: layer.attend(q, k, v, start_frame=f0),
            "attend_compressing": compressing,
            "op": lambda: sink_attention(q, kk, vv, backend=backend),
            "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
            "kernel": lambda: run(q, kk, vv, **kw),
        }
        with torch.no_grad():
            for fn in fns.values():
                _per_call(fn, calls // 10 + 1)
            samples: Dict[str, list] = {name: [] for name in fns}
            names = list(fns)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    samples[name].append(_per_call(fns[name], calls))
        us = {name: 1e6 * median(xs) for name, xs in samples.items()}
        return {"backend": cache.backend, "threads": threads, "attend_us": us["attend"],
                "attend_compressing_us": us["attend_compressing"], "op_us": us["op"],
                "sdpa_us": us["sdpa"], "kernel_us": us["kernel"], "op_over_sdpa": us["op"] / us["sdpa"],
                "attend_over_kernel": us["attend"] / us["kernel"]}
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = run_overhead(backend=a.backend, calls=a.calls, repeats=a.repeats)
    except ValueError as e:  # a bad flag: one line, exit code 1
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"host overhead ({res['backend']} backend, 1 thread, 1 token/frame, 2 heads, D 64, fp32): "
              f"layer.attend {res['attend_us']:.1f} us, public op {res['op_us']:.1f} us "
              f"({res['op_over_sdpa']:.2f}x torch SDPA's {res['sdpa_us']:.1f} us), kernel entry {res['kernel_us']:.1f} us; "
              f"layer.attend in a compressing deep_forcing stream {res['attend_compressing_us']:.1f} us "
              f"(target <= 25 us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
