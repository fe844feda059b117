"""`deepforcing bench`: the op, the compression step and whole rollouts per cache policy, in one process.

Sections (all by default; ``--sections`` picks some):

* ``ops``: ``sink_attention`` per backend against torch SDPA and the bare GEMMs, fp32 and bf16, KV 16..24 frames;
* ``compression``: one Participative Compression step against the attention of the pass that triggers it;
* ``rollout``: a 240-frame stream per policy through the cache + attention path at the real layer geometry;
* ``model``: the same stream through the tiny full model (``WanConfig.tiny()``) and the driver;
* ``profile``: cProfile of the Deep Forcing rollouts (and sliding), grouped by engine piece (full run only,
  or with ``--profile``).

Every ratio is measured within this run, candidates interleaved with their baselines. ``--quick`` trims every
section (fewer cases, a 60-frame stream) to stay under 3 minutes on 2 cores.

Measured wall time on the 2-core development machine (AMD EPYC, shared with other engineers' test runs):
``--quick`` 40 s at load ~1, 1 min 24 s at load ~4; the full run 5 min 23 s at load ~1 (ops 85 s, compression
13 s, cache rollout 3 min 11 s, tiny-model rollout 18 s, profile 12 s), 7.5 to 12 min at load 4-5.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

from ..presets import BACKEND_NAMES, split_commit_rule
from ..presets import BENCH_BASELINE_NAMES as BENCH_BASELINES
from ..presets import POLICY_NAMES as BENCH_POLICIES
from ._common import check_frames, check_output_file, check_positive, fail, plot_format, require_matplotlib

SECTIONS = ("ops", "compression", "rollout", "model", "profile")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a trimmed run (< 3 minutes on 2 cores)")
    parser.add_argument("--json", metavar="PATH", help="write every figure (and the per-block series) as JSON")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="draw per-block time and cache size per policy, exactly at PATH (format from its "
                             'extension, else PNG; needs matplotlib: pip install "deepforcing_kernels[plot]")')
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; profile only in the "
                             "full run)")
    parser.add_argument("--profile", action="store_true", help="also profile the rollouts in a --quick run")
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames per rollout, a positive multiple of 3 (default 240; 60 with --quick)")
    parser.add_argument("--tokens-per-frame", type=int, default=None,
                        help="tokens per latent frame in the cache rollout (default 64; 16 with --quick; "
                             "production is 1560). Below ~64 fixed per-call costs, not attention, dominate a block")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",  # the rollouts' two
                        help="cache / attention dtype of the rollout (default bfloat16, as in production)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                        help="attention backend for the rollouts (default auto)")
    parser.add_argument("--policies", default=None,
                        help=f"comma-separated subset of the rollout policies ({', '.join(BENCH_POLICIES)}; default: "
                             "all), plus the baseline 'release' (the authors' data movement, cache rollout only); "
                             "NAME+commit: NAME with the commit rule; keep 'sliding', the baseline of every ratio")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="build the rollout caches with check_finite=False (skip the per-pass NaN/inf check)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads, >= 1 (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random input (default 0)")
    # for the test suite: every section at toy sizes, in seconds
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _ensure_passive_omp() -> None:
    """Re-run the command with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller chose a policy.

    On a small shared machine OpenMP's default spin-waiting makes every parallel region wait for threads the
    OS has descheduled: measured here, a 30-layer rollout ran 10x slower (106 s instead of 10.8 s) under a load
    of 7 on 2 cores. The variable only works if set before the OpenMP runtime starts, i.e. before torch is
    imported, so the command re-executes itself once (only when it was started as ``deepforcing bench``).
    """
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("DEEPFORCING_BENCH_NO_REEXEC"):
        return
    argv = sys.argv[1:]
    if not argv or argv[0] != "bench":
        return  # called programmatically (tests): leave the process alone
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", DEEPFORCING_BENCH_NO_REEXEC="1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deepforcing_kernels", *argv], env)


def settings_for(args: argparse.Namespace) -> Dict[str, Any]:
    """The sizes of every section for this invocation (quick or full)."""
    import torch

    from ..bench.op_suite import OpGrid
    from ..bench.rollout import ModelRolloutConfig, RolloutConfig

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if getattr(args, "tiny", False):
        frames = args.frames or 30  # past the window of 21, two compressions
        return {
            "ops": OpGrid.tiny(),
            "compression": dict(tokens_per_frame=(2,), repeats=1, dtype=dtype, backend=args.backend),
            "rollout": RolloutConfig(num_frames=frames, num_layers=2, tokens_per_frame=2, dtype=dtype,
                                     backend=args.backend, seed=args.seed),
            "model": ModelRolloutConfig(num_frames=frames, seed=args.seed, backend=args.backend),
            "profile_frames": 27,
        }
    frames = args.frames if args.frames is not None else (60 if args.quick else 240)
    tpf = args.tokens_per_frame if args.tokens_per_frame is not None else (16 if args.quick else 64)
    pol = {"policies": tuple(args.policies.split(","))} if getattr(args, "policies", None) else {}
    return {
        "ops": OpGrid.quick() if args.quick else OpGrid(),
        "compression": dict(tokens_per_frame=(16, 64, 256) if args.quick else (16, 64, 256, 512),
                            repeats=5 if args.quick else 7, dtype=torch.bfloat16, backend=args.backend),
        "rollout": RolloutConfig(num_frames=frames, tokens_per_frame=tpf, dtype=dtype,
                                 backend=args.backend, seed=args.seed,
                                 check_finite=False if args.no_check_finite else None, **pol),
        "model": ModelRolloutConfig(num_frames=frames, seed=args.seed, backend=args.backend, **pol),
        "profile_frames": 36,
    }


def run_bench(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Run the chosen sections; return the result dict that ``--json`` writes."""
    import torch

    from ..bench import report
    from ..bench.compression import run_compression
    from ..bench.hotspots import profile_policies
    from ..bench.op_suite import run_ops
    from ..bench.rollout import run_cache_rollout, run_model_rollout
    from ..bench.timing import machine_info

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sections: List[str] = (args.sections.split(",") if args.sections else
                           [s for s in SECTIONS if s != "profile" or not (args.quick or args.tiny) or args.profile])
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {SECTIONS}")
    st = settings_for(args)
    machine = machine_info()
    machine["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    result: Dict[str, Any] = {
        "machine": machine, "quick": bool(args.quick), "sections": sections,
        "settings": {"ops": {k: (list(map(str, v)) if isinstance(v, (list, tuple)) else v)
                             for k, v in st["ops"].__dict__.items()},
                     "compression": {k: (str(v) if k == "dtype" else v) for k, v in st["compression"].items()},
                     "rollout": st["rollout"].to_dict(), "model_rollout": st["model"].to_dict()},
        "ops": [], "compression": {}, "rollout": {},
    }
    t_all = time.perf_counter()
    timings: Dict[str, float] = {}
    if "ops" in sections:
        t0 = time.perf_counter()
        log("ops ...")
        result["ops"] = run_ops(st["ops"], seed=args.seed, log=log)
        timings["ops"] = time.perf_counter() - t0
    if "compression" in sections:
        t0 = time.perf_counter()
        log("compression ...")
        result["compression"] = run_compression(seed=args.seed, log=log, **st["compression"])
        timings["compression"] = time.perf_counter() - t0
    if "rollout" in sections:
        t0 = time.perf_counter()
        log(f"rollout (cache + attention, {st['rollout'].num_frames} frames, 6 policies interleaved per layer) ...")
        result["rollout"] = run_cache_rollout(st["rollout"], log=log)
        timings["rollout"] = time.perf_counter() - t0
    if "model" in sections:
        t0 = time.perf_counter()
        log(f"model rollout (tiny model, {st['model'].num_frames} frames) ...")
        result["model_rollout"] = run_model_rollout(st["model"], log=log)
        timings["model"] = time.perf_counter() - t0
    if "profile" in sections:
        t0 = time.perf_counter()
        log("profile ...")
        result["profile"] = profile_policies(("sliding", "deep_forcing", "deep_forcing_logits"), st["rollout"],
                                             num_frames=st["profile_frames"])
        timings["profile"] = time.perf_counter() - t0
    result["targets"] = report.evaluate_targets(result)
    result["section_wall_s"] = timings
    result["wall_s"] = time.perf_counter() - t_all
    return result


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before a run that may take 15 minutes (one-line failures naming the flag)."""
    check_frames(args.frames)
    check_positive(args.tokens_per_frame, "--tokens-per-frame")
    check_positive(args.threads, "--threads")
    if args.sections is not None:
        bad = [s for s in args.sections.split(",") if s not in SECTIONS]
        if bad or not args.sections:
            fail(f"--sections: unknown {','.join(bad) or repr(args.sections)}; choose from {','.join(SECTIONS)}")
    if args.policies is not None:
        names = args.policies.split(",")
        known = BENCH_POLICIES + BENCH_BASELINES
        bad = [p for p in names if p not in known and split_commit_rule(p)[0] not in BENCH_POLICIES]
        if bad or not args.policies:
            fail(f"--policies: unknown {','.join(bad) or repr(args.policies)}; choose from {','.join(known)}")
    if args.backend != "auto":
        import torch

        from .generate.common import check_backend

        check_backend(args.backend, torch.device("cpu"))
    check_output_file(args.json, "--json")
    if args.plot is not None:
        require_matplotlib("--plot")
        check_output_file(args.plot, "--plot")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    _ensure_passive_omp()
    from ..bench import report

    t0 = time.perf_counter()
    result = run_bench(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["wall_s"] = time.perf_counter() - t0
    print(report.format_all(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot, window_frames=result["settings"]["rollout"]["window_frames"])
        ext = os.path.splitext(args.plot)[1].lower().lstrip(".")
        fmt = plot_format(args.plot)
        print(f"wrote {args.plot}" + (f" ({fmt.upper()})" if ext != fmt else ""))
    return 0
