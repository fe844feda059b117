"""Ahead-of-time compilation of every production Triton variant, without a GPU.

    python -m deepforcing_kernels.triton.aot --arch 80 90 [--json] [--strict]

For each arch and each production variant (head_dim 128, Wan interleaved RoPE; fp16 and bf16; no re-phasing,
sink re-phasing, per-key shift; forward kernel and mass kernel) this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` at the launch config the heuristics
(:func:`~.attention.fwd_config`, :func:`~.mass.mass_config`) pick on that arch, and reports:

* ``registers`` — ``REG`` of ``cuobjdump --dump-resource-usage`` on the cubin (Triton's bundled cuobjdump);
* ``spills`` — spill store + spill load bytes from ``ptxas -v``: the log of the ptxas run inside Triton's own
  compile of the cubin, or, when Triton's cache held the kernel, of ``ptxas -v`` on its PTX (Triton's bundled
  ptxas, the same binary and register-allocation flag Triton uses for that arch; the count is kept in Triton's
  cache under a hash of ptxas, its flags and the PTX). ``STACK`` is not used: libdevice's sin / cos keep a small
  local array, so STACK is non-zero with no spill at all;
* ``shared_bytes`` — Triton's dynamic shared memory (``compiled.metadata.shared``) plus the static ``SHARED`` of
  cuobjdump;
* the PTX check: ``tensor_core_op`` (the instruction the arch must use: ``mma`` = ``mma.sync`` on sm_80,
  ``wgmma`` = ``wgmma.mma_async`` on sm_90), ``tensor_core_count`` (how many of them the PTX holds) and
  ``local_memory`` (PTX lines that declare or touch local memory: ``.local``, ``ld.local``, ``st.local``; the kernels
  take precomputed cos / sin tables, so not even libdevice's sin / cos array should appear).

``--json`` prints exactly one JSON list on stdout; otherwise a table. Exit status 0 when everything compiled
(1 otherwise); with ``--strict`` also 1 on any spill, shared memory over the arch limit, a variant without its
arch's tensor-core instruction, or any local memory. Compiles go through
Triton's cache, so a second run takes seconds. Register counts depend on the compiler: Triton is pinned.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # (only when run as the command: importing this module changes nothing)
    # Must precede any triton import: under the interpreter @triton.jit makes InterpretedFunctions, which cannot
    # be compiled (docs/spec.md section 7).
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 default, stated to silence its warning

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

from ..presets import torch_dtype  # noqa: E402
from .configs import F16, MODE_IDS  # noqa: E402  (configs imports no triton)

# Usable shared memory per block (bytes): sm_80 163 KiB, sm_90 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
HEAD_DIM = 128
DTYPES = {name: torch_dtype(name) for name in F16}
MODES = MODE_IDS
_PTR_ARGS = {"Q", "K", "V", "Out", "Lse", "Stats", "Mass", "Cos", "Sin", "Bias"}


@dataclass
class Variant:
    kernel: str  # report name, e.g. "fwd_bf16_sink"
    op: str  # "fwd" | "mass"
    dtype: str  # "fp16" | "bf16"
    mode: str  # "none" | "sink" | "perkey"
    bias: bool = False  # the key_bias variant (HAS_BIAS)


@dataclass
class Result:
    kernel: str
    arch: int
    registers: int
    spills: int
    shared_bytes: int
    tensor_core_op: str = ""
    tensor_core_count: int = -1
    local_memory: int = -1
    error: Optional[str] = None


def production_variants() -> List[Variant]:
    """Every kernel the GPU path launches in production (head_dim 128, Wan layout)."""
    plain = [Variant(f"{op}_{dt}_{mode}", op, dt, mode) for op in ("fwd", "mass") for dt in DTYPES for mode in MODES]
    # key_bias runs with a re-phased sink (Recency Forcing): those variants, for both passes and dtypes
    return plain + [Variant(f"{op}_{dt}_sink_bias", op, dt, "sink", True) for op in ("fwd", "mass") for dt in DTYPES]


def _signature(fn, variant: Variant, arch: int):
    """``(signature, constexprs, attrs, options)`` of one variant, every constexpr explicit."""
    from .configs import fwd_config, mass_config

    dt = variant.dtype
    cfg = (fwd_config if variant.op == "fwd" else mass_config)(HEAD_DIM, DTYPES[dt], arch, variant.mode)
    const: Dict[str, object] = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=HEAD_DIM,
                                    REPHASE=MODES[variant.mode], INTERLEAVED=True, SPLIT=True, DOT_F32=False,
                                    HAS_BIAS=variant.bias)
    if variant.op == "fwd":
        const["STORE_LSE"] = True
        const["STORE_STATS"] = True  # the superset: with return_mass the forward also stores max and sum
        const["BLOCK_N_ROT"] = cfg.BLOCK_N_ROT or cfg.BLOCK_N
    # Inner strides are 1 in production; the JIT specialises such ints to constants, so do the same here.
    for name in fn.arg_names:
        if name.startswith("stride_") and name.endswith("d"):
            const[name] = 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in _PTR_ARGS:
            sig[name] = "*fp32" if name in ("Lse", "Stats", "Mass", "Cos", "Sin", "Bias") else f"*{dt}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            # Batch / token / head strides of [B, L, H, 128] tensors are multiples of 16 elements. The cos/sin
            # table strides (T = 22 per key) and the sizes are not.
            if name.startswith("stride_") and name not in ("stride_cb", "stride_cn", "stride_ch", "stride_bb", "stride_bh"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def tensor_core_op(arch: int) -> str:
    """The tensor-core instruction family every 16-bit variant must use on ``arch``."""
    return "wgmma" if arch >= 90 else "mma"


_TC_PATTERN = {"wgmma": re.compile(r"^\s*wgmma\.mma_async\b", re.M), "mma": re.compile(r"^\s*mma\.sync\b", re.M)}
_LOCAL_PATTERN = re.compile(r"\.local\b|\bld\.local\b|\bst\.local\b")


def ptx_check(ptx: str, arch: int) -> Tuple[str, int, int]:
    """``(tensor_core_op, its instruction count, local-memory lines)`` of one kernel's PTX."""
    op = tensor_core_op(arch)
    count = len(_TC_PATTERN[op].findall(ptx))
    # (the substring test first: every match contains "local", and most of a kernel's ~10k lines do not)
    local = sum(1 for line in ptx.splitlines() if "local" in line and _LOCAL_PATTERN.search(line.split("//")[0]))
    return op, count, local


