"""The mp4 run of ``deepforcing generate --prompt ... --out run.mp4``: from a prompt to an mp4 (the video front end).

What ``deepforcing generate`` runs when the output is an ``.mp4`` (or a prompt is given): the
:class:`~deepforcing_kernels.pipeline.VideoPipeline` (text encoder -> rollout -> streaming decode -> writer),
frames decoded and written while the rollout runs. ``--model tiny`` without ``--weights`` uses the embedded tiny
random DiT, VAE and text encoder with a byte-level stand-in tokenizer (the video is noise: nothing can be
downloaded here); ``--weights DIR`` (an original Wan2.1-T2V-1.3B folder or a diffusers one) with ``--checkpoint
FILE`` (Self-Forcing, LongLive, Causal / Rolling Forcing, safetensors) makes the real thing.

Resume: the run's state goes to ``<out>.state.pt`` on the ``--save-every-s`` budget and on SIGINT / SIGTERM (after
the block in progress); ``--resume`` continues it exactly (the open segment is rewritten from its start, see
:mod:`deepforcing_kernels.pipeline`) and the state file is removed once the run completes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, List, Optional

from ...runio.claims import OutputLock, RunError, check_claims, release, video_claims
from ...runio.files import check_checksum
from .._common import check_positive, fail, set_threads
from .common import (
    cache_dtype,
    model_dtype,
    read_prompt_file,
    sampling_from_args,
    save_interval,
    state_path,
    stop_request,
    threads_for,
)

__all__ = ["run_video"]








def _outputs(out: str, n: int) -> List[str]:
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i:03d}{ext}" for i in range(n)]


def _pipeline(args: argparse.Namespace, policy: Any, device: Any):
    from ...pipeline import VideoPipeline

    dtype = model_dtype(args)
    sampling = sampling_from_args(args)
    kw = dict(policy=policy, backend=args.backend, cache_dtype=cache_dtype(args),
              denoising_steps=sampling["denoising_steps"], first_block_steps=sampling["first_block_steps"])
    if args.latent_size:
        kw["latent_size"] = tuple(args.latent_size)
    if args.weights is None:
        if args.model != "tiny":
            fail(f"--model {args.model} needs --weights DIR (an original Wan2.1 folder or a diffusers one); "
                 "--model tiny runs the embedded tiny random model")
        if args.checkpoint is not None:
            fail("--checkpoint needs --weights DIR for the text encoder and the VAE (the tiny model is random)")
        return VideoPipeline.tiny(seed=args.seed, dtype=dtype, device=device, **kw)
    if not os.path.isdir(args.weights):
        fail(f"--weights {args.weights}: " + ("is a file, not a folder" if os.path.exists(args.weights)
                                               else "no such folder"))
    return VideoPipeline.from_weights(args.weights, args.checkpoint, model=args.model, dtype=dtype, device=device,
                                      use_ema=sampling["use_ema"], **kw)


def run_video(args: argparse.Namespace, policy: Any, device: Any, indices: Optional[List[int]] = None) -> int:
    """The prompt -> mp4 path of ``deepforcing generate`` (arguments already checked by :func:`.latents.run`).

    ``indices``: only these prompts of the list (``--parallel data`` gives each rank its share); outputs keep
    their global numbering."""
    import torch

    from ...runio import atomic_save

    if args.prompt and args.prompt_file:
        fail("--prompt and --prompt-file contradict each other: give one")
    if not (args.prompt or args.prompt_file):
        fail("an .mp4 output needs --prompt TEXT or --prompt-file FILE")
    prompts = [args.prompt] if args.prompt else read_prompt_file(args.prompt_file)
    if any(not p.strip() for p in prompts):
        fail("--prompt is empty")
    if args.image and args.video:
        fail("--image and --video contradict each other: a stream starts from one of them")
    for flag, path in (("--image", args.image), ("--video", args.video)):
        if path is not None and not os.path.isfile(path):
            fail(f"{flag} {path}: no such file")
    if args.switch and len(prompts) > 1:
        fail("--switch applies to one --prompt, not to a --prompt-file")
    check_positive(args.segment_frames, "--segment-frames")
    if not str(args.out).lower().endswith(".mp4"):
        fail(f"--out {args.out}: a prompt run writes an .mp4 here (or give --text-embeds for latents in a .pt)")
    if args.batch_size != 1:
        fail("--batch-size applies to latents output (.pt); a video run writes one stream per prompt")
    outs = _outputs(args.out, len(prompts))
    if indices is not None:
        prompts, outs = [prompts[i] for i in indices], [outs[i] for i in indices]
    for out in outs:
        st = state_path(out)
        if args.resume and not os.path.exists(st) and os.path.exists(out):
            fail(f"--resume: {out} is complete (no {st} to continue from)")
    replaced = []
    for out in outs:  # the one overwrite rule: every file a run of this name may write, before anything is
        if args.resume and os.path.exists(state_path(out)):
            continue  # a resume's files are its own
        try:
            replaced += check_claims(video_claims(out), force=args.force)
        except RunError as e:
            fail(str(e) + ("" if args.resume else " (or --resume to continue an interrupted run)"))
        if os.path.exists(out) and not args.resume and not args.force:
            fail(f"--out {out} exists: pass --force to replace it (or --resume to continue an interrupted run)")
    saved_threads = set_threads(threads_for(args, device))
    try:
        try:
            pipe = _pipeline(args, policy, device)
        except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        release(replaced)  # --force: the older run's files go before this run writes any (never a mix)
        for prompt, out in zip(prompts, outs):
            st_path = state_path(out)
            resume = None
            if args.resume and os.path.exists(st_path):
                try:
                    resume = torch.load(st_path, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001 - any unreadable state is one clear line
                    fail(f"--resume: {st_path} cannot be read ({type(e).__name__}); --force starts over")
                try:
                    check_checksum(resume, st_path)
                except RunError as e:
                    fail(f"--resume: {e}")
            elif os.path.exists(out) and args.resume:
                print(f"{out} is complete; skipping", file=sys.stderr)
                continue
            last = [time.monotonic()]
            every = [args.save_every_s]

            def on_block(chunk: Any, run: Any, stop: Any = None) -> None:
                now = time.monotonic()
                stopping = stop is not None and stop.signum is not None
                if stopping or every[0] == 0 or now - last[0] >= every[0]:
                    t0 = time.monotonic()
                    atomic_save(run.state_dict(), st_path, seal=True)
                    every[0] = save_interval(args.save_every_s, args.max_save_overhead, time.monotonic() - t0)
                    last[0] = time.monotonic()
                if stopping:
                    raise KeyboardInterrupt

            try:
                lock = OutputLock(out).__enter__()
            except (RunError, OSError) as e:
                fail(f"--out {out}: {e}")
            with lock, stop_request() as stop:
                try:
                    res = pipe.write(out, prompt, args.frames, args.seed, fps=args.fps,
                                     segment_frames=args.segment_frames, image=args.image, video=args.video,
                                     switches=args.switch or None, recache=args.recache, resume=resume,
                                     scene_cuts=args.cut,
                                     progress=not args.no_progress, on_error="partial",
                                     on_block=lambda c, r: on_block(c, r, stop))
                except KeyboardInterrupt:
                    saved = os.path.exists(st_path)
                    print(f"deepforcing generate: stopped; {'state saved to ' + st_path if saved else 'no state saved'}"
                          f"; continue with --resume", file=sys.stderr)
                    return 130 if stop.signum in (None, 2) else 128 + stop.signum
                except (ValueError, OSError, ImportError) as e:  # OSError: a full disk, a folder made read-only
                    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
            if os.path.exists(st_path):
                os.remove(st_path)  # complete: nothing to resume
            files = res.paths if hasattr(res, "paths") else [out]
            print(f"wrote {files[0] if len(files) == 1 else f'{len(files)} segments {files[0]} .. {files[-1]}'}: "
                  f"{getattr(res, 'frames', '?')} video frames from {args.frames} latent frames, "
                  f"policy {args.policy}" + (f", prompt {prompt[:60]!r}" if len(prompts) > 1 else ""))
        return 0
    finally:
        torch.set_num_threads(saved_threads)
