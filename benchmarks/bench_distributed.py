"""pytest-benchmark suite of sequence parallelism on CPU: 2 Gloo ranks x 1 thread vs 1 process x 1 thread.

    pytest benchmarks/bench_distributed.py --benchmark-only

Runs :func:`deepforcing_kernels.bench.distributed.measure` once (it spawns the processes itself, alternating the
two configurations) and records its figures in ``extra_info``: the wall and CPU speed-ups per pass and the share
of a pass spent in collectives. The analytic GPU model is ``python -m deepforcing_kernels.bench.distributed
model`` (docs/distributed.md).
"""
from deepforcing_kernels.bench.distributed import measure


def test_bench_sequence_parallel_cpu(benchmark):
    benchmark.group = "sequence parallel, 2 CPU ranks vs 1 process"
    res = benchmark.pedantic(measure, kwargs={"repeats": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update({k: res[k] for k in ("single_pass_s", "sp2_pass_s", "speedup", "cpu_speedup",
                                                     "comm_share", "comm_bytes_per_pass_per_rank")})
    assert res["comm_bytes_per_pass_per_rank"] > 0 and res["sp2_pass_s"] > 0
