"""pytest-benchmark suite of one Participative Compression step and of the attention it rides on.

    pytest benchmarks/bench_compression.py --benchmark-only

Same cases as ``deepforcing bench``'s compression section (:mod:`deepforcing_kernels.bench.compression`): at one
layer, the engine's step (its scorer and ``cache.compress_step``: Top-C selection, compaction of K/V and
bookkeeping, plus the refill of the augmented cache that every repeat needs, timed as ``refill``), next to the
attention of the pass that triggers it, 12 heads x D 128, bf16, augmented cache of 22 frames. Compare the
``compress`` and ``attention`` rows of one group; the target is compress <= 5 % of attention.
"""
import pytest
import torch

from deepforcing_kernels.bench.compression import CompressionGeometry, _case_fns

CASES = [(mode, tpf, part) for tpf in (16, 64) for mode in ("logits", "mass")
         for part in ("engine", "refill", "attention")]


@pytest.mark.parametrize("mode,tokens_per_frame,part", CASES, ids=[f"{m}-T{t}-{p}" for m, t, p in CASES])
def test_bench_compression(benchmark, mode, tokens_per_frame, part):
    fns = _case_fns(tokens_per_frame, torch.bfloat16, mode, CompressionGeometry(), "auto", 0)
    benchmark.group = f"compression {mode} T={tokens_per_frame}"
    fns[part]()  # warm-up
    benchmark(fns[part])
