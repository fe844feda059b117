"""VideoWriter: H.264 yuv420p mp4s that PyAV reads back, odd sizes, interrupted and failed writes."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

av = pytest.importorskip("av")

from support import sigint_default  # noqa: E402

from deepforcing_kernels.video import VideoWriter  # noqa: E402


def _read(path):
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        return st.codec_context.name, st.codec_context.pix_fmt, st.average_rate, frames


def _ramp(t, h, w):
    """Smooth frames in [-1, 1] (a moving gradient: little for the codec to lose)."""
    y = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    x = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    k = torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1) / max(t, 1)
    r = (0.6 * y + 0.3 * k).expand(t, 1, h, w)
    return torch.cat([r, (0.6 * x - 0.2).expand(t, 1, h, w), (0.5 * (x * y) + 0.1 * k).expand(t, 1, h, w)], 1)


@pytest.mark.parametrize("h,w,even,want", [(32, 48, "pad", (32, 48)), (33, 17, "pad", (34, 18)),
                                           (33, 17, "crop", (32, 16))])
def test_roundtrip(tmp_path, h, w, even, want):
    out = tmp_path / "v.mp4"
    frames = _ramp(9, h, w)
    with VideoWriter(out, fps=16, even=even) as wr:
        wr.write(frames[:1])            # [T, 3, H, W]
        wr.write(frames[None, 1:5])     # [1, T, 3, H, W]
        wr.write(frames[5:])
        assert not out.exists()         # not under its final name until closed
    assert wr.final_path == out and not list(tmp_path.glob(".*writing*"))
    codec, pix, rate, got = _read(out)
    assert codec == "h264" and pix == "yuv420p" and rate == 16
    assert len(got) == 9 and got[0].shape == (*want, 3)
    ref = ((frames.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    hh, ww = min(h, want[0]), min(w, want[1])
    err = (torch.from_numpy(got[4]).float()[:hh, :ww] - ref[4, :hh, :ww]).abs().mean()
    assert err < 4, err  # the right picture, in order (colour conversion + H.264 at crf 18)
    if even == "pad" and (h, w) != want:  # padding repeats the last row / column
        edge = torch.from_numpy(got[4]).float()
        assert (edge[-1] - edge[-2]).abs().mean() < 3


def test_exception_keeps_a_playable_partial(tmp_path):
    out = tmp_path / "run.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out) as wr:
            wr.write(_ramp(5, 16, 16))
            raise RuntimeError("boom")
    assert not out.exists()
    part = tmp_path / "run.partial.mp4"
    assert wr.final_path == part and len(_read(part)[3]) == 5
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, on_error="keep") as wr:
            wr.write(_ramp(3, 16, 16))
            raise KeyboardInterrupt
    assert len(_read(out)[3]) == 3
    with pytest.raises(ValueError):
        with VideoWriter(tmp_path / "gone.mp4", on_error="delete") as wr:
            wr.write(_ramp(3, 16, 16))
            wr.write(_ramp(1, 8, 8))  # size change: ValueError
    assert not (tmp_path / "gone.mp4").exists() and not (tmp_path / "gone.partial.mp4").exists()
    assert not list(tmp_path.glob(".*writing*"))


def test_no_frames_leaves_nothing(tmp_path):
    with VideoWriter(tmp_path / "empty.mp4") as wr:
        pass
    assert wr.final_path is None and list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoWriter(tmp_path / "no" / "x.mp4")
    with pytest.raises(ValueError, match=".mp4"):
        VideoWriter(tmp_path / "x.avi")
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "x.mp4", fps=0)
    wr = VideoWriter(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="B = 1"):
        wr.write(torch.zeros(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        wr.write(torch.zeros(1, 8, 8, 3))
    wr.abort("delete")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(PermissionError, match="cannot write"):
            VideoWriter(ro / "x.mp4")
    finally:
        os.chmod(ro, 0o700)


def test_sigint_leaves_a_playable_file(tmp_path):
    """A process stopped by SIGINT in the middle of a stream leaves the frames written so far, playable."""
    out = tmp_path / "live.mp4"
    script = textwrap.dedent(f"""
        import sys, time, torch
        from deepforcing_kernels.video import VideoWriter
        with VideoWriter({str(out)!r}, on_error="keep") as w:
            for i in range(100000):
                w.write(torch.rand(4, 3, 32, 32) * 2 - 1)
                if i == 2:
                    print("ready", flush=True)
                time.sleep(0.01)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=sigint_default)
    try:
        assert p.stdout.readline().strip() == b"ready", p.stderr.read().decode()
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and b"KeyboardInterrupt" in p.stderr.read()
    codec, pix, _, got = _read(out)
    assert codec == "h264" and len(got) >= 12 and got[0].shape == (32, 32, 3)
    assert not list(Path(tmp_path).glob(".*writing*"))


