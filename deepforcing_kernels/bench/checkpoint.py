"""Checkpoint cost of ``deepforcing generate``: bytes and seconds per block at the Wan-1.3B cache geometry against
the paper's per-block time, and bytes written per block for a tiny run, before and after the run store.

    python -m deepforcing_kernels.bench.checkpoint [--layers 30] [--tiny-frames 300] [--json PATH]

1. **1.3B geometry.** A :class:`StreamingKVCache` of Wan2.1-1.3B's shape (30 layers, 12 heads, D 128, 1560 tokens
   per frame, bf16, deep-forcing) is filled to its 21-frame window without running the model: a one-token-per-frame
   cache runs the real schedule on random tensors, and its state (schedule, frames, reuse counts, mass) is blown up
   to 1560 tokens per frame with cheap K/V and loaded through ``load_state_dict``. The resume state (cache +
   generator) is then saved the way the command saves it (:class:`~deepforcing_kernels.runio.StateSaver`: host
   snapshot, then one atomic write with fsync in a background thread), and a block's latents
   ``[1, 3, 16, 60, 104]`` fp32 are written as the command writes them (copied and queued in the loop, written
   with fsync by the same writer thread). Reported: state bytes, the seconds a save
   holds the generation loop (``blocked_s``), the write's own seconds, the latents' seconds in the loop and in
   the writer, and from them
   the checkpoint seconds per block at a ``--budget-s`` save interval (default 60 s, the command's default):
   ``latents_loop_s + blocked_s * block_s / budget_s``, as a share of ``--block-s`` (0.77 s, the paper's H100
   block). Also what the earlier design cost: the whole state written synchronously after every block.
2. **Tiny run.** ``deepforcing generate --model tiny --frames 300`` (default settings), counting every byte the
   run store writes, against the single-file design it replaced (the whole run, latents so far + state,
   rewritten after every block), computed on the same rollout.

On a machine without a GPU the snapshot is a CPU memory copy (on a GPU it is a device-to-host copy of the same
bytes); the disk is whatever ``--dir`` is on. Figures are measured, never assumed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..formats import ROLLOUT_STATE_FORMAT

PAPER_BLOCK_S = 0.77  # Deep Forcing paper: seconds per 3-frame block on an H100 (Wan2.1-1.3B, Self-Forcing)
WAN13B = dict(num_layers=30, num_heads=12, head_dim=128, tokens_per_frame=1560, latent=(16, 60, 104))


def build_filled_cache(num_layers: int = 30, tokens_per_frame: int = 1560, num_heads: int = 12, head_dim: int = 128,
                       dtype: torch.dtype = torch.bfloat16, frames: int = 27, device: str = "cpu", seed: int = 0):
    """A deep-forcing :class:`StreamingKVCache` of this geometry whose state is that of a real stream after
    ``frames`` frames (sink re-phased, Top-C picked; after 27 frames it holds 19, the most a deep-forcing cache
    holds between blocks), filled without running a model.

    The schedule, slot frames, reuse counts and mass come from a one-token-per-frame, one-layer cache that ran the
    schedule on random q / k / v; each slot becomes ``tokens_per_frame`` slots; K / V are one random frame repeated
    (the bytes are what matters for a checkpoint). Returns ``(cache, used_frames)``.
    """
    from ..cache import CachePolicy, StreamingKVCache
    from ..rope import RopeSpec

    policy = CachePolicy.deep_forcing()
    rope = RopeSpec.wan(head_dim)
    g = torch.Generator().manual_seed(seed)
    small = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=2, head_dim=head_dim, tokens_per_frame=1,
                             rope=rope, dtype=torch.float32)
    L = policy.block_frames
    for f0 in range(0, frames, policy.block_frames):
        for _ in range(5):
            q, k, v = torch.randn(3, 1, L, 2, head_dim, generator=g).unbind(0)
            small.layers[0].attend(q, k, v, start_frame=f0)
    sd = small.state_dict()
    layer0 = sd["layers"][0]
    n_frames = layer0["schedule"]["frames"]
    used = n_frames * tokens_per_frame
    one_k = torch.randn(1, tokens_per_frame, num_heads, head_dim, generator=g).to(dtype)
    one_v = torch.randn(1, tokens_per_frame, num_heads, head_dim, generator=g).to(dtype)
    # expanded views (no memory): load_state_dict copies them into the cache's own storage
    kk = one_k[:, None].expand(1, n_frames, tokens_per_frame, num_heads, head_dim).reshape(1, used, num_heads, head_dim)
    vv = one_v[:, None].expand(1, n_frames, tokens_per_frame, num_heads, head_dim).reshape(1, used, num_heads, head_dim)

    def per_token(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.repeat_interleave(tokens_per_frame, dim=1)

    big = StreamingKVCache(policy, num_layers=num_layers, batch_size=1, num_heads=num_heads, head_dim=head_dim,
                           tokens_per_frame=tokens_per_frame, rope=rope, dtype=dtype, device=device)
    layer = {"schedule": dict(layer0["schedule"]), "k": kk, "v": vv, "frames": per_token(layer0["frames"]),
             "reuse": per_token(layer0["reuse"]), "mass": per_token(layer0["mass"]), "qbuf": layer0["qbuf"]}
    state = {"format": sd["format"], "policy": sd["policy"], "geometry": big.geometry(),
             "layers": [layer] * num_layers}
    big.load_state_dict(state)
    return big, n_frames


def _probe(n: int = 400) -> float:
    """Seconds of a fixed single-threaded CPU workload (small matmuls, like a model's host-side dispatch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(96, 96)
        t0 = time.perf_counter()
        for _ in range(n):
            x = torch.tanh(x @ x)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def _rollout_state(cache: Any, generator: torch.Generator, frames_done: int) -> Dict[str, Any]:
    """What :meth:`Rollout.state_dict` holds (the cache is almost all of it)."""
    return {"format": ROLLOUT_STATE_FORMAT, "frames_done": frames_done, "num_frames": frames_done,
            "settings": {}, "generator": generator.get_state(), "cache": cache.state_dict(), "elapsed_s": 0.0}


def measure_geometry(*, num_layers: int = 30, tokens_per_frame: int = 1560, num_heads: int = 12, head_dim: int = 128,
                     latent=(16, 60, 104), dtype: torch.dtype = torch.bfloat16, block_s: float = PAPER_BLOCK_S,
                     budget_s: float = 60.0, repeats: int = 3, directory: Optional[str] = None, device: str = "cpu",
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Section 1 of the module docstring; returns its figures."""
    from ..runio import RunStore, retain_freed_host_memory

    retain_freed_host_memory()  # as `deepforcing generate` does
    t0 = time.perf_counter()
    cache, frames = build_filled_cache(num_layers, tokens_per_frame, num_heads, head_dim, dtype, device=device)
    fill_s = time.perf_counter() - t0
    kv_bytes = sum(2 * layer.keys().numel() * layer.keys().element_size() for layer in cache.layers[:1]) * num_layers
    log(f"  cache filled: {num_layers} layers x {frames} frames x {tokens_per_frame} tokens x {num_heads} heads x "
        f"D {head_dim} {str(dtype).replace('torch.', '')} = {kv_bytes / 1e9:.2f} GB of K/V ({fill_s:.1f} s)")
    gen = torch.Generator(device=device).manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="df-ckpt-", dir=directory)
    try:
        store = RunStore(os.path.join(tmp, "run.pt"))
        store.lock()
        saves: List[Dict[str, float]] = []
        saver = store.state_saver()  # one saver for the run, as generate has
        for r in range(repeats):
            probe_alone = min(_probe(), _probe())  # paired with the probe during this save's write
            b0, w0, n0 = saver.blocked_s, saver.write_s, saver.bytes_written
            t0 = time.perf_counter()
            saver.save(frames, lambda: _rollout_state(cache, gen, frames))  # noqa: F821  (runs before `del cache`)
            blocked = saver.blocked_s - b0
            probe = _probe()  # the loop's own work while the state is written in the background
            if saver.writer._thread is not None and saver._idle.is_set():
                log("  (the write ended before the probe did: its slowdown is diluted)")
            saver.close()
            total = time.perf_counter() - t0
            saves.append({"blocked_s": blocked, "write_s": saver.write_s - w0, "total_s": total,
                          "bytes": saver.bytes_written - n0, "probe_slowdown": probe / probe_alone - 1})
            log(f"  save {r + 1}/{repeats}: {saves[-1]['bytes'] / 1e9:.2f} GB; held the loop {blocked:.2f} s "
                f"(snapshot), background write {saves[-1]['write_s']:.2f} s (torch.save + fsync + rename); a "
                f"CPU probe ran {100 * saves[-1]['probe_slowdown']:+.0f} % slower meanwhile")
        lat = torch.randn((1, 3) + tuple(latent), generator=gen, device=device)
        lat_times = []
        n_blocks = 8
        w0 = store.writer.write_s
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 1.2 MB copy: a thread pool's wake-ups would be all we measured
        try:
            for i in range(n_blocks):  # as generate does: copy + queue in the loop, the write in the writer thread
                t1 = time.perf_counter()
                store.write_block(3 * i, lat, background=True)
                lat_times.append(time.perf_counter() - t1)
                time.sleep(min(block_s, 0.2))  # the model's work between two blocks
            store.flush()
        finally:
            torch.set_num_threads(threads)
        lat_write_s = (store.writer.write_s - w0) / n_blocks
        lat_bytes = os.path.getsize(store.block_path(0))
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del cache
    steady = saves[1:] if len(saves) > 1 else saves  # the first save also faults its snapshot's pages in
    blocked = statistics.median(s["blocked_s"] for s in steady)
    write = statistics.median(s["write_s"] for s in steady)
    state_bytes = saves[-1]["bytes"]
    lat_s = statistics.median(lat_times)
    per_block_s = lat_s + blocked * block_s / budget_s
    slowdown = max(0.0, statistics.median(x["probe_slowdown"] for x in steady))
    # if the loop ran that much slower for the whole background write (its work on the host, as on this CPU box)
    per_block_interf_s = per_block_s + slowdown * write * block_s / budget_s
    per_block_bytes = lat_bytes + state_bytes * block_s / budget_s
    writer_busy = (lat_write_s + write * block_s / budget_s) / block_s
    return {
        "geometry": {"num_layers": num_layers, "frames_in_cache": frames, "tokens_per_frame": tokens_per_frame,
                     "num_heads": num_heads, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                     "latent_block": [1, 3] + list(latent)},
        "kv_bytes": kv_bytes, "state_bytes": state_bytes, "save_blocked_s": blocked, "save_write_s": write,
        "saves": saves, "latents_block_bytes": lat_bytes, "latents_block_loop_s": lat_s,
        "latents_block_write_s": lat_write_s, "writer_busy_fraction": writer_busy,
        "block_s": block_s, "budget_s": budget_s,
        "checkpoint_s_per_block": per_block_s, "checkpoint_overhead_pct": 100.0 * per_block_s / block_s,
        "checkpoint_bytes_per_block": per_block_bytes, "probe_slowdown_during_write": slowdown,
        # generate's default --max-save-overhead 0.02 stretches the interval to blocked / 0.02 when that is longer
        "adaptive_interval_s": max(budget_s, blocked / 0.02),
        "adaptive_overhead_pct": 100.0 * (lat_s + blocked * block_s / max(budget_s, blocked / 0.02)) / block_s,
        "checkpoint_s_per_block_with_interference": per_block_interf_s,
        "checkpoint_overhead_pct_with_interference": 100.0 * per_block_interf_s / block_s,
        # the design it replaced: latents so far + the whole state, synchronously, after every block
        "before_s_per_block": write + blocked, "before_overhead_pct": 100.0 * (write + blocked) / block_s,
        "before_bytes_per_block_at_least": state_bytes,
        # if the write ran in the loop's thread instead of the background (a conservative bound)
        "sync_save_overhead_pct": 100.0 * (lat_write_s + (blocked + write) * block_s / budget_s) / block_s,
    }


# The command runs in a process of its own, as a user runs it; the wrapper counts the bytes of every atomic write
# (the block files and each save of the resume state, which later saves replace on disk) and prints them as JSON.
_COUNTING_RUN = """
import json, sys
import deepforcing_kernels.runio.files as files
written, real = [], files.atomic_save
def counting(obj, path, **kw):
    n = real(obj, path, **kw)
    written.append(n)
    return n
files.atomic_save = counting
from deepforcing_kernels.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "written": written}))
"""


def _count_generate_writes(argv: List[str]) -> List[int]:
    """The byte counts of every atomic write made by ``deepforcing <argv>`` (RuntimeError if it fails)."""
    r = subprocess.run([sys.executable, "-c", _COUNTING_RUN, *argv], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": r.returncode}
    if r.returncode != 0 or res.get("rc") != 0:
        raise RuntimeError(f"deepforcing {argv[0]} exited {res.get('rc', r.returncode)}: {r.stderr.strip()[-400:]}")
    return list(res["written"])


def measure_tiny_run(frames: int = 300, *, directory: Optional[str] = None,
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Section 2: bytes written per block by ``deepforcing generate --model tiny --frames N``, after (the run
    store, counted at every atomic write) and before (the single file rewritten whole after every block)."""
    from ..driver import generate
    from ..models import build_model, random_text_embeds
    from ..presets import make_policy

    tmp = tempfile.mkdtemp(prefix="df-tiny-", dir=directory)
    threads = torch.get_num_threads()
    try:
        out = os.path.join(tmp, "run.pt")
        t0 = time.perf_counter()
        written = _count_generate_writes(["generate", "--model", "tiny", "--frames", str(frames), "--no-progress",
                                          "--device", "cpu", "--out", out])
        after_s = time.perf_counter() - t0
        blocks = frames // 3
        after = sum(written)
        log(f"  after: {len(written)} writes, {after / 1e6:.2f} MB for {blocks} blocks ({after_s:.1f} s)")

        # before: the same rollout, the whole file serialised after every block (what --save-every 1 wrote)
        torch.set_num_threads(1)
        model = build_model("tiny", None, 0)
        text = random_text_embeds(model.config, 0)
        ro = generate(model, text, frames, make_policy("deep-forcing"), 0, progress=False)
        settings = {"model": "tiny", "checkpoint": None, "text_embeds": None, "policy": "deep-forcing",
                    "score": None, "seed": 0, "batch_size": 1, "latent_size": None, "dtype": "float32",
                    "cache_dtype": "float32", "backend": "auto", "frames": frames}
        lat: List[torch.Tensor] = []
        before = 0
        first = last = 0
        for i, block in enumerate(ro):
            lat.append(block)
            buf = io.BytesIO()
            torch.save({"latents": torch.cat(lat, 1)[0], "settings": settings, "frames_done": ro.frames_done,
                        "complete": ro.frames_done >= frames, "state": ro.state_dict()}, buf)
            n = buf.getbuffer().nbytes
            before += n
            first = n if i == 0 else first
            last = n
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  before: {before / 1e6:.2f} MB ({first / 1e3:.1f} kB for the first block's file, {last / 1e3:.1f} kB "
        "for the last)")
    return {"frames": frames, "blocks": blocks, "after_bytes": after, "after_writes": len(written),
            "after_bytes_per_block": after / blocks, "before_bytes": before, "before_bytes_per_block": before / blocks,
            "before_first_file_bytes": first, "before_last_file_bytes": last, "ratio": before / after}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepforcing_kernels.bench.checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=WAN13B["num_layers"], help="cache layers (default 30, Wan-1.3B)")
    p.add_argument("--tokens-per-frame", type=int, default=WAN13B["tokens_per_frame"], help="default 1560")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="cache dtype (default bf16)")
    p.add_argument("--block-s", type=float, default=PAPER_BLOCK_S,
                   help="seconds per block to compare with (default 0.77, the paper's H100)")
    p.add_argument("--budget-s", type=float, default=60.0, help="state save interval (default 60, the command's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="state saves to time (default 3; the first one, which faults its memory in, is reported "
                        "but not in the medians)")
    p.add_argument("--tiny-frames", type=int, default=300, help="frames of the tiny run (default 300; 0: skip)")
    p.add_argument("--skip-geometry", action="store_true", help="only the tiny run")
    p.add_argument("--device", default="cpu", help="where the cache lives (cpu, or cuda: the snapshot is then a "
                                                   "device-to-host copy into reused pinned buffers)")
    p.add_argument("--dir", default=None, help="where the files are written (default: the temp directory)")
    p.add_argument("--json", default=None, help="write the figures as JSON")
    a = p.parse_args(argv)
    for flag, v in (("--layers", a.layers), ("--tokens-per-frame", a.tokens_per_frame), ("--repeats", a.repeats)):
        if v < 1:
            p.exit(1, f"{p.prog}: error: {flag} must be >= 1, got {v}\n")
    if a.tiny_frames < 0 or a.tiny_frames % 3:
        p.exit(1, f"{p.prog}: error: --tiny-frames must be a multiple of 3 >= 0, got {a.tiny_frames}\n")
    res: Dict[str, Any] = {"machine": {"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}}
    if not a.skip_geometry:
        print(f"1) resume state at the Wan-1.3B cache geometry ({a.layers} layers), saved as generate saves it:")
        g = measure_geometry(num_layers=a.layers, tokens_per_frame=a.tokens_per_frame,
                             dtype=torch.bfloat16 if a.dtype == "bfloat16" else torch.float32, block_s=a.block_s,
                             budget_s=a.budget_s, repeats=a.repeats, directory=a.dir, device=a.device)
        res["geometry"] = g
        print(f"   latents per block: {g['latents_block_bytes'] / 1e6:.2f} MB: {g['latents_block_loop_s'] * 1e3:.2f} ms in "
              f"the loop (copy + queue), {g['latents_block_write_s'] * 1e3:.1f} ms in the writer thread (with fsync)")
        print(f"   the writer thread is busy {100 * g['writer_busy_fraction']:.1f} % of the time (must stay < 100 %)")
        print(f"   checkpoint per block at a {a.budget_s:g} s budget: {g['checkpoint_s_per_block'] * 1e3:.1f} ms = "
              f"{g['checkpoint_overhead_pct']:.2f} % of a {a.block_s:g} s block (goal <= 2 %); "
              f"{g['checkpoint_bytes_per_block'] / 1e6:.1f} MB/block on average")
        print(f"   with generate's --max-save-overhead 0.02 the state is saved every {g['adaptive_interval_s']:.0f} s "
              f"instead: {g['adaptive_overhead_pct']:.2f} %")
        print(f"   counting the slowdown of a CPU-bound loop during the background write "
              f"({100 * g['probe_slowdown_during_write']:.0f} %): {g['checkpoint_overhead_pct_with_interference']:.2f} %")
        print(f"   (write in the loop's thread instead: {g['sync_save_overhead_pct']:.2f} %; the earlier design, the "
              f"whole state after every block: {g['before_s_per_block']:.2f} s = {g['before_overhead_pct']:.0f} % "
              f"and >= {g['before_bytes_per_block_at_least'] / 1e9:.2f} GB per block)")
    if a.tiny_frames:
        print(f"2) bytes written per block, `deepforcing generate --model tiny --frames {a.tiny_frames}`:")
        t = measure_tiny_run(a.tiny_frames, directory=a.dir)
        res["tiny_run"] = t
        print(f"   before {t['before_bytes_per_block'] / 1e3:.1f} kB/block, after {t['after_bytes_per_block'] / 1e3:.1f} "
              f"kB/block ({t['ratio']:.0f}x less; total {t['before_bytes'] / 1e6:.1f} MB -> {t['after_bytes'] / 1e6:.2f} MB)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