def _tool(name: str, arch: int) -> str:
    from triton import knobs

    if name == "cuobjdump":
        return knobs.nvidia.cuobjdump.path
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path  # the ptxas Triton itself uses for this arch


_SPILL_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _spills_in(log: str) -> Optional[int]:
    """Spill store + load bytes of a ``ptxas -v`` log; None when it has no spill line."""
    found = _SPILL_LINE.findall(log)
    return sum(int(a) + int(b) for a, b in found) if found else None


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Spill bytes of ``ptxas -v`` on ``ptx``, kept in Triton's cache under a hash of (ptxas, version, flags, PTX).

    Needed when Triton's own cache held the kernel (then no ptxas ran in :func:`compile_variant`). The count is a
    pure function of those inputs, as Triton's cached cubin is of its key; without the memo every run re-ran
    ptxas on all 32 variants (about 0.5 s each: 15 s of a run with Triton's cache warm, 2-core CPU)."""
    from triton.runtime.cache import get_cache_manager

    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    tool = _tool("ptxas", arch)
    flags = ["-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}"]
    key = hashlib.sha256(json.dumps([tool, _tool_version(tool), flags, ptx]).encode()).hexdigest()
    cache = get_cache_manager(key)
    hit = cache.get_file("ptxas_spills.json")
    if hit is not None:
        with open(hit) as f:
            return int(json.load(f)["spills"])
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, *flags, src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True,
                              check=True)
    spills = _spills_in(proc.stdout + proc.stderr)
    if spills is None:
        raise RuntimeError(f"no spill line in ptxas -v output:\n{proc.stderr}")
    cache.put(json.dumps({"spills": spills}), "ptxas_spills.json", binary=False)
    return spills


