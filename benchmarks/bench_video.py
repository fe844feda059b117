"""Video front end: streaming VAE decode, mp4 writing, and the memory of a long stream.

    pytest benchmarks/bench_video.py --benchmark-only     # per-block timings (pytest-benchmark)
    python benchmarks/bench_video.py [--frames 60 240]    # the figure: peak memory and frames/s, as JSON

The figure decodes a random latent stream of the tiny model's size (``WanVAE.tiny()``, 4 channels, 8 x 8 latents
-> 64 x 64 video, the tiny DiT's latent size) in blocks of 3 latent frames (Self-Forcing's block), each run in its
own process so its peak resident memory (``ru_maxrss``) is its own: streaming decode (+ writing the mp4) at 60
and at 240 latent frames should peak at the same memory, while one ``vae.decode`` of the whole stream grows with
it. Throughput: video frames per second of the streaming decode alone, of decode + H.264 writing, and of the tiny
DiT's rollout (``driver.generate``, deep_forcing policy) for comparison: the decoder keeps pace when its frames/s
is at least the rollout's.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

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

BLOCK = 3          # latent frames per block
LATENT = (8, 8)    # the tiny DiT's latent size


def _latents(frames, seed=0, channels=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, channels, *LATENT, generator=g)


def _stream(vae, lat, writer=None):
    dec = vae.stream_decoder()
    n = 0
    for i in range(0, lat.shape[1], BLOCK):
        frames = dec.decode(lat[:, i:i + BLOCK])
        n += frames.shape[1]
        if writer is not None:
            writer.write(frames)
        del frames
    return n


# ------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def vae():
    from deepforcing_kernels.video import WanVAE
    return WanVAE.tiny(seed=0)


def test_bench_stream_decode_block(benchmark, vae):
    """One block of 3 latent frames (12 video frames) through a warm stream decoder."""
    benchmark.group = "video decode"
    dec = vae.stream_decoder()
    lat = _latents(BLOCK * 64)
    dec.decode(lat[:, :1])
    it = iter(range(1, lat.shape[1] - BLOCK, BLOCK))
    benchmark(lambda: dec.decode(lat[:, (i := next(it)):i + BLOCK]))


def test_bench_decode_and_write_block(benchmark, vae, tmp_path):
    """The same block, then H.264-encoded by VideoWriter."""
    from deepforcing_kernels.video import VideoWriter
    benchmark.group = "video decode"
    dec = vae.stream_decoder()
    lat = _latents(BLOCK * 64)
    with VideoWriter(tmp_path / "bench.mp4") as w:
        w.write(dec.decode(lat[:, :1]))
        it = iter(range(1, lat.shape[1] - BLOCK, BLOCK))
        benchmark(lambda: w.write(dec.decode(lat[:, (i := next(it)):i + BLOCK])))


def test_bench_text_encoder_tiny(benchmark):
    from deepforcing_kernels.video import UMT5Encoder
    benchmark.group = "text encoder"
    enc = UMT5Encoder.tiny(seed=0)
    benchmark(lambda: enc(["a red fox runs through the snow"]))


# ------------------------------------------------------------------------------------------ the figure
def _child(mode, frames):
    """Run one decode in this process and print its peak RSS (MiB) and time."""
    from deepforcing_kernels.video import VideoWriter, WanVAE
    torch.set_num_threads(1)
    vae = WanVAE.tiny(seed=0)
    lat = _latents(frames)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "stream":
        n = _stream(vae, lat)
    elif mode == "stream_write":
        with tempfile.TemporaryDirectory() as d, VideoWriter(os.path.join(d, "x.mp4")) as w:
            n = _stream(vae, lat, w)
    elif mode == "oneshot":
        n = vae.decode(lat).shape[1]
    else:
        raise SystemExit(f"unknown mode {mode}")
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "latent_frames": frames, "video_frames": n, "seconds": dt,
                      "peak_rss_mib": peak / 1024, "rss_before_decode_mib": base / 1024}))


def _run_child(mode, frames):
    # large blocks by mmap and one malloc arena: freed tensors go back to the OS, so the peak RSS follows the
    # peak of live memory instead of the allocator's high-water mark
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if mode != "pace":  # (mmap per allocation costs time: not for the throughput run)
        env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(frames)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pace(frames):
    """In one process and one thread: video frames/s of the tiny DiT's rollout (deep_forcing policy) and of
    streaming decode + H.264 writing of what it produced."""
    from deepforcing_kernels.driver import generate
    from deepforcing_kernels.models import CausalWanModel, WanConfig
    from deepforcing_kernels.presets import make_policy
    from deepforcing_kernels.video import VideoWriter, WanVAE
    torch.set_num_threads(1)
    model = CausalWanModel(WanConfig.tiny()).eval()
    vae = WanVAE.tiny(seed=0)
    text = torch.randn(1, 16, 32)
    generate(model, text, BLOCK, make_policy("deep_forcing"), progress=False).run()  # warm-up
    _stream(vae, _latents(BLOCK + 1))
    t0 = time.perf_counter()
    lat = generate(model, text, frames, make_policy("deep_forcing"), progress=False).run()
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with VideoWriter(os.path.join(d, "x.mp4")) as w:
            n = _stream(vae, lat.float(), w)
        t_dec = time.perf_counter() - t0
    print(json.dumps({"mode": "pace", "latent_frames": frames, "video_frames": n,
                      "generation_video_fps": n / t_gen, "decode_write_video_fps": n / t_dec}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[60, 240])
    p.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    p.add_argument("--oneshot", action="store_true", help="also one vae.decode of the whole stream (contrast)")
    p.add_argument("--pace-frames", type=int, default=24, help="latent frames of the generation-vs-decode run")
    args = p.parse_args(argv)
    if args.child:
        if args.child[0] == "pace":
            _pace(int(args.child[1]))
        else:
            _child(args.child[0], int(args.child[1]))
        return
    rows = []
    modes = ["stream_write"] + (["oneshot"] if args.oneshot else [])
    for mode in modes:
        for f in args.frames:
            rows.append(_run_child(mode, f))
            r = rows[-1]
            print(f"{mode:13s} {f:4d} latent frames -> {r['video_frames']:4d} video frames: peak RSS "
                  f"{r['peak_rss_mib']:7.1f} MiB (before decode {r['rss_before_decode_mib']:7.1f}), "
                  f"{r['video_frames'] / r['seconds']:6.1f} frames/s", file=sys.stderr)
    fig = {"rows": rows}
    try:
        fig["pace"] = _run_child("pace", args.pace_frames)
        print(f"pace: tiny DiT rollout {fig['pace']['generation_video_fps']:.1f} video frames/s, decode + write "
              f"{fig['pace']['decode_write_video_fps']:.1f} video frames/s (one thread each)", file=sys.stderr)
    except subprocess.CalledProcessError as e:  # the driver's API may move; the decode figures stand alone
        fig["pace"] = {"error": (e.stderr or "").strip().splitlines()[-1:]}
    print(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
