"""What ``deepforcing gpu-check`` records about its machine and how it writes its result (JSON and a Markdown
summary; the schema is in ``docs/gpu_check_schema.md``)."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from typing import Any, Dict, List, Optional

import torch

__all__ = ["env_info", "write_outputs", "format_markdown"]


# ---------------------------------------------------------------------------------------------- env
def env_info(device: str) -> Dict[str, Any]:
    """Versions and (on CUDA) the GPU, driver, memory and clocks."""
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "platform": platform.platform(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    info.update(gpu_name=None, capability=None, memory_bytes=None, driver=None, clocks_mhz=None)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=int(p.total_memory))
    smi = shutil.which("nvidia-smi")
    if smi and device == "cuda":
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
            drv, sm, sm_max, mem = [x.strip() for x in out.splitlines()[0].split(",")]
            info["driver"] = drv
            info["clocks_mhz"] = {"sm": _num(sm), "sm_max": _num(sm_max), "mem": _num(mem)}
        except Exception:  # noqa: BLE001 - clocks are optional
            pass
    return info


def _num(s: str) -> Optional[float]:
    try:
        return float(s)
    except ValueError:
        return None


def write_outputs(result: Dict[str, Any], out_dir: str) -> List[str]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    pj, pm = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")
    with open(pj, "w") as f:
        json.dump(result, f, indent=1, default=str, allow_nan=False)
    with open(pm, "w") as f:
        f.write(format_markdown(result))
    return [pj, pm]


def _f(x: Optional[float], fmt: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_markdown(r: Dict[str, Any]) -> str:
    """The short human summary of a result."""
    env = r["env"]
    lines = [f"# gpu-check ({r['mode']})", "",
             f"{env.get('gpu_name') or 'CPU (dry run)'}, capability {env.get('capability')}, driver "
             f"{env.get('driver')}, torch {env['torch']}, triton {env.get('triton')}, wall {r['wall_s']:.0f} s", ""]
    c = r.get("correctness", {})
    if "cases" in c:
        bad = [x for x in c["cases"] if not x["ok"]]
        ro = c["rollout"]
        lines += ["## Correctness", "",
                  f"{len(c['cases']) - len(bad)}/{len(c['cases'])} variant x dtype cases within the docs/spec.md section 7 budget"
                  + (f"; failing: {', '.join(x['case'] + '/' + x['dtype'] for x in bad)}" if bad else ""),
                  f"cache rollout ({ro['blocks']} blocks) vs CPU reference: max |diff| {_f(ro['max_abs_diff'])}, "
                  f"slot frames equal: {ro['frames_equal']}", ""]
    elif c.get("error"):
        lines += ["## Correctness", "", f"error: {c['error']}", ""]
    o = r.get("op_timing", {})
    if "rows" in o:
        lines += ["## Op timing", "", "| case | KV frames | impl | ms | TFLOP/s | / triton |",
                  "|---|---|---|---|---|---|"]
        for x in o["rows"]:
            lines.append(f"| {x['case']} | {x['kv_frames']} | {x['impl']} | {_f(x['ms'])} | {_f(x['tflops'])} | "
                         f"{_f(x['ratio_to_triton'])} |")
        lines.append("")
    m = r.get("model", {})
    if "rows" in m:
        lines += ["## Model", "", f"{m['model']}, {m['tokens_per_frame']} tokens/frame. FPS: {m['fps_rule']}", "",
                  "| policy | compile | per block s | fps | fps with VAE | peak GiB |", "|---|---|---|---|---|---|"]
        for x in m["rows"]:
            peak = None if x["peak_memory_bytes"] is None else x["peak_memory_bytes"] / 2 ** 30
            lines.append(f"| {x['policy']} | {x['compile']} | {_f(x['per_block_s_median'])} | {_f(x['fps'])} | "
                         f"{_f(x['fps_with_vae'])} | {_f(peak)} |")
        lines.append("")
    for name in ("op_timing", "model"):
        if r.get(name, {}).get("error"):
            lines += [f"{name} error: {r[name]['error']}", ""]
    return "\n".join(lines)
