"""The cross-attention cache's gain per pass: a model pass with the text prepared once vs projected every pass.

    python -m deepforcing_kernels.bench.crossattn [--dim 1536 --heads 12 --layers 2 --tokens-per-frame 64]

Self-Forcing computes the text's cross-attention keys and values once per prompt; without that cache every pass
of every block re-projects the 512 text rows in every layer (``2 * 512 * dim * dim * 2`` FLOPs a layer, plus the
RMSNorm). Both sides run the same model, in the same process, interleaved; the figure is the ratio of medians.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

import torch

from .args import add_geometry, add_threads, apply_threads
from .timing import interleaved, median


def run_crossattn(*, dim: int = 1536, heads: int = 12, layers: int = 2, tokens_per_frame: int = 64,
                  text_len: int = 512, repeats: int = 9, seed: int = 0) -> Dict[str, Any]:
    """Seconds per model pass (one 3-frame block) with raw text and with :meth:`prepare_text`'s context."""
    from ..models import CausalWanModel, WanConfig, build_cache
    from ..presets import make_policy

    side = int(round((tokens_per_frame * 4) ** 0.5))
    cfg = WanConfig(dim=dim, ffn_dim=4 * dim, num_heads=heads, num_layers=layers, text_dim=4096, in_dim=16,
                    out_dim=16, text_len=text_len, latent_size=(side, side))
    g = torch.Generator().manual_seed(seed)
    model = CausalWanModel(cfg).eval()
    text = torch.randn(1, text_len, 4096, generator=g)
    x = torch.randn(1, 3, 16, side, side, generator=g)
    t = torch.full((1, 3), 500.0)
    cache = build_cache(model, make_policy("sliding"), latent_size=(side, side), batch_size=1,
                        dtype=torch.float32, device=torch.device("cpu"))
    ctx = model.prepare_text(text)

    @torch.no_grad()
    def raw():
        model(x, t, text, cache=cache, start_frame=0)

    @torch.no_grad()
    def prepared():
        model(x, t, ctx, cache=cache, start_frame=0)

    raw()  # first pass appends the block; later passes overwrite it (passes 2..5 of a block)
    s = interleaved({"raw": raw, "prepared": prepared}, repeats=repeats, warmup=1)
    r, p = median(s["raw"]), median(s["prepared"])
    return {"geometry": {"dim": dim, "heads": heads, "layers": layers, "tokens_per_frame": cfg.tokens_per_frame(),
                         "text_len": text_len}, "raw_s": r, "prepared_s": p, "gain": 1 - p / r,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_geometry(ap)
    add_threads(ap)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    apply_threads(ap, a.threads)
    try:
        res = run_crossattn(dim=a.dim, heads=a.heads, layers=a.layers, tokens_per_frame=a.tokens_per_frame,
                            repeats=a.repeats)
    except ValueError as e:  # a bad flag: one line, exit code 1
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    if a.json:
        print(json.dumps(res))
    else:
        g = res["geometry"]
        print(f"cross-attention cache, dim {g['dim']}, {g['layers']} layers, {g['tokens_per_frame']} tokens/frame, "
              f"text {g['text_len']}: raw text {res['raw_s'] * 1e3:.1f} ms/pass, prepared once "
              f"{res['prepared_s'] * 1e3:.1f} ms/pass: {100 * res['gain']:.1f} % less per pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
