"""`deepforcing demo`: call the fused op on every backend available here and print a table."""
from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens-per-frame", type=int, default=64, help="tokens per latent frame (default 64)")
    parser.add_argument("--seed", type=int, default=0)


def op_table(tokens_per_frame: int = 64, seed: int = 0) -> list:
    """Run one Deep-Forcing-shaped call (3-frame block over a 19-frame cache with a 10-frame re-phased sink) on
    each backend; return rows of (backend, dtype, milliseconds, max |out - reference|, max |mass - reference|)."""
    from ..attention import available_backends, sink_attention
    from ..rope import RopeSpec

    g = torch.Generator().manual_seed(seed)
    H, D, T = 12, 128, tokens_per_frame
    rope = RopeSpec.wan(D)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 3 * T, H, D, generator=g).to(dtype)
        k = torch.randn(1, 19 * T, H, D, generator=g).to(dtype)
        v = torch.randn(1, 19 * T, H, D, generator=g).to(dtype)
        kw = dict(rope=rope, sink_len=10 * T, sink_shift=11, return_mass=True)
        ref = sink_attention(q, k, v, backend="reference", **kw)
        for backend in available_backends("cpu"):
            if backend == "triton":  # the interpreter is a correctness tool, not a backend to time
                continue
            sink_attention(q, k, v, backend=backend, **kw)  # warm-up
            t0 = time.perf_counter()
            res = sink_attention(q, k, v, backend=backend, **kw)
            ms = 1e3 * (time.perf_counter() - t0)
            err = (res.out.float() - ref.out.float()).abs().max().item()
            merr = (res.mass - ref.mass).abs().max().item()
            rows.append((backend, str(dtype).replace("torch.", ""), ms, err, merr))
    return rows


def run(args: argparse.Namespace) -> int:
    print(f"sink_attention: q 3 frames x {args.tokens_per_frame} tokens, KV 19 frames (10-frame sink re-phased "
          f"by 11), 12 heads, D 128, return_mass=True")
    print(f"{'backend':<10} {'dtype':<9} {'ms':>9} {'max|dout|':>11} {'max|dmass|':>11}")
    for backend, dtype, ms, err, merr in op_table(args.tokens_per_frame, args.seed):
        print(f"{backend:<10} {dtype:<9} {ms:9.2f} {err:11.2e} {merr:11.2e}")
    return 0
