"""Sweep launch configurations of the Triton kernels on a real GPU and print table rows to paste.

    python -m deepforcing_kernels.triton.autotune [--dtype bf16] [--kernels fwd,mass] [--modes none,sink,perkey]
                                                  [--budget-s 300]

At the production shape (q 1 x 4680 x 12 x 128, keys 21 frames x 1560 tokens, Wan RoPE, sink 10 frames; the
mass over the last 1560 query rows) each candidate is compiled and timed (``triton.testing.do_bench``, median);
candidates that do not compile (out of registers / shared memory) are skipped. Prints every timing, then the best
row per (kernel, mode) in the format of :mod:`deepforcing_kernels.triton.configs` (``format_rows``), with the
measurement as its reason. Without CUDA it says so and exits 1. The sweep stops starting new candidates after
``--budget-s`` seconds.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..presets import dtype_name, torch_dtype
from .configs import F16

DTYPES = {name: torch_dtype(name) for name in F16}


def fwd_candidates(mode: str) -> List[Tuple[int, int, int, int, int]]:
    """``(BLOCK_M, BLOCK_N, BLOCK_N_ROT, num_warps, num_stages)`` forward candidates for one mode."""
    rots = (0,) if mode == "none" else (16, 32, 64)
    out = []
    for bm, bn, rot, w, st in itertools.product((64, 128), (32, 64, 128), rots, (4, 8), (2, 3, 4)):
        if rot and rot > bn:
            continue
        out.append((bm, bn, rot, w, st))
    return out


def mass_candidates(mode: str) -> List[Tuple[int, int, int, int, int]]:
    """Mass-kernel candidates (``BLOCK_N_ROT`` unused: 0)."""
    return [(bm, bn, 0, w, st) for bm, bn, w, st in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3))]


def _problem(dtype: torch.dtype, mode: str, lq: int, lk: int, heads: int, d: int):
    from ..rope import RopeSpec
    from ..rotation import rotation_tables

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, lq, heads, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, lk, heads, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, lk, heads, d, device="cuda", generator=g).to(dtype)
    rope = RopeSpec.wan(d)
    key_shift = None
    sink_len, sink_shift = 0, 0
    if mode == "sink":
        sink_len, sink_shift = min(lk, 10 * 1560), 6
    elif mode == "perkey":
        key_shift = torch.randint(-50, 50, (1, lk), device="cuda", dtype=torch.int64)
    cos, sin, rot_len = rotation_tables(rope, sink_len, sink_shift, key_shift, 1, lk, q.device)
    return q, k, v, cos, sin, rot_len


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m deepforcing_kernels.triton.autotune",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--kernels", default="fwd,mass", help="comma-separated: fwd, mass")
    ap.add_argument("--modes", default="none,sink,perkey", help="comma-separated: none, sink, perkey")
    ap.add_argument("--lq", type=int, default=3 * 1560, help="query rows (default 4680: one block)")
    ap.add_argument("--lk", type=int, default=21 * 1560, help="keys (default 32760: 21 frames)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting candidates after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune needs a CUDA GPU (torch.cuda.is_available() is False); on CPU use "
              "`python -m deepforcing_kernels.triton.aot` to check the tables compile", file=sys.stderr)
        return 1
    kernels = [x for x in args.kernels.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    bad = [x for x in kernels if x not in ("fwd", "mass")] + [x for x in modes if x not in ("none", "sink", "perkey")]
    if bad:
        print(f"unknown --kernels / --modes value(s): {bad}", file=sys.stderr)
        return 1
    rows, best = run(DTYPES[args.dtype], kernels, modes, args.lq, args.lk, args.heads, args.head_dim,
                     args.budget_s)
    print(f"{'kernel':<6} {'mode':<7} {'M':>4} {'N':>4} {'ROT':>4} {'w':>2} {'s':>2} {'ms':>9} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['kernel']:<6} {r['mode']:<7} {r['cfg'][0]:>4} {r['cfg'][1]:>4} {r['cfg'][2]:>4} {r['cfg'][3]:>2} "
              f"{r['cfg'][4]:>2} {r['ms']:>9.3f} {r['tflops']:>8.1f}")
    from .configs import format_rows

    print("\n# rows to paste into deepforcing_kernels/triton/configs.py (arch "
          f"{torch.cuda.get_device_capability()}):")
    print(format_rows(best))
    return 0


def run(dtype: torch.dtype, kernels: List[str], modes: List[str], lq: int, lk: int, heads: int, d: int,
        budget_s: float):
    """Time every candidate; returns ``(timings, best rows in the configs format)``."""
    import triton.testing

    from . import attention as _attention
    from . import mass as _mass
    from .configs import FwdConfig
    from .op import _wrap, launch, rephase_mode

    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    rows: List[Dict] = []
    best = []
    dt = dtype_name(dtype, short=True)
    for kernel, mode in itertools.product(kernels, modes):
        q, k, v, cos, sin, rot_len = _problem(dtype, mode, lq, lk, heads, d)
        m0, m1 = max(0, lq - 1560), lq
        flops = 4.0 * heads * lq * lk * d if kernel == "fwd" else 2.0 * heads * (m1 - m0) * lk * d
        mode_id = rephase_mode(cos, rot_len)
        c, s = (cos, sin) if mode_id else (torch.empty(1, device="cuda"),) * 2
        stats = None
        if kernel == "mass":  # the forward's row statistics, once
            out = torch.empty_like(q)
            lse = torch.empty((1, heads, lq), dtype=torch.float32, device="cuda")
            stats = torch.empty((2, 1, heads, lq), dtype=torch.float32, device="cuda")
            _attention.forward(q, k, v, c, s, mode=mode_id, rot_len=rot_len, interleaved=True,
                               softmax_scale=d ** -0.5, out=out, lse=lse, stats=stats,
                               config=_attention.fwd_config(d, dtype, _arch(), mode), launch=_wrap)
        timed = []
        for cand in (fwd_candidates(mode) if kernel == "fwd" else mass_candidates(mode)):
            if time.perf_counter() - t_start > budget_s:
                print(f"budget of {budget_s:.0f} s spent: stopping the sweep", file=sys.stderr)
                break
            bm, bn, rot, w, st = cand
            cfg = FwdConfig(bm, bn, w, st, rot)
            if kernel == "fwd":
                def fn(cfg=cfg):
                    launch(q, k, v, cos, sin, rot_len, True, d ** -0.5, False, 0, 0, config=cfg)
            else:
                mass = torch.empty((1, heads, lk), dtype=torch.float32, device="cuda")

                def fn(cfg=cfg, mass=mass):
                    _mass.attention_mass(q, k, stats, c, s, mode=mode_id, rot_len=rot_len, interleaved=True,
                                         softmax_scale=d ** -0.5, mass_start=m0, mass_end=m1, mass=mass, config=cfg,
                                         launch=_wrap)
            try:
                ms = triton.testing.do_bench(fn, warmup=5, rep=20)
            except Exception as e:  # noqa: BLE001 - out of resources etc.: not a candidate on this GPU
                print(f"skip {kernel} {mode} {cand}: {type(e).__name__}", file=sys.stderr)
                continue
            r = {"kernel": kernel, "mode": mode, "cfg": cand, "ms": ms, "tflops": flops / ms / 1e9}
            rows.append(r)
            timed.append(r)
        if timed:
            timed.sort(key=lambda r: r["ms"])
            b = timed[0]
            nxt = f", next best {timed[1]['ms']:.3f} ms {timed[1]['cfg']}" if len(timed) > 1 else ""
            bm, bn, rot, w, st = b["cfg"]
            best.append((kernel, (mode,), (dt,), d, bm, bn, rot, w, st,
                         f"autotuned on {gpu}: {b['ms']:.3f} ms ({b['tflops']:.0f} TFLOP/s) at q {lq} x kv {lk} x "
                         f"{heads} heads{nxt}"))
    return rows, best


def _arch() -> int:
    from .common import device_arch

    return device_arch(torch.device("cuda"))


if __name__ == "__main__":
    sys.exit(main())
