"""`deepforcing gpu-check`: correctness, op timing, model rollouts and environment on one CUDA GPU, in minutes.

Writes ``gpu_check.json`` (schema: ``docs/gpu_check_schema.md``) and ``gpu_check.md`` into ``--out``. Full run
under 8 minutes on an H100 / H200, ``--quick`` under 4 (every section is time-boxed). ``--dry-run`` runs every
step at tiny sizes on CPU with the Triton kernels under the interpreter (it re-executes itself with
``TRITON_INTERPRET=1`` so the variable is set before triton is imported); its figures mean nothing, it keeps the
command working in CI. See :mod:`deepforcing_kernels.bench.gpu_check`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ..triton import interpreting
from ._common import fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/gpu_check", help="directory for gpu_check.json and gpu_check.md "
                        "(default out/gpu_check; created if missing)")
    parser.add_argument("--quick", action="store_true", help="the short run: under 4 minutes (one KV length, fewer "
                        "repetitions and model blocks)")
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on CPU (Triton under the "
                        "interpreter); no GPU needed")


def run(args: argparse.Namespace) -> int:
    if args.quick and args.dry_run:
        fail("--quick and --dry-run exclude each other")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} exists and is not a directory")
    if args.dry_run and not interpreting():
        # the interpreter must be chosen before triton is imported: run again in a fresh process
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = [sys.executable, "-m", "deepforcing_kernels", "gpu-check", "--dry-run", "--out", args.out]
        return subprocess.call(argv, env=env)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        fail("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run to exercise it on CPU")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out} cannot be created: {e.strerror}")
    from ..bench.gpu_check import run_gpu_check, write_outputs

    mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    result = run_gpu_check(mode, log=lambda m: print(m, file=sys.stderr, flush=True))
    for path in write_outputs(result, args.out):
        print(f"wrote {path}")
    return 0
