"""pytest-benchmark: one model pass with the text projected every pass vs prepared once (cross-attention cache).

    pytest benchmarks/bench_crossattn.py --benchmark-only

Compare the ``raw`` and ``prepared`` rows of the group (same model, same block).
"""
import pytest
import torch

from deepforcing_kernels.models import CausalWanModel, WanConfig, build_cache
from deepforcing_kernels.presets import make_policy


@pytest.mark.parametrize("mode", ["raw", "prepared"])
def test_bench_crossattn(benchmark, mode):
    cfg = WanConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=2, text_dim=4096, in_dim=16, out_dim=16,
                    latent_size=(16, 16))
    model = CausalWanModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, 4096, generator=g)
    x, t = torch.randn(1, 3, 16, 16, 16, generator=g), torch.full((1, 3), 500.0)
    cache = build_cache(model, make_policy("sliding"), latent_size=(16, 16), batch_size=1, dtype=torch.float32,
                        device=torch.device("cpu"))
    txt = model.prepare_text(text) if mode == "prepared" else text
    benchmark.group = "cross-attention cache (one pass)"
    with torch.no_grad():
        model(x, t, txt, cache=cache, start_frame=0)
        benchmark(lambda: model(x, t, txt, cache=cache, start_frame=0))