@functools.lru_cache(maxsize=None)
def _tool_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def _triton_ptxas_log():
    """Collect the ``ptxas -v`` log of the compiles inside (Triton prints it with ``dump_ptxas_log``): the spill
    count of the very ptxas run that made the cubin, instead of running ptxas a second time on the same PTX. The
    log is empty when Triton's cache held the kernel."""
    from triton import knobs

    buf = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(buf):  # scope(): the knob and its variable restored
        knobs.nvidia.dump_ptxas_log = True
        yield buf


def _cuobjdump_usage(cubin: bytes) -> Tuple[int, int]:
    """``(REG, static SHARED)`` of the cubin's kernel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump", 0), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    shared = re.search(r"SHARED:(\d+)", out)
    if reg is None:
        raise RuntimeError(f"no REG in cuobjdump output:\n{out}")
    return int(reg.group(1)), int(shared.group(1)) if shared else 0


def compile_variant(variant: Variant, arch: int) -> Result:
    """Compile one variant for one arch and measure it (errors are reported, not raised)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from . import attention, mass

        fn = attention._fwd_kernel if variant.op == "fwd" else mass._mass_kernel
        sig, const, attrs, options = _signature(fn, variant, arch)
        with _triton_ptxas_log() as log:
            compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=options)
        regs, static_shared = _cuobjdump_usage(compiled.asm["cubin"])
        spills = _spills_in(log.getvalue())
        if spills is None:  # Triton's cache had the kernel: no ptxas ran
            spills = _ptxas_spills(compiled.asm["ptx"], arch)
        op, count, local = ptx_check(compiled.asm["ptx"], arch)
        return Result(variant.kernel, arch, regs, spills, int(compiled.metadata.shared) + static_shared, op, count,
                      local)
    except Exception as e:  # report and carry on: one broken variant must not hide the others
        return Result(variant.kernel, arch, -1, -1, -1, tensor_core_op(arch), error=f"{type(e).__name__}: {e}"[:2000])


def _compile_star(args):
    return compile_variant(*args)


def run(archs: List[int], jobs: int = 0) -> List[Result]:
    """Compile every production variant for every arch (in ``jobs`` processes; 0: one per CPU, at most 4)."""
    work = [(v, a) for a in archs for v in production_variants()]
    jobs = jobs or min(4, os.cpu_count() or 1)
    if jobs == 1:
        return [compile_variant(v, a) for v, a in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_star, work))


def _violations(r: Result) -> List[str]:
    bad = []
    if r.error:
        bad.append("compile failed")
    else:
        if r.spills > 0:
            bad.append(f"{r.spills} spill bytes")
        limit = SHARED_LIMIT.get(r.arch)
        if limit is not None and r.shared_bytes > limit:
            bad.append(f"shared {r.shared_bytes} > {limit}")
        if r.tensor_core_count <= 0:
            bad.append(f"no {r.tensor_core_op} instruction")
        if r.local_memory != 0:
            bad.append(f"{r.local_memory} local-memory lines")
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m deepforcing_kernels.triton.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 on any spill, shared-memory overflow, missing tensor-core instruction or local memory")
    ap.add_argument("--jobs", type=int, default=0, help="compile processes (default: CPUs, at most 4)")
    args = ap.parse_args(argv)
    results = run(args.arch, args.jobs)
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "error"} for r in results]))
    else:
        print(f"{'kernel':<18} {'arch':>4} {'registers':>9} {'spills':>6} {'shared_bytes':>12} {'tc_op':>6} "
              f"{'tc_count':>8} {'local':>5}  notes")
        for r in results:
            print(f"{r.kernel:<18} {r.arch:>4} {r.registers:>9} {r.spills:>6} {r.shared_bytes:>12} "
                  f"{r.tensor_core_op:>6} {r.tensor_core_count:>8} {r.local_memory:>5}  {', '.join(_violations(r))}")
    for r in results:
        if r.error:
            print(f"{r.kernel} sm_{r.arch}: {r.error}", file=sys.stderr)
    if any(r.error for r in results):
        return 1
    if args.strict and any(_violations(r) for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
