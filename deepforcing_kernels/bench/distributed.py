"""Sequence parallelism: the communication model per layer-pass, and a measured CPU benchmark.

``python -m deepforcing_kernels.bench.distributed model`` prints the analytic table of ``docs/distributed.md``
(bytes of the four all-to-alls of one layer-pass against the layer's FLOPs, for Wan 1.3B and 14B at 480x832, and
the expected scaling efficiency on NVLink and PCIe).

``python -m deepforcing_kernels.bench.distributed measure`` runs the same rollout passes as 1 process x 1 thread
and as 2 Gloo ranks x 1 thread each (spawned like ``torchrun``), at a geometry where attention dominates, and
prints the speed-up and the share of each pass spent in collectives.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["WanSizes", "layer_pass_flops", "layer_pass_bytes", "efficiency", "model_table", "measure", "main"]


@dataclass(frozen=True)
class WanSizes:
    """The sizes the model needs: ``dim``, ``heads``, ``layers``, ``ffn``, text tokens."""

    name: str
    dim: int
    heads: int
    layers: int
    ffn: int
    text_len: int = 512


WAN_1_3B = WanSizes("Wan 1.3B", 1536, 12, 30, 8960)
WAN_14B = WanSizes("Wan 14B", 5120, 40, 40, 13824)
TOKENS_PER_FRAME = 1560  # 480 x 832 pixels = 60 x 104 latents = 30 x 52 patches
BLOCK_FRAMES = 3


def layer_pass_flops(m: WanSizes, *, kv_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME,
                     block_frames: int = BLOCK_FRAMES) -> Dict[str, float]:
    """FLOPs (multiply-add = 2) of one DiT layer on one block, all ranks together, by part.

    ``kv_frames`` counts every key the block's queries see (cache + the block itself). Cross-attention K/V of the
    text are computed once per prompt (Self-Forcing caches them), so they are not counted.
    """
    n, d = block_frames * tokens_per_frame, m.dim
    lk = kv_frames * tokens_per_frame
    return {"qkvo": 8.0 * n * d * d, "self_attn": 4.0 * n * lk * d, "cross": 4.0 * n * d * d + 4.0 * n * m.text_len * d,
            "ffn": 4.0 * n * d * m.ffn}


def layer_pass_bytes(m: WanSizes, world: int, *, elem_bytes: int = 2, tokens_per_frame: int = TOKENS_PER_FRAME,
                     block_frames: int = BLOCK_FRAMES) -> float:
    """Bytes each rank sends in the four all-to-alls (q, k, v before attention, the output after) of one layer-pass:
    each is ``[tokens/P, dim]`` of which ``(P-1)/P`` leaves the rank."""
    n = block_frames * tokens_per_frame
    return 4.0 * elem_bytes * n * m.dim / world * (world - 1) / world


def efficiency(m: WanSizes, world: int, *, kv_frames: int, bandwidth: float, latency_s: float,
               flops_per_s: float) -> Dict[str, float]:
    """Expected parallel efficiency of one layer-pass without overlap: ``t1 / (P * tP)`` with ``tP = t1 / P +
    bytes / bandwidth + 4 * latency`` (the Top-C score all-gather, ``4 L`` bytes per compressing pass, and the one
    gather of the head output per pass are left out: both are below 1 % of the all-to-alls)."""
    t1 = sum(layer_pass_flops(m, kv_frames=kv_frames).values()) / flops_per_s
    comm = layer_pass_bytes(m, world) / bandwidth + 4 * latency_s
    tp = t1 / world + comm
    return {"t1_ms": t1 * 1e3, "comm_ms": comm * 1e3, "tp_ms": tp * 1e3, "speedup": t1 / tp,
            "efficiency": t1 / (world * tp), "comm_share": comm / tp}


LINKS = {"NVLink (H100, 450 GB/s all-to-all)": (450e9, 15e-6), "PCIe (25 GB/s)": (25e9, 50e-6)}
H100_BF16 = 600e12  # sustained dense bf16 FLOP/s assumed for the layer's GEMMs and attention (~60 % of peak)


def model_table(kv_frames: Sequence[int] = (16, 21), worlds: Sequence[int] = (2, 4, 8)) -> str:
    """The markdown tables of docs/distributed.md."""
    out: List[str] = []
    out.append("| model | KV frames | GFLOP per layer-pass (qkvo / self-attn / cross / ffn) | MB sent per rank, "
               "P=2 / 4 / 8 | FLOP per byte sent, P=2 |")
    out.append("|---|---|---|---|---|")
    for m in (WAN_1_3B, WAN_14B):
        for kv in kv_frames:
            f = layer_pass_flops(m, kv_frames=kv)
            mb = " / ".join(f"{layer_pass_bytes(m, p) / 1e6:.1f}" for p in worlds)
            parts = " / ".join(f"{v / 1e9:.0f}" for v in f.values())
            out.append(f"| {m.name} | {kv} | {sum(f.values()) / 1e9:.0f} ({parts}) | {mb} | "
                       f"{sum(f.values()) / 2 / layer_pass_bytes(m, 2):.0f} |")
    out.append("")
    out.append(f"Expected efficiency per layer-pass (compute at {H100_BF16 / 1e12:.0f} TFLOP/s per GPU, no overlap "
               "of communication and compute; `-` where P does not divide the heads):")
    out.append("")
    out.append("| model | KV frames | link | 1-GPU ms | P=" + " | P=".join(str(p) for p in worlds) + " |")
    out.append("|---|---|---|---|" + "---|" * len(worlds))
    for m in (WAN_1_3B, WAN_14B):
        for kv in kv_frames:
            for link, (bw, lat) in LINKS.items():
                cells = []
                for p in worlds:
                    if m.heads % p:
                        cells.append("-")
                        continue
                    e = efficiency(m, p, kv_frames=kv, bandwidth=bw, latency_s=lat, flops_per_s=H100_BF16)
                    cells.append(f"{e['efficiency'] * 100:.0f} % ({e['speedup']:.2f}x, "
                                 f"comm {e['comm_share'] * 100:.0f} %)")
                t1 = sum(layer_pass_flops(m, kv_frames=kv).values()) / H100_BF16 * 1e3
                out.append(f"| {m.name} | {kv} | {link} | {t1:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- measured
#: the CPU geometry: 2 heads of 64, 256 tokens per frame (32 x 32 latents), a 12-frame window: per layer-pass,
#: attention over ~3000 keys is ~85 % of the FLOPs (projections, FFN and cross-attention the rest)
BENCH = dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=16, latent=(32, 32), warm_frames=12,
             timed_frames=6)


def _bench_policy():
    from ..cache import CachePolicy

    return CachePolicy.deep_forcing(window_frames=12, sink_frames=3, budget_frames=9, recent_frames=3)


def _bench_rank(args: argparse.Namespace) -> int:
    """One rank of the measurement (or the single process when not under the torchrun environment)."""
    import torch

    from ..driver import generate
    from ..models import CausalWanModel, WanConfig

    torch.set_num_threads(1)
    cfg = WanConfig.tiny(dim=BENCH["dim"], ffn_dim=BENCH["ffn_dim"], num_heads=BENCH["num_heads"],
                         num_layers=BENCH["num_layers"], text_len=BENCH["text_len"], latent_size=BENCH["latent"])
    model = CausalWanModel(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    model.eval()
    text = torch.randn(1, BENCH["text_len"], cfg.text_dim, generator=torch.Generator().manual_seed(1))
    comm = None
    if args.parallel:
        from ..distributed.comm import SequenceComm
        from ..distributed.launch import init_from_env
        from ..distributed.ulysses import SequenceParallelWan

        init_from_env(device="cpu", timeout_s=120)
        comm = SequenceComm()
        comm.all_gather(torch.zeros(1))  # connect before timing
        model = SequenceParallelWan(model, comm)
    warm = BENCH["warm_frames"]
    rollout = generate(model, text, warm + BENCH["timed_frames"], _bench_policy(), seed=0,
                       latent_size=BENCH["latent"], progress=False)
    it = iter(rollout)
    block_s, cpu_s, comm_s, comm_bytes = [], [], [], []
    while True:
        if comm is not None:
            comm.stats.reset()
            comm.stats.enabled = rollout.frames_done >= warm
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            next(it)
        except StopIteration:
            break
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if rollout.frames_done > warm:
            block_s.append(dt)
            cpu_s.append(dc)
            comm_s.append(comm.stats.seconds if comm is not None else 0.0)
            comm_bytes.append(comm.stats.bytes_sent if comm is not None else 0)
    if comm is None or comm.rank == 0:
        print("BENCH " + json.dumps({"world": comm.world if comm else 1, "block_s": block_s, "cpu_s": cpu_s,
                                     "comm_s": comm_s,
                                     "comm_bytes": comm_bytes, "passes_per_block": 5}), flush=True)
    return 0


def _run_config(parallel: bool, timeout_s: float) -> Dict[str, Any]:
    from ..distributed.testing import launch_local

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["-m", "deepforcing_kernels.bench.distributed", "rank"] + (["--parallel"] if parallel else [])
    res = launch_local(2 if parallel else 1, argv, timeout_s=timeout_s, env=env)
    for r in res:
        if r.returncode != 0:
            raise RuntimeError(f"benchmark rank {r.rank} failed (rc={r.returncode}): {r.stderr.strip()[-800:]}")
    line = next(ln for ln in res[0].stdout.splitlines() if ln.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def measure(repeats: int = 2, timeout_s: float = 300.0) -> Dict[str, Any]:
    """1 process x 1 thread vs 2 Gloo ranks x 1 thread, alternated ``repeats`` times; the best block of each
    configuration (a loaded machine only ever adds time)."""
    single, par = [], []
    for _ in range(repeats):
        single.append(_run_config(False, timeout_s))
        par.append(_run_config(True, timeout_s))
    t1 = min(min(r["block_s"]) for r in single) / 5
    best = min((b, c, n) for r in par for b, c, n in zip(r["block_s"], r["comm_s"], r["comm_bytes"]))
    t2, c2, nb = best[0] / 5, best[1] / 5, best[2] / 5
    # CPU seconds (rank 0's process time): what the work costs whatever the machine's load
    cpu1 = min(min(r["cpu_s"]) for r in single) / 5
    cpu2 = min(min(r["cpu_s"]) for r in par) / 5
    return {"geometry": dict(BENCH, policy="deep_forcing(window 12, sink 3, budget 9, recent 3), mass"),
            "single_pass_s": t1, "sp2_pass_s": t2, "speedup": t1 / t2, "comm_pass_s": c2, "comm_share": c2 / t2,
            "comm_bytes_per_pass_per_rank": nb, "single_pass_cpu_s": cpu1, "sp2_pass_cpu_s_per_rank": cpu2,
            "cpu_speedup": cpu1 / cpu2, "raw": {"single": single, "sp2": par}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepforcing_kernels.bench.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("model", help="print the analytic communication model (markdown)")
    m = sub.add_parser("measure", help="2 CPU ranks x 1 thread vs 1 process x 1 thread")
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--json", default=None, help="also write the figures here")
    r = sub.add_parser("rank", help=argparse.SUPPRESS)
    r.add_argument("--parallel", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "model":
        print(model_table())
    elif args.cmd == "rank":
        return _bench_rank(args)
    else:
        res = measure(args.repeats)
        print(f"per pass: 1 process {res['single_pass_s'] * 1e3:.1f} ms, 2 ranks {res['sp2_pass_s'] * 1e3:.1f} ms: "
              f"speed-up {res['speedup']:.2f}x; collectives {res['comm_pass_s'] * 1e3:.1f} ms per pass "
              f"({res['comm_share'] * 100:.0f} % of it, {res['comm_bytes_per_pass_per_rank'] / 1e6:.2f} MB sent "
              f"per rank); CPU time per pass {res['single_pass_cpu_s'] * 1e3:.1f} ms vs "
              f"{res['sp2_pass_cpu_s_per_rank'] * 1e3:.1f} ms per rank ({res['cpu_speedup']:.2f}x)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
