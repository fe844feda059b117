"""The streaming pipeline (prompt -> rollout -> streaming decode -> mp4) on the tiny model.

    pytest benchmarks/bench_stream.py --benchmark-only       # per-block timings (pytest-benchmark)
    python benchmarks/bench_stream.py [--long-frames 6000]   # the figures (python -m deepforcing_kernels.bench.stream)

The pytest cases time one block of each stage at the tiny model's size (8 x 8 latents -> 64 x 64 video, blocks of
3 latent frames = 12 video frames): the rollout's block, its streaming decode, and generate + decode + H.264 of a
block through :meth:`VideoPipeline.open`; compare the rows of the group (the decoder keeps pace when its time per
block is at most the rollout's). The script form gives time to first decoded frame, steady frames/s and the long
segmented run (RSS at 600 and 6000 latent frames, bytes on disk at both); see
:mod:`deepforcing_kernels.bench.stream`.
"""
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import av  # noqa: F401
    import diffusers  # noqa: F401
except ImportError:  # the optional `video` extra
    if __name__ != "__main__":
        pytest.skip('needs pip install "deepforcing_kernels[video]"', allow_module_level=True)
    raise


@pytest.fixture(scope="module")
def pipe():
    from deepforcing_kernels.pipeline import VideoPipeline

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield VideoPipeline.tiny(0)
    torch.set_num_threads(saved)


def _endless(pipe):
    """Chunks of a stream long enough never to end during a benchmark."""
    return pipe.frames("a red fox", 3 * 100000, seed=0, progress=False)


def test_bench_stream_generate_block(benchmark, pipe):
    s = _endless(pipe)
    next(s)
    benchmark.group = "stream: one block (3 latent = 12 video frames)"
    benchmark(lambda: next(s.rollout))


def test_bench_stream_decode_block(benchmark, pipe):
    s = _endless(pipe)
    next(s)
    block = next(s.rollout)
    dec = s.decoder
    benchmark.group = "stream: one block (3 latent = 12 video frames)"
    benchmark(lambda: dec.decode(block))


def test_bench_stream_end_to_end_block(benchmark, pipe):
    with tempfile.TemporaryDirectory() as d:
        run = pipe.open(Path(d) / "v.mp4", "a red fox", 3 * 100000, seed=0, progress=False, segment_frames=600,
                        resumable=False)
        with run:
            next(run)
            benchmark.group = "stream: one block (3 latent = 12 video frames)"
            benchmark(lambda: next(run))


if __name__ == "__main__":
    from deepforcing_kernels.bench.stream import main

    raise SystemExit(main(sys.argv[1:]))
