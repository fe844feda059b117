"""pytest-benchmark suite of the Triton sink attention on CUDA (skipped without a GPU).

    pytest benchmarks/bench_triton_attention.py --benchmark-enable

Shapes follow docs/spec.md section 6: one block of queries (3 frames) over a Wan cache, 12 heads, head_dim 128, bf16.
FLOPs of the forward: ``4 * B * Hq * Lq * Lk * D`` (QK^T and PV) plus ``2 * B * Hq * Lq * sink_len * D`` for the
low-part dot of re-phased tiles; the mass pass adds ``2 * B * Hq * (m1 - m0) * Lk * D``. ``extra_info`` records
TFLOP/s so runs on different GPUs can be compared.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("the Triton benchmarks need a CUDA GPU", allow_module_level=True)

from deepforcing_kernels import RopeSpec, sink_attention  # noqa: E402

TOKENS_PER_FRAME = 1560
CASES = [  # (name, cache frames, sink frames, return_mass)
    ("sliding_21f", 21, 0, False),
    ("deep_sink_21f", 21, 14, False),
    ("deep_forcing_16f_mass", 16 + 3, 10, True),
]


@pytest.mark.parametrize("name,frames,sink_frames,mass", CASES, ids=[c[0] for c in CASES])
def test_bench_sink_attention(benchmark, name, frames, sink_frames, mass):
    B, H, D = 1, 12, 128
    Lq, Lk, sink = 3 * TOKENS_PER_FRAME, frames * TOKENS_PER_FRAME, sink_frames * TOKENS_PER_FRAME
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, Lq, H, D, device=dev, dtype=dt)
    k = torch.randn(B, Lk, H, D, device=dev, dtype=dt)
    v = torch.randn(B, Lk, H, D, device=dev, dtype=dt)
    kw = dict(rope=RopeSpec.wan(D), sink_len=sink, sink_shift=7 if sink else 0, return_mass=mass,
              backend="triton")

    def run():
        sink_attention(q, k, v, **kw)
        torch.cuda.synchronize()

    run()  # compile outside the timing
    benchmark(run)
    flops = 4 * B * H * Lq * Lk * D + 2 * B * H * Lq * sink * D + (2 * B * H * Lq * Lk * D if mass else 0)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
