"""``torch.compile`` (inductor) of the model against eager: per-block time of a short rollout, same process.

    python benchmarks/bench_compile.py [--blocks 5] [--device cpu|cuda] [--sizes tiny,mid]

Two sizes: ``WanConfig.tiny()`` (2 layers, dim 96, 16 tokens per frame) and a mid-size model (4 layers, dim 384,
6 heads of 64, 64 tokens per frame). Three ways to run it, interleaved block by block (each with its own
``deep_forcing(score="logits")`` cache, same inputs), so outside load lands on all of them alike:

* ``eager``;
* ``compiled``: ``torch.compile(model)``, the cache's Python traced too (its schedule state changes every block,
  so dynamo recompiles on new layouts);
* ``compiled_cache_eager``: ``torch.compile(model)`` with every ``layer.attend`` behind
  ``torch.compiler.disable`` (the projections, norms, RoPE, FFN compiled; the cache and the op run eager).

Each block is 5 passes (4 denoising steps + the clean pass), as the driver runs them. Reported: the first block
(compilation) and the median of the others; ratios to eager are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepforcing_kernels.cache import CachePolicy, StreamingKVCache
from deepforcing_kernels.models import CausalWanModel, WanConfig

SIZES = {
    "tiny": lambda: WanConfig.tiny(),
    "mid": lambda: WanConfig.tiny(dim=384, ffn_dim=1024, num_heads=6, num_layers=4, latent_size=(16, 16)),
}
MODES = ("eager", "compiled", "compiled_cache_eager")


def _cache(cfg, device, eager_attend):
    cache = StreamingKVCache(CachePolicy.deep_forcing(score="logits"), num_layers=cfg.num_layers, batch_size=1,
                             num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                             tokens_per_frame=cfg.tokens_per_frame(cfg.latent_size), rope=cfg.rope(),
                             dtype=torch.float32, device=device, check_finite=False)
    if eager_attend:
        for layer in cache.layers:
            layer.attend = torch.compiler.disable(layer.attend)
    return cache


def run(size: str, blocks: int, device: str):
    """``{mode: [block seconds]}`` for one model size."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cfg = SIZES[size]()
    model = CausalWanModel(cfg).to(device).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    model.to(device)
    runners = {"eager": (model, _cache(cfg, device, False)),
               "compiled": (torch.compile(model), _cache(cfg, device, False)),
               "compiled_cache_eager": (torch.compile(model), _cache(cfg, device, True))}
    g = torch.Generator(device=device).manual_seed(0)
    text = torch.randn(1, cfg.text_len or 16, cfg.text_dim, device=device, generator=g)
    times = {m: [] for m in MODES}
    with torch.no_grad():
        for b in range(blocks):
            x0 = torch.randn(1, 3, cfg.in_dim, *cfg.latent_size, device=device, generator=g)
            for mode in MODES:
                fn, cache = runners[mode]
                x = x0
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for t in (1000.0, 750.0, 500.0, 250.0, 0.0):
                    x = fn(x, torch.full((1, 3), t, device=device), text, cache=cache, start_frame=3 * b)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="tiny,mid")
    args = ap.parse_args()
    print(f"{'size':<5} {'mode':<21} {'first block s':>13} {'median block s':>14} {'/ eager':>8}")
    for size in args.sizes.split(","):
        times = run(size, args.blocks, args.device)
        base = statistics.median(times["eager"][1:])
        for mode in MODES:
            med = statistics.median(times[mode][1:])
            print(f"{size:<5} {mode:<21} {times[mode][0]:>13.3f} {med:>14.4f} {med / base:>8.2f}")


if __name__ == "__main__":
    main()
