"""Peak memory of the diffusers-style pipeline with and without offload: ``python -m deepforcing_kernels.bench.offload``.

Each mode runs in a fresh process (so one mode's allocations cannot lower another's peak): the tiny pipeline
(:meth:`DeepForcingPipeline.tiny`) is built, optionally offloaded (``enable_model_cpu_offload``, then also
``kv_cache=True``), and generates one video. Reported per mode: the process's resident set before the call and
its peak during the call (Linux ``VmHWM``, reset just before the call through ``/proc/self/clear_refs``), and
the pipeline's own accounting (:meth:`DeepForcingPipeline.memory_report`: the bytes each component and the KV
cache hold on the execution device at most). On a CPU-only machine the execution device and the offload device
are the same memory: the same calls are made and nothing moves, so the resident set does not shrink there; the
accounting shows what an accelerator would hold, and on CUDA ``cuda_peak_bytes`` measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

__all__ = ["measure", "main"]

MODES = ("none", "model", "model+kv")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _child(mode: str, frames: int, latent: int, device: str) -> Dict[str, Any]:
    import torch

    from ..pipeline import DeepForcingPipeline

    torch.set_num_threads(1)
    pipe = DeepForcingPipeline.tiny(0, latent_size=(latent, latent))
    if device != "cpu":
        pipe.to(device)
    if mode != "none":
        pipe.enable_model_cpu_offload(device=device, kv_cache=mode == "model+kv")
    # a first short call pays the one-time costs (lazy library initialisation, first-use allocations), which
    # would otherwise dominate the peak and differ from run to run
    pipe("a red fox", num_frames=3, generator=torch.Generator().manual_seed(1), output_type="latent",
         progress=False)
    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak below is the call's
        reset = True
    except OSError:
        reset = False
    pipe("a red fox", num_frames=frames, generator=torch.Generator().manual_seed(0), output_type="latent",
         progress=False)
    rep = pipe.memory_report()
    return {"mode": mode, "rss_before": before, "rss_peak": _status("VmHWM"), "peak_reset": reset,
            "components": {n: {k: c[k] for k in ("bytes", "offloaded", "resident_peak_bytes", "cuda_peak_bytes")}
                           for n, c in rep["components"].items()},
            "peak_resident_bytes": rep["peak_resident_bytes"],
            "kv_cache": {k: rep["kv_cache"][k] for k in ("slot_bytes", "peak_device_bytes", "bytes_moved")}}


def measure(frames: int = 21, latent: int = 8, device: str = "cpu", repeats: int = 3) -> List[Dict[str, Any]]:
    """One fresh process per mode (:data:`MODES`) and repeat, the modes interleaved; returns their reports."""
    out = []
    for mode in [m for _ in range(repeats) for m in MODES]:
        cmd = [sys.executable, "-m", "deepforcing_kernels.bench.offload", "--child", mode, "--frames", str(frames),
               "--latent", str(latent), "--device", device]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if res.returncode:
            raise RuntimeError(f"mode {mode} failed: {res.stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.2f}"


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=21, help="latent frames (default 21)")
    ap.add_argument("--latent", type=int, default=8, help="latent height = width (default 8: 64 x 64 video)")
    ap.add_argument("--device", default="cpu", help="execution device (default cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (default 3)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON")
    ap.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.frames, a.latent, a.device)))
        return 0
    reps = measure(a.frames, a.latent, a.device, a.repeats)
    print(f"tiny pipeline, {a.frames} latent frames at {a.latent}x{a.latent}, device {a.device} (MiB)")
    print("| offload | RSS before call (median) | peak RSS in call (median, min-max) | on device: DiT | text encoder | VAE | components "
          "at once | KV cache at once | KV bytes moved |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        mine = [r for r in reps if r["mode"] == mode]
        r, c = mine[0], mine[0]["components"]
        peaks = sorted(m["rss_peak"] for m in mine)
        before = sorted(m["rss_before"] for m in mine)[len(mine) // 2]
        print(f"| {mode} | {_mb(before)} | {_mb(peaks[len(peaks) // 2])} ({_mb(peaks[0])}-{_mb(peaks[-1])}) | "
              f"{_mb(c['transformer']['resident_peak_bytes'])} | {_mb(c['text_encoder']['resident_peak_bytes'])} | "
              f"{_mb(c['vae']['resident_peak_bytes'])} | {_mb(r['peak_resident_bytes'])} | "
              f"{_mb(r['kv_cache']['peak_device_bytes'])} | {_mb(r['kv_cache']['bytes_moved'])} |")
    if a.json:
        tmp = a.json + ".tmp"  # written whole, then renamed
        with open(tmp, "w") as f:
            json.dump(reps, f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
