"""pytest-benchmark suite of one streaming block per cache policy (the cache + attention path).

    pytest benchmarks/bench_rollout.py --benchmark-only

A block is what ``deepforcing bench`` times in its rollout section: 5 passes x 30 layers of
``cache.layers[l].attend(q, k, v, start_frame=f0)`` at 12 heads x D 128, 16 tokens per frame, bf16. Each cache is
first streamed past the 21-frame window (untimed), so every timed round is a steady-state block; rounds advance
the stream one block each (Deep Forcing alternates compress / append blocks, so an even number of rounds is
used). ``extra_info`` records the frames attended and the KV-cache bytes. For ratios between policies measured in
one run (the targets), use ``deepforcing bench``.
"""
import pytest
import torch

from deepforcing_kernels.bench.rollout import POLICY_NAMES, cache_bytes
from deepforcing_kernels.presets import make_policy

LAYERS, HEADS, D, TOKENS, PASSES, F = 30, 12, 128, 16, 5, 3


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_bench_block(benchmark, policy):
    from deepforcing_kernels import RopeSpec, StreamingKVCache

    cache = StreamingKVCache(make_policy(policy), num_layers=LAYERS, batch_size=1, num_heads=HEADS, head_dim=D,
                             tokens_per_frame=TOKENS, rope=RopeSpec.wan(D), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, F * TOKENS, HEADS, D, generator=g).to(torch.bfloat16) for _ in range(3))
    state = {"f0": 0}

    def block():
        f0 = state["f0"]
        for _ in range(PASSES):
            for layer in cache.layers:
                layer.attend(q, k, v, start_frame=f0)
        state["f0"] = f0 + F

    while state["f0"] < 27:  # past the window: steady state (Deep Forcing has compressed once)
        block()
    benchmark.pedantic(block, rounds=6, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(frames_in_cache=len(cache.layers[0]) / TOKENS, kv_cache_bytes=cache_bytes(cache),
                                tokens_per_frame=TOKENS, layers=LAYERS, passes=PASSES)
