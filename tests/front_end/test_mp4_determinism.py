"""The same frames give the same mp4 bytes: repeated segmented runs (same prompt, seed, settings) in one process,
with other work on the thread between them, write byte-identical segments that decode to identical frames.

libx264's AVX-512 kernels broke this (see :mod:`deepforcing_kernels.video.writer`): on a CPU with AVX-512 the
first test fails when the writer lets libx264 pick them; without AVX-512 it holds trivially."""
import hashlib

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")

from deepforcing_kernels.pipeline import VideoPipeline, segment_path  # noqa: E402
from deepforcing_kernels.video.writer import x264_params  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
F = 12  # latent frames -> 45 video frames


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.tiny(1)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _dirty(seed):
    """Work on the calling thread whose register / scratch contents differ with ``seed`` (what a rollout does
    between two writes)."""
    a = torch.randn(257, 131, generator=torch.Generator().manual_seed(seed))
    (a @ a.T).exp_().sum()


def test_segmented_runs_repeated_are_byte_identical(pipe, tmp_path):
    runs = []
    for r in range(4):
        d = tmp_path / f"r{r}"
        d.mkdir()
        _dirty(r)
        res = pipe.write(d / "o.mp4", "a fox", F, seed=0, progress=False, segment_frames=8)
        assert res.paths == [segment_path(d / "o.mp4", k) for k in range(6)]
        runs.append(res.paths)
    first = [_digest(p) for p in runs[0]]
    frames = [_decode(p) for p in runs[0]]
    for paths in runs[1:]:
        assert [_digest(p) for p in paths] == first
        for p, want in zip(paths, frames):
            assert np.array_equal(_decode(p), want)


def test_x264_params_pin_the_kernels_only_where_avx512_is():
    opts = x264_params()
    assert opts in ({}, {"x264-params": "asm=AVX2,Cache64"})
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert bool(opts) == ({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags)
