"""pytest-benchmark suite of the C++ CPU sink attention at the Deep-Forcing streaming step.

    pytest benchmarks/bench_sink_attention_cpu.py --benchmark-only

One group per dtype (fp32, bf16), three entries each, same q, k, v (:func:`deepforcing_kernels.bench.ops.op_case_fns`):
``cpp`` (the fused op: 10-frame sink re-phased, attention mass returned), ``sdpa`` (PyTorch's
``scaled_dot_product_attention``: no re-phasing, no mass) and ``gemm`` (the bare ``Q K^T`` and ``P V`` batched
matmuls). Shape: 12 heads, D 128, 128 tokens per frame, queries 3 frames (384), cache 19 frames (2432).
GEMM FLOPs ``4 * B * H * Lq * Lk * D`` are in ``extra_info``. pytest-benchmark runs entries one after another,
so on a shared machine prefer the interleaved ratios of ``python -m deepforcing_kernels.bench.ops`` (targets:
cpp / sdpa <= 1.0 in fp32, <= 0.8 in bf16).
"""
import pytest
import torch

from deepforcing_kernels import available_backends
from deepforcing_kernels.bench.ops import op_case_fns

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENTRIES = ("cpp", "sdpa", "gemm")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bench_sink_attention_cpu(benchmark, dtype, entry):
    if entry == "cpp" and "cpp" not in available_backends("cpu"):
        pytest.skip("C++ extension not built")
    fns, meta = op_case_fns(dtype=DTYPES[dtype], rephase=True, mass=True, backends=("cpp",))
    fn = fns[entry]
    benchmark.group = f"sink_attention cpu {dtype} 12x128 Lq384 Lk2432"
    benchmark.extra_info.update(gflop=meta["gflop"], threads=torch.get_num_threads(), **meta["shape"])
    fn()  # warm-up (oneDNN kernel generation, allocator)
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
