"""pytest-benchmark cases of the run store's checkpoint path (what ``deepforcing generate`` does per save / block).

    pytest benchmarks/bench_checkpoint.py --benchmark-only

The Wan-1.3B geometry in full (30 layers, 1560 tokens per frame, about 5.5 GB) is measured by
``python -m deepforcing_kernels.bench.checkpoint``; here the same code runs at one layer of the real head geometry
(12 heads x D 128, bf16) with 256 tokens per frame (about 120 MB of state), so a round takes well under a second:

* ``snapshot``: what a save holds the generation loop for (``state_dict()`` + host copy), the term that sets the
  overhead at a time budget;
* ``state write``: the background part (``torch.save`` + fsync + rename);
* ``latents block``: one block ``[1, 3, 16, 60, 104]`` fp32 written as its own file (with fsync).
"""
import os

import pytest
import torch

from deepforcing_kernels.bench.checkpoint import _rollout_state, build_filled_cache
from deepforcing_kernels.runio import RunStore, atomic_save, retain_freed_host_memory, to_cpu


@pytest.fixture(scope="module")
def filled():
    retain_freed_host_memory()
    cache, frames = build_filled_cache(num_layers=1, tokens_per_frame=256)
    return cache, frames, torch.Generator().manual_seed(0)


def test_bench_checkpoint_snapshot(benchmark, filled):
    cache, frames, gen = filled
    benchmark.group = "checkpoint (1 layer, 256 tokens/frame, bf16)"
    pool = []
    state = benchmark(lambda: to_cpu(_rollout_state(cache, gen, frames), pool))
    assert state["cache"]["layers"][0]["k"].shape[1] == frames * 256


def test_bench_checkpoint_state_write(benchmark, filled, tmp_path):
    cache, frames, gen = filled
    benchmark.group = "checkpoint (1 layer, 256 tokens/frame, bf16)"
    state = {"format": "deepforcing-run-state/1", "frames_done": frames,
             "rollout": to_cpu(_rollout_state(cache, gen, frames))}
    path = str(tmp_path / "state.pt")
    n = benchmark(atomic_save, state, path)
    assert n == os.path.getsize(path) > 2 * cache.layers[0].keys().numel() * 2


def test_bench_checkpoint_latents_block(benchmark, tmp_path):
    benchmark.group = "checkpoint latents"
    store = RunStore(str(tmp_path / "run.pt"))
    store.lock()
    lat = torch.randn(1, 3, 16, 60, 104)
    benchmark(store.write_block, 0, lat)
    store.close()
    assert os.path.getsize(store.block_path(0)) > lat.numel() * 4