def test_tiny_front_end_end_to_end(tmp_path):
    """prompt -> tiny umT5 -> tiny DiT rollout -> streaming VAE decode -> mp4, block by block: the mp4 has
    1 + 4 (F - 1) frames of 8x the latent size, and they are the one-shot decode of the latents."""
    pytest.importorskip("diffusers")
    from deepforcing_kernels.driver import generate
    from deepforcing_kernels.models import CausalWanModel, WanConfig
    from deepforcing_kernels.presets import make_policy
    from deepforcing_kernels.video import UMT5Encoder, WanVAE

    enc, vae = UMT5Encoder.tiny(seed=0), WanVAE.tiny(seed=0)
    model = CausalWanModel(WanConfig.tiny()).eval()
    text = enc(["a red fox"])
    dec = vae.stream_decoder()
    blocks = []
    with VideoWriter(tmp_path / "fox.mp4") as w:
        for block in generate(model, text, 6, make_policy("deep_forcing"), seed=0, progress=False):
            blocks.append(block)
            w.write(dec.decode(block))
    lat = torch.cat(blocks, 1)
    _, _, _, got = _read(tmp_path / "fox.mp4")
    assert len(got) == 1 + 4 * (6 - 1) and got[0].shape == (64, 64, 3)
    want = ((vae.decode(lat)[0] + 1) * 127.5).round().permute(0, 2, 3, 1)
    luma = torch.tensor([0.299, 0.587, 0.114])  # noise loses its chroma to yuv420p; compare brightness
    frame = torch.from_numpy(got[7]).float() @ luma
    right, wrong = (frame - want[7] @ luma).abs().mean(), (frame - want[13] @ luma).abs().mean()
    assert right < 0.5 * wrong, (right, wrong)  # frame 7 of the file is frame 7 of the decode


def test_same_bytes_as_plain_pyav(tmp_path):
    """The writer's mp4 is byte for byte the one PyAV writes converting each frame with its own
    ``VideoFrame.reformat`` (the writer keeps one colour converter for the whole video)."""
    from fractions import Fraction

    import numpy as np

    from deepforcing_kernels.video.writer import frames_to_uint8, x264_params

    g = torch.Generator().manual_seed(3)
    frames = torch.rand(10, 3, 24, 40, generator=g) * 2 - 1  # noise: every pixel matters to the codec
    out = tmp_path / "w.mp4"
    with VideoWriter(out, fps=16) as wr:
        wr.write(frames[:4])
        wr.write(frames[4:])
    ref = tmp_path / "ref.mp4"
    arr = frames_to_uint8(frames)
    with av.open(str(ref), mode="w", format="mp4") as c:
        st = c.add_stream("libx264", rate=16)
        st.width, st.height, st.pix_fmt = 40, 24, "yuv420p"
        st.time_base = 1 / Fraction(16)
        st.options = {"crf": "18", "preset": "fast", **x264_params()}
        for i in range(arr.shape[0]):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24").reformat(format="yuv420p")
            f.pts = i
            for p in st.encode(f):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    assert out.read_bytes() == ref.read_bytes()
