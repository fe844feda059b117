"""Segmented output and resume: segments hold exactly N frames and concatenate to the one-file video; the stream
decoder's state round-trips; a stopped pipeline run resumed from its state equals a straight run."""
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")

from deepforcing_kernels.pipeline import VideoPipeline, segment_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
F = 12  # latent frames -> 45 video frames, chunks end at 9, 21, 33, 45


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.tiny(1, latent_size=(4, 4))


def _read(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_decoder_state_round_trip_equals_uninterrupted(pipe):
    vae = pipe.vae
    lat = torch.randn(1, 10, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(lat)
    dec = vae.stream_decoder()
    a = dec.decode(lat[:, :4])
    state = _roundtrip(dec.state_dict())
    assert state["latent_frames"] == 4 and state["shape"] == [1, 4, 4] and state["rep"] == []
    b = dec.decode(lat[:, 4:7])  # the original decoder goes on; the state is a copy, unaffected
    dec2 = vae.stream_decoder()
    dec2.load_state_dict(state)
    b2, c2 = dec2.decode(lat[:, 4:7]), dec2.decode(lat[:, 7:])
    assert torch.equal(b, b2)
    assert torch.equal(torch.cat([a, b2, c2], 1), whole)
    # a stream's first frame leaves "Rep" markers in the temporal upsamplers: they round-trip too
    d1 = vae.stream_decoder()
    d1.decode(lat[:, :1])
    s1 = _roundtrip(d1.state_dict())
    assert s1["rep"]
    d2 = vae.stream_decoder()
    d2.load_state_dict(s1)
    assert torch.equal(torch.cat([vae.decode(lat[:, :1]), d2.decode(lat[:, 1:5])], 1), vae.decode(lat[:, :5]))
    fresh = vae.stream_decoder().state_dict()
    assert fresh["latent_frames"] == 0 and all(c is None for c in fresh["cache"])


def test_decoder_state_bad_input(pipe):
    dec = pipe.vae.stream_decoder()
    with pytest.raises(ValueError, match="StreamDecoder.state_dict"):
        dec.load_state_dict({"format": "x"})
    s = dec.state_dict()
    s["cache"] = s["cache"][:-1]
    with pytest.raises(ValueError, match="causal convolutions"):
        dec.load_state_dict(s)
    s = dec.state_dict()
    s["cache"][0] = "junk"
    with pytest.raises(ValueError, match=r"cache\[0\]"):
        dec.load_state_dict(s)


def _write(pipe, out, **kw):
    frames = []
    res = pipe.write(out, "a red fox", F, seed=5, progress=False,
                     on_block=lambda c, r: frames.append(c.frames), **kw)
    return res, torch.cat(frames, 1)


@pytest.fixture(scope="module")
def straight(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    res, frames = _write(pipe, d / "one.mp4")
    return res, frames, _read(d / "one.mp4")


@pytest.mark.parametrize("n", [10, 21])
def test_segments_hold_n_frames_and_concatenate_to_the_one_file(pipe, tmp_path, straight, n):
    one_res, one_frames, one = straight
    res, frames = _write(pipe, tmp_path / "seg.mp4", segment_frames=n)
    assert torch.equal(frames, one_frames)  # the same stream, pre-encoding
    want = [segment_path(tmp_path / "seg.mp4", k) for k in range(-(-45 // n))]
    assert res.paths == want and sorted(tmp_path.iterdir()) == sorted(want)
    parts = [_read(p) for p in want]
    assert [len(p) for p in parts] == [min(n, 45 - k * n) for k in range(len(want))]
    cat = np.concatenate(parts)
    assert cat.shape == one.shape == (45, 32, 32, 3)
    # lossy codec, different GOPs: each frame close to its twin, and much closer than to its neighbour
    err = np.abs(cat.astype(np.float32) - one.astype(np.float32)).mean(axis=(1, 2, 3))
    shifted = np.abs(cat[1:].astype(np.float32) - one[:-1].astype(np.float32)).mean(axis=(1, 2, 3))
    assert err.max() < 0.5 * shifted.min(), (err.max(), shifted.min())
    assert res.bytes == sum(p.stat().st_size for p in want)


@pytest.mark.parametrize("n, stop_after, saved_at", [(20, 21, 21), (20, 33, 33), (21, 21, 21), (None, 21, 21),
                                                     (10, 9, 9), (20, 33, 9)])
def test_resume_of_a_pipeline_run_equals_a_straight_run(pipe, tmp_path, n, stop_after, saved_at):
    """Save the state after the chunk ending at video frame ``saved_at``, stop after the one ending at
    ``stop_after`` (KeyboardInterrupt, as Ctrl-C); resume from the state: the final files decode to exactly the
    frames of an uninterrupted run's files (an older state rewrites the segments written after it)."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref, _ = _write(pipe, ref_dir / "v.mp4", segment_frames=n)
    saved = {}

    def stop(chunk, run):
        if chunk.frame_end == saved_at:
            saved["state"] = _roundtrip(run.state_dict())
        if chunk.frame_end == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.write(run_dir / "v.mp4", "a red fox", F, seed=5, progress=False, segment_frames=n, on_block=stop)
    st = saved["state"]
    if n is not None and saved_at % n:  # an open segment: its anchor holds the latents from its first block
        assert st["anchor"] is not None and st["anchor"]["frame_start"] <= st["open_start"] < saved_at
        assert st["anchor"]["latents"].shape[1] <= n // 4 + 3 + 1
        assert any(".partial" in p.name for p in run_dir.iterdir())
    res = pipe.write(run_dir / "v.mp4", "a red fox", F, seed=5, progress=False, segment_frames=n, resume=st)
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(p.name for p in ref_dir.iterdir()), names  # no .partial / temporary left
    for p in ref.paths:
        a, b = _read(p), _read(run_dir / p.name)
        assert a.shape == b.shape and np.array_equal(a, b), p.name  # same frames in, same encoder: equal
    assert res.frames == 45 and [p.name for p in res.paths] == [p.name for p in ref.paths]


def test_resume_rejects_other_settings(pipe, tmp_path):
    saved = {}

    def stop(chunk, run):
        saved["state"] = run.state_dict()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.write(tmp_path / "v.mp4", "a", 6, seed=0, progress=False, segment_frames=10, on_block=stop)
    with pytest.raises(ValueError, match="segment_frames was 10"):
        pipe.write(tmp_path / "v.mp4", "a", 6, seed=0, progress=False, segment_frames=12, resume=saved["state"])
    with pytest.raises(ValueError, match="cannot resume: seed"):
        pipe.write(tmp_path / "v.mp4", "a", 6, seed=1, progress=False, segment_frames=10, resume=saved["state"])
    with pytest.raises(ValueError, match="cannot resume: the prompt"):  # refused like a seed, not continued
        pipe.write(tmp_path / "v.mp4", "b", 6, seed=0, progress=False, segment_frames=10, resume=saved["state"])
    with pytest.raises(ValueError, match="VideoRun.state_dict"):
        pipe.write(tmp_path / "v.mp4", "a", 6, seed=0, progress=False, resume={"format": "nope"})
    assert not Path(tmp_path / "v_00001.mp4").exists()


def test_a_killed_runs_temporary_is_removed_when_its_segment_reopens(pipe, tmp_path):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".v_00000.{dead.pid}.writing.mp4"
    stale.write_bytes(b"half")
    alive = tmp_path / f".v_00000.{os.getppid()}.writing.mp4"  # another live process's: left alone
    alive.write_bytes(b"busy")
    pipe.write(tmp_path / "v.mp4", "a", 3, seed=0, progress=False, segment_frames=100)
    assert not stale.exists() and alive.exists() and (tmp_path / "v_00000.mp4").exists()
