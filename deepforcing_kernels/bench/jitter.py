"""The cost of LoL's head jitter (``make_policy(..., head_jitter=0.8)``): a model pass and the op, with and without.

    python -m deepforcing_kernels.bench.jitter [--dim 1536 --heads 12 --layers 2 --tokens-per-frame 64 --threads 1]

With jitter every head rotates its queries and keys at its own temporal frequencies, and the kernel re-phases the
sink from per-head tables (``[Hkv, T]`` rows instead of one ``[T]`` row). The model side is a pass of the Wan DiT
over a Deep Sink cache that has rolled (the sink re-phased on every pass), the op side a Deep-Sink-shaped
``sink_attention`` call on the resolved backend; both sides run in the same process, interleaved, and each figure
is a ratio of medians.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

import torch

from .args import add_geometry, add_threads, apply_threads
from .timing import interleaved, median


def run_jitter(*, dim: int = 1536, heads: int = 12, layers: int = 2, tokens_per_frame: int = 64,
               strength: float = 0.8, repeats: int = 9, seed: int = 0, backend: str = "auto") -> Dict[str, Any]:
    """Seconds per model pass and per op call with ``head_jitter=strength`` and without (fp32, CPU)."""
    from .. import sink_attention
    from ..models import CausalWanModel, WanConfig, build_cache
    from ..presets import make_policy

    side = int(round((tokens_per_frame * 4) ** 0.5))
    cfg = WanConfig(dim=dim, ffn_dim=4 * dim, num_heads=heads, num_layers=layers, text_dim=64, in_dim=16,
                    out_dim=16, text_len=16, latent_size=(side, side))
    g = torch.Generator().manual_seed(seed)
    model = CausalWanModel(cfg).eval()
    ctx = model.prepare_text(torch.randn(1, 16, 64, generator=g))
    t = torch.full((1, 3), 500.0)
    caches = {}
    f0 = 24  # blocks at 0 .. 21 fill the 21-frame window; the block at 24 rolls it, and its sink is re-phased
    for name, j in (("off", 0.0), ("on", strength)):
        cache = build_cache(model, make_policy("deep_sink", head_jitter=j), latent_size=(side, side), batch_size=1,
                            dtype=torch.float32, device=torch.device("cpu"), backend=backend)
        with torch.no_grad():
            for f in range(0, f0 + 3, 3):
                model(torch.randn(1, 3, 16, side, side, generator=g), t, ctx, cache=cache, start_frame=f)
        caches[name] = cache
    x = torch.randn(1, 3, 16, side, side, generator=g)

    def model_pass(name):
        @torch.no_grad()
        def run():  # a later pass of the block at f0: overwrites its slots, attends sink + window
            model(x, t, ctx, cache=caches[name], start_frame=f0)
        return run

    layer = {n: c.layers[0] for n, c in caches.items()}
    args = {n: layer[n].attention_args() for n in layer}
    qd = torch.randn(1, 3 * cfg.tokens_per_frame((side, side)), heads, cfg.head_dim, generator=g)

    def op_call(name):
        def run():
            sink_attention(qd, layer[name].keys(), layer[name].values(), rope=caches[name].rope,
                           backend=caches[name].backend, **args[name])
        return run

    s = interleaved({"model_off": model_pass("off"), "model_on": model_pass("on"), "op_off": op_call("off"),
                     "op_on": op_call("on")}, repeats=repeats, warmup=1)
    m = {k: median(v) for k, v in s.items()}
    return {"geometry": {"dim": dim, "heads": heads, "layers": layers, "tokens_per_frame": cfg.tokens_per_frame(
        (side, side)), "cache_frames": layer["on"].frames().shape[1] // cfg.tokens_per_frame((side, side)),
        "sink_shift": args["on"].get("sink_shift")}, "strength": strength, "backend": caches["on"].backend,
        "seconds": m, "model_ratio": m["model_on"] / m["model_off"], "op_ratio": m["op_on"] / m["op_off"],
        "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_geometry(ap)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--backend", default="auto")
    add_threads(ap)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    apply_threads(ap, a.threads)
    try:
        res = run_jitter(dim=a.dim, heads=a.heads, layers=a.layers, tokens_per_frame=a.tokens_per_frame,
                         strength=a.strength, repeats=a.repeats, backend=a.backend)
    except ValueError as e:  # a bad flag: one line, exit code 1
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    if a.json:
        print(json.dumps(res))
    else:
        g, s = res["geometry"], res["seconds"]
        print(f"head jitter {res['strength']}, dim {g['dim']}, {g['heads']} heads, {g['layers']} layers, "
              f"{g['tokens_per_frame']} tokens/frame, {g['cache_frames']} cached frames (sink shift "
              f"{g['sink_shift']}), backend {res['backend']}, {res['threads']} thread(s): model pass "
              f"{s['model_off'] * 1e3:.1f} -> {s['model_on'] * 1e3:.1f} ms (x {res['model_ratio']:.3f}), op "
              f"{s['op_off'] * 1e3:.2f} -> {s['op_on'] * 1e3:.2f} ms (x {res['op_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
