"""The streaming pipeline on the tiny model: time to first frame, steady frames/s, and a long segmented run.

    python -m deepforcing_kernels.bench.stream                        # both parts, text summary
    python -m deepforcing_kernels.bench.stream --long-frames 6000 --segment-frames 300 --json out/stream.json
    python -m deepforcing_kernels.bench.stream --skip-long            # the short part only

Needs the ``video`` extra. Everything runs :class:`~deepforcing_kernels.pipeline.VideoPipeline.tiny` (random
weights: the video is noise) on the CPU, one thread by default (a shared machine; ``--threads`` to change).

* **first frame / steady**: ``pipe.frames(prompt, F)`` from the call (text encoding included) to the first decoded
  chunk; then video frames per second of generation alone (the rollout's time), of decoding alone, and end to end
  (``pipe.write`` of an mp4: generate + decode + H.264), over the chunks after the first.
* **long run**: ``pipe.write`` of ``--long-frames`` latent frames (``1 + 4 (F - 1)`` video frames) into segments
  of ``--segment-frames`` video frames, at a tiny latent size (default 4 x 4 -> 32 x 32 video). At each
  ``--probe-every`` latent frames it records the process's resident memory (``/proc/self/statm``, current, not
  peak) and the bytes on disk (finished segments plus the open one's temporary file). Flat RSS and bytes linear
  in frames are the claims.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["run_first_frame", "run_long", "rss_mib", "main"]


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def _pipe(seed: int, latent_size: Sequence[int], vae_dim: int, policy: str):
    from ..pipeline import VideoPipeline

    return VideoPipeline.tiny(seed, latent_size=tuple(latent_size), vae_dim=vae_dim, policy=policy)


def run_first_frame(*, frames: int = 30, latent_size: Sequence[int] = (8, 8), vae_dim: int = 8,
                    policy: str = "deep_forcing", seed: int = 0, pipe: Any = None) -> Dict[str, Any]:
    """Time to first decoded frame and steady video frames/s (generation, decoding, end to end)."""
    pipe = pipe or _pipe(seed, latent_size, vae_dim, policy)
    prompt = "a red fox runs through the snow"
    list(pipe.frames(prompt, 3, seed=seed, progress=False))  # warm-up (first-call costs of torch / diffusers)
    t0 = time.perf_counter()
    stream = pipe.frames(prompt, frames, seed=seed, progress=False)
    first = next(stream)
    ttff = time.perf_counter() - t0
    rest = list(stream)
    vf = sum(c.frames.shape[1] for c in rest)
    gen_s, dec_s = sum(c.gen_s for c in rest), sum(c.decode_s for c in rest)
    with tempfile.TemporaryDirectory() as d:
        seen: List[Any] = []
        t1 = time.perf_counter()
        res = pipe.write(Path(d) / "v.mp4", prompt, frames, seed=seed, progress=False,
                         on_block=lambda c, r: seen.append(time.perf_counter()))
        t_end = time.perf_counter() - t1
        e2e_steady = (res.frames - first.frames.shape[1]) / (seen[-1] - seen[0]) if len(seen) > 1 else float("nan")
    return {"latent_size": list(pipe.latent_size), "video_size": list(pipe.pixel_size), "latent_frames": frames,
            "video_frames": res.frames, "time_to_first_frame_s": ttff, "first_chunk_frames": first.frames.shape[1],
            "first_chunk_gen_s": first.gen_s, "first_chunk_decode_s": first.decode_s,
            "steady_generation_fps": vf / gen_s, "steady_decode_fps": vf / dec_s,
            "steady_end_to_end_fps": e2e_steady, "write_total_s": t_end, "write_s": res.write_s,
            "decode_write_fps": res.frames / (res.decode_s + res.write_s),
            "generation_fps": res.frames / res.gen_s, "bytes": res.bytes, "threads": torch.get_num_threads()}


def run_long(*, frames: int = 6000, segment_frames: int = 300, probe_every: int = 600,
             latent_size: Sequence[int] = (4, 4), vae_dim: int = 8, policy: str = "deep_forcing", seed: int = 0,
             out_dir: Optional[str] = None, keep: bool = False, pipe: Any = None) -> Dict[str, Any]:
    """A long segmented write; RSS and bytes on disk at every ``probe_every`` latent frames."""
    pipe = pipe or _pipe(seed, latent_size, vae_dim, policy)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory()
        out_dir = tmp.name
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    probes: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    next_probe = [probe_every]
    max_open = [0]

    def on_block(chunk, run):
        open_files = sum(1 for p in d.iterdir() if ".writing" in p.name)
        max_open[0] = max(max_open[0], open_files)
        if chunk.latent_end >= next_probe[0] or chunk.latent_end >= frames:
            probes.append({"latent_frames": chunk.latent_end, "video_frames": chunk.frame_end, "rss_mib": rss_mib(),
                           "bytes": _dir_bytes(d), "segments_done": len(run.paths),
                           "elapsed_s": time.perf_counter() - t0})
            next_probe[0] += probe_every

    try:
        res = pipe.write(d / "long.mp4", "a red fox runs through the snow", frames, seed=seed,
                         segment_frames=segment_frames, progress=False, on_block=on_block)
        wall = time.perf_counter() - t0
        out = {"latent_size": list(pipe.latent_size), "video_size": list(pipe.pixel_size), "latent_frames": frames,
               "video_frames": res.frames, "segment_frames": segment_frames, "segments": len(res.paths),
               "max_open_files": max_open[0], "bytes": res.bytes, "wall_s": wall,
               "generation_fps": res.frames / res.gen_s, "decode_fps": res.frames / res.decode_s,
               "decode_write_fps": res.frames / (res.decode_s + res.write_s), "end_to_end_fps": res.frames / wall,
               "probes": probes, "threads": torch.get_num_threads(), "vae_dim": vae_dim}
        by = {p["latent_frames"]: p for p in probes}
        lo = min(by)
        hi = max(by)
        out["rss_mib_at"] = {str(lo): by[lo]["rss_mib"], str(hi): by[hi]["rss_mib"]}
        out["bytes_at"] = {str(lo): by[lo]["bytes"], str(hi): by[hi]["bytes"]}
        out["bytes_per_video_frame_at"] = {str(lo): by[lo]["bytes"] / by[lo]["video_frames"],
                                           str(hi): by[hi]["bytes"] / by[hi]["video_frames"]}
        return out
    finally:
        if tmp is not None and not keep:
            tmp.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=30, help="latent frames of the first-frame / steady part")
    ap.add_argument("--latent", type=int, nargs=2, default=(8, 8), help="latent size of that part (8 8 -> 64x64)")
    ap.add_argument("--long-frames", type=int, default=6000, help="latent frames of the long run")
    ap.add_argument("--long-latent", type=int, nargs=2, default=(4, 4), help="latent size of the long run")
    ap.add_argument("--segment-frames", type=int, default=300, help="video frames per segment of the long run")
    ap.add_argument("--probe-every", type=int, default=600, help="latent frames between memory probes")
    ap.add_argument("--vae-dim", type=int, default=8, help="width of the tiny VAE (8 = WanVAE.tiny's)")
    ap.add_argument("--policy", default="deep_forcing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-short", action="store_true")
    ap.add_argument("--out-dir", default=None, help="keep the long run's segments here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(a.threads)
    res: Dict[str, Any] = {}
    if not a.skip_short:
        s = res["first_frame"] = run_first_frame(frames=a.frames, latent_size=a.latent, vae_dim=a.vae_dim,
                                                 policy=a.policy)
        print(f"tiny model {s['latent_size'][0]}x{s['latent_size'][1]} latents -> {s['video_size'][0]}x"
              f"{s['video_size'][1]} video, {a.frames} latent frames: first decoded frame after "
              f"{s['time_to_first_frame_s'] * 1e3:.0f} ms; steady video frames/s: generation "
              f"{s['steady_generation_fps']:.1f}, decode {s['steady_decode_fps']:.1f}, end to end (mp4) "
              f"{s['steady_end_to_end_fps']:.1f}; decode+write {s['decode_write_fps']:.1f} vs generation "
              f"{s['generation_fps']:.1f}", flush=True)
    if not a.skip_long:
        r = res["long"] = run_long(frames=a.long_frames, segment_frames=a.segment_frames, probe_every=a.probe_every,
                                   latent_size=a.long_latent, vae_dim=a.vae_dim, policy=a.policy,
                                   out_dir=a.out_dir, keep=a.out_dir is not None)
        ks = list(r["rss_mib_at"])
        print(f"long run: {r['latent_frames']} latent frames ({r['video_frames']} video frames, "
              f"{r['video_size'][0]}x{r['video_size'][1]}) in {r['segments']} segments of {r['segment_frames']} "
              f"frames, {r['wall_s']:.0f} s; RSS {r['rss_mib_at'][ks[0]]:.1f} MiB at {ks[0]} frames, "
              f"{r['rss_mib_at'][ks[1]]:.1f} MiB at {ks[1]}; bytes {r['bytes_at'][ks[0]]} at {ks[0]}, "
              f"{r['bytes_at'][ks[1]]} at {ks[1]} ({r['bytes_per_video_frame_at'][ks[0]]:.1f} and "
              f"{r['bytes_per_video_frame_at'][ks[1]]:.1f} bytes/frame); video frames/s: generation "
              f"{r['generation_fps']:.1f}, decode {r['decode_fps']:.1f}, decode+write {r['decode_write_fps']:.1f}, "
              f"end to end {r['end_to_end_fps']:.1f}; at most {r['max_open_files']} file open", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
