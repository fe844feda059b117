"""`deepforcing demo`: the main job. A tiny Wan causal DiT generates a long stream with Deep Forcing on CPU.

1. A random-init tiny model rolls out 240 latent frames (80 blocks of 3, 5 passes each) with the deep-forcing
   cache; prints frames/s and the cache size block by block.
2. The same rollout under every policy, one line each (frames/s, cache frames), to compare.
3. The cache schedule of deep-forcing drawn to ``out/trace.png`` (see ``deepforcing trace``).

``--ops`` adds the older tour: the fused op on every backend here against the reference.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ._common import check_frames, check_positive, fail, require_matplotlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=240, help="latent frames to generate (default 240)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the random weights, text and noise (default 0)")
    parser.add_argument("--out-dir", default="out", help="where the trace picture goes (default out/)")
    parser.add_argument("--no-plot", action="store_true",
                        help="skip the trace picture (it needs matplotlib: pip install \"deepforcing_kernels[plot]\")")
    parser.add_argument("--no-compare", action="store_true", help="skip the all-policies comparison")
    parser.add_argument("--ops", action="store_true", help="also run the op table (each backend vs reference)")
    parser.add_argument("--tokens-per-frame", type=int, default=64, help="--ops: tokens per latent frame")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for the rollouts (default 1: the tiny model's ops are too small to "
                             "gain from more, and on a shared machine extra threads only spin)")


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


def rollout_stats(model, text, frames: int, policy, seed: int, progress: bool) -> dict:
    """Generate ``frames`` latent frames; return frames/s, the cache size after every block and the latents."""
    from ..driver import generate

    sizes = []
    ro = generate(model, text, frames, policy, seed, progress=progress)
    blocks = []
    for block in ro:
        blocks.append(block)
        sizes.append(ro.cache_frames)
    lat = torch.cat(blocks, dim=1)
    return {"fps": frames / ro.elapsed_s, "seconds": ro.elapsed_s, "sizes": sizes, "latents": lat,
            "tokens_per_frame": ro.tokens_per_frame}


def run(args: argparse.Namespace) -> int:
    from ._common import check_output_file

    check_frames(args.frames)
    check_positive(args.threads, "--threads")
    check_positive(args.tokens_per_frame, "--tokens-per-frame")
    if not args.no_plot:  # checked before the rollouts, not after them
        require_matplotlib("demo's trace picture", "--no-plot")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            fail(f"--out-dir {args.out_dir} is a file, not a directory")
        check_output_file(os.path.join(args.out_dir, "trace.png"), "--out-dir")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from ..models import build_model, random_text_embeds
    from ..presets import POLICY_NAMES, make_policy
    from .trace import plot, summary, trace_policy

    t_start = time.perf_counter()
    model = build_model("tiny", None, args.seed)
    cfg = model.config
    text = random_text_embeds(cfg, args.seed)
    n = cfg.tokens_per_frame()
    print(f"tiny Wan causal DiT: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.head_dim}, "
          f"latents {cfg.in_dim}x{cfg.latent_size[0]}x{cfg.latent_size[1]} ({n} tokens/frame), random weights, "
          f"{torch.get_num_threads()} threads")
    policy = make_policy("deep_forcing")
    rollout_stats(model, text, 3, policy, args.seed, progress=False)  # warm-up: first calls allocate and dispatch
    print(f"1) Deep Forcing rollout: {args.frames} latent frames = {args.frames // 3} blocks x 5 passes")
    st = rollout_stats(model, text, args.frames, policy, args.seed, progress=True)
    sizes = st["sizes"]
    head = ", ".join(f"{s:g}" for s in sizes[:10])
    kv_bytes = 2 * cfg.num_layers * max(sizes) * n * cfg.dim * 4
    lat = st["latents"]
    print(f"   {args.frames} frames in {st['seconds']:.1f} s: {st['fps']:.1f} frames/s")
    print(f"   cache frames after each block: {head}, ... (max {max(sizes):g}, last {sizes[-1]:g}; "
          f"{max(sizes) * n:g} tokens/layer, K+V {kv_bytes / 1024:.0f} KiB fp32)")
    print(f"   latents {list(lat.shape)}, mean {lat.mean().item():+.3f}, std {lat.std().item():.3f}, "
          f"finite: {bool(torch.isfinite(lat).all())}")

    if not args.no_compare:
        print(f"2) every policy, {args.frames} frames each:")
        w = max(len(name) for name in POLICY_NAMES)
        print(f"   {'policy':<{w}} {'frames/s':>9} {'cache max':>10} {'cache last':>11}")
        for name in POLICY_NAMES:
            s = rollout_stats(model, text, args.frames, make_policy(name), args.seed, progress=False)
            print(f"   {name:<{w}} {s['fps']:9.1f} {max(s['sizes']):10g} {s['sizes'][-1]:11g}")

    path = os.path.join(args.out_dir, "trace.png")
    print(f"3) cache schedule of deep-forcing (2 tokens/frame, random q/k/v), first {min(args.frames, 90)} frames:")
    tr = trace_policy(policy, min(args.frames, 90), tokens_per_frame=2, seed=args.seed)
    for line in summary(tr, 8):
        print("   " + line)
    if args.no_plot:
        print("   (no picture: --no-plot)")
    else:
        plot(tr, path)
        print(f"   wrote {path}")

    if args.ops:
        print(f"4) sink_attention: q 3 frames x {args.tokens_per_frame} tokens, KV 19 frames (10-frame sink "
              f"re-phased by 11), 12 heads, D 128, return_mass=True")
        print(f"   {'backend':<10} {'dtype':<9} {'ms':>9} {'max|dout|':>11} {'max|dmass|':>11}")
        for backend, dtype, ms, err, merr in op_table(args.tokens_per_frame, args.seed):
            print(f"   {backend:<10} {dtype:<9} {ms:9.2f} {err:11.2e} {merr:11.2e}")
    print(f"demo done in {time.perf_counter() - t_start:.1f} s")
    return 0
