"""The latents run of ``deepforcing generate``: roll a Wan causal DiT over the streaming cache and save the latents
block by block (the checks of every single-process run come first, then an mp4 run goes to :mod:`.mp4`).

The run is a small manifest at ``--out`` plus a directory ``<out>.d/`` (see :mod:`deepforcing_kernels.runio`):
each finished block is appended as its own file (never rewritten), and the resume state (cache, generator,
frames done) is saved at most every ``--save-every-s`` seconds (default 60; longer when a save's snapshot would
hold generation for more than ``--max-save-overhead`` of the time, default 2 %), on SIGINT / SIGTERM (after the
block in progress; a second signal stops at once) and at the end. ``--resume`` continues bit for bit from the
last saved state; with none saved yet it restarts from frame 0, the latest point it can reproduce exactly, and
checks the blocks already on disk as it regenerates them. Read a run with
:func:`deepforcing_kernels.runio.load_run` (also re-exported by the driver)::

    {"latents": [frames, C, H, W] (or [B, frames, C, H, W] with --batch-size > 1), "settings": {...},
     "frames_done": int, "complete": bool, ...}

Every file holds only tensors and plain values, so ``torch.load(path)`` (``weights_only=True``) reads each one.
Without ``--checkpoint`` the model is randomly initialised from ``--seed`` (a stand-in for tests and timing);
without ``--text-embeds`` the text embeddings are random from ``--seed`` too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from ...presets import torch_dtype
from ...runio.claims import check_claims, latents_claims, release
from .._common import check_frames, check_output_file, check_positive, fail, set_threads
from .common import (
    build_model,
    cache_dtype,
    check_backend,
    check_device,
    check_fits_in_memory,
    check_head_jitter,
    first_line,
    jitter_from_args,
    load_text,
    model_dtype,
    policy_from_args,
    random_text_embeds,
    run_settings,
    sampling_from_args,
    save_interval,
    settings_diff,
    stop_request,
    threads_for,
    wants_video,
)

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Check the arguments of a single-process run, then run it: an mp4 run in :mod:`.mp4`, a latents run here."""
    from ...models import WanConfig
    from ...runio import RunError, RunStore

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.threads, "--threads")
    if not math.isfinite(args.save_every_s) or args.save_every_s < 0:
        fail(f"--save-every-s must be a number of seconds >= 0, got {args.save_every_s}")
    if not math.isfinite(args.max_save_overhead) or not 0 <= args.max_save_overhead < 1:
        fail(f"--max-save-overhead must be a fraction in [0, 1), got {args.max_save_overhead}")
    try:
        policy = policy_from_args(args.policy, args.score, sampling_from_args(args)["block_frames"],
                                  **jitter_from_args(args), commit_rule=args.commit_rule)
    except ValueError as e:
        fail(str(e))
    video = wants_video(args)
    if not video:
        check_frames(args.frames, block=policy.block_frames)
        for flag in ("image", "video", "weights", "segment_frames"):
            if getattr(args, flag) not in (None, False):
                fail(f"--{flag.replace('_', '-')} needs a video run: --prompt TEXT and --out NAME.mp4")
        if args.switch or args.recache:
            fail("--switch / --recache need a video run: --prompt TEXT and --out NAME.mp4")
    elif args.frames <= 0:
        fail(f"--frames must be positive, got {args.frames}")
    cfg = WanConfig.from_name(args.model)  # args.model is canonical (model_name)
    latent_size = tuple(args.latent_size) if args.latent_size else tuple(cfg.latent_size)
    if min(latent_size) <= 0:
        fail(f"--latent-size {latent_size[0]} {latent_size[1]}: both must be positive multiples of 2")
    try:
        cfg.token_grid(latent_size)
    except ValueError as e:
        fail(f"--latent-size {latent_size[0]} {latent_size[1]}: {e}")
    check_fits_in_memory(cfg, latent_size, policy, args.batch_size, args.cache_dtype or args.dtype, args.frames)
    if args.switch and max(f for f, _ in args.switch) >= args.frames:
        late = max(f for f, _ in args.switch)
        fail(f"--switch {late}:...: frame {late} is past the run's end (--frames {args.frames}); it would never apply")
    for f in getattr(args, "cut", None) or ():
        if f not in {g for g, _ in args.switch}:
            fail(f"--cut {f}: no --switch at frame {f} (a scene cut is a prompt switch's)")
        if not policy.block_relative:
            fail(f"--cut needs --policy infinity_rope (rope_cut), not {policy.kind}")
    device = check_device(args.device)
    check_backend(args.backend, device)
    check_head_jitter(policy, args.backend, device, cfg.head_dim, torch_dtype(args.cache_dtype or args.dtype))
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: " + ("is a directory, not a file" if os.path.isdir(args.checkpoint)
                                                      else "no such file"))
    if args.resume and args.force:
        fail("--resume and --force contradict each other: --resume continues the run at --out, --force replaces it")
    if video:
        if args.text_embeds:
            fail("--text-embeds and a video run (--prompt / .mp4) contradict each other: the prompt is encoded here")
        check_output_file(args.out, "--out")
        from .mp4 import run_video

        return run_video(args, policy, device)
    text = load_text(args.text_embeds, cfg.text_dim, args.batch_size) if args.text_embeds else None

    store = RunStore(args.out)
    try:
        store.check_writable()
    except RunError as e:
        fail(str(e))
    threads = threads_for(args, device)
    settings = run_settings(args, policy, latent_size, device, threads)

    previous = None
    exists = os.path.exists(args.out)
    if exists and args.resume:
        try:
            previous = store.read_for_resume()
        except RunError as e:
            fail(f"cannot resume {args.out}: {e}")
        diff = settings_diff(previous["settings"], settings, cfg.latent_size)
        if diff:
            items = ", ".join(f"{k} {a!r} (saved) vs {b!r} (now)" for k, (a, b) in diff.items())
            fail(f"cannot resume {args.out}: settings differ: {items}; pass the saved ones, or --force to start over")
        on_disk = 0 if previous["latents"] is None else previous["latents"].shape[1]
        if on_disk >= args.frames:
            print(f"{args.out} already holds {on_disk} frames; nothing to do")
            return 0
    elif exists and not args.force:
        fail(f"--out {args.out} exists: pass --resume to continue it or --force to replace it")
    elif args.resume:
        print(f"{args.out} does not exist yet: starting a new run", file=sys.stderr)
    if not exists:  # no manifest, yet its parts folder may hold another run's files: the one overwrite rule
        try:
            stale = check_claims(latents_claims(args.out), force=args.force)
        except RunError as e:
            fail(str(e))
        release(stale)

    try:
        store.lock()
    except (RunError, OSError) as e:
        fail(f"--out {args.out}: {e}")
    try:
        for p in store.clean_temporaries():
            print(f"removed {p}, a temporary file left by an interrupted save", file=sys.stderr)
        if exists and not args.resume:
            store.remove()  # --force
        saved = set_threads(threads)
        try:
            return _generate(args, policy, settings, previous, store, text, device)
        except OSError as e:  # the disk filled up or the folder became read-only during the run: one line
            fail(f"--out {args.out}: {' '.join(str(e).split())}; what reached the disk is kept (--resume "
                 "continues from the last saved state)")
        finally:
            torch.set_num_threads(saved)
    finally:
        try:
            store.close()  # every queued block reaches the disk, whatever happened
        except OSError as e:
            print(f"deepforcing generate: {e}", file=sys.stderr)


def _resume_point(args: argparse.Namespace, previous: Optional[Dict[str, Any]], store: Any,
                  settings: Dict[str, Any], block_frames: int):
    """(rollout state or None, frames on disk, what to log once the state is accepted); migrates a single-file
    run of earlier versions to blocks."""
    if previous is None:
        return None, 0, None
    lat = previous["latents"]
    on_disk = 0 if lat is None else lat.shape[1]
    if previous["layout"] == "single-file":
        for f0 in range(0, on_disk - on_disk % block_frames, block_frames):
            store.write_block(f0, lat[:, f0:f0 + block_frames])
        on_disk -= on_disk % block_frames
        saver = store.state_saver(background=False)
        saver.save(on_disk, lambda: previous["state"])
        return previous["state"], on_disk, (f"{args.out}: converted the single-file run ({on_disk} frames) to the "
                                            f"block layout in {store.dir}; resuming from frame {on_disk}")
    state, at = previous["state"], previous["state_frames"]
    if state is not None and at > 0:
        return state, on_disk, (f"resuming {args.out} from the state saved at frame {at} ({on_disk} frames on disk"
                                + (f"; frames {at}..{on_disk - 1} are regenerated and checked" if on_disk > at
                                   else "") + ")")
    return None, on_disk, (f"no resume state saved in {args.out} yet: restarting from frame 0, the latest point that "
                           "can be reproduced exactly"
                           + (f" (the {on_disk} frames on disk are regenerated and checked)" if on_disk else ""))


def _generate(args: argparse.Namespace, policy: Any, settings: Dict[str, Any], previous: Optional[Dict],
              store: Any, text: Optional[torch.Tensor], device: torch.device) -> int:
    from ...driver import generate
    from ...runio import retain_freed_host_memory

    dtype = model_dtype(args)
    sampling = sampling_from_args(args)
    try:
        model = build_model(args.model, args.checkpoint, args.seed, dtype, str(device), sampling["use_ema"])
    except (ValueError, TypeError, KeyError) as e:
        fail(f"--checkpoint {args.checkpoint}: {first_line(e)}")
    if text is None:
        text = random_text_embeds(model.config, args.seed)
    state, on_disk, note = _resume_point(args, previous, store, settings, policy.block_frames)
    try:
        rollout = generate(model, text, args.frames, policy, args.seed, batch_size=args.batch_size,
                           latent_size=tuple(settings["latent_size"]),
                           cache_dtype=cache_dtype(args),
                           backend=args.backend, progress=not args.no_progress, resume_from=state,
                           denoising_steps=sampling["denoising_steps"],
                           first_block_steps=sampling["first_block_steps"])
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        if state is not None:
            where = os.path.join(store.dir, "state.pt") if previous["layout"] == "blocks" else args.out
            fail(f"cannot resume {args.out}: the saved state {where} does not fit this run ({first_line(e)})")
        raise
    if note:
        print(note, file=sys.stderr)
    bf = rollout.block_frames
    store.write_manifest(settings, frames=args.frames, block_frames=bf, batch_size=args.batch_size,
                         frames_done=max(on_disk, rollout.frames_done), complete=False)
    retain_freed_host_memory()  # each state snapshot reuses the previous one's host pages
    saver = store.state_saver()
    done_at_start, time_at_start = rollout.frames_done, rollout.elapsed_s
    last_save = time.monotonic()
    gap = args.save_every_s
    mismatched = []
    with stop_request() as stop:
        try:
            for block in rollout:
                f0 = rollout.frames_done - bf
                block = block.detach().cpu()
                old = store.read_block(f0) if f0 < on_disk else None
                if old is None or old.shape != block.shape or not torch.equal(old, block):
                    if old is not None:
                        mismatched.append(f0)
                    store.write_block(f0, block, background=True)  # the writer thread writes it meanwhile
                done = rollout.frames_done
                if stop.signum is not None:
                    saver.save(done, rollout.state_dict, wait=True)
                    print(f"stopped at frame {done} of {args.frames}; state saved in {saver.path}: --resume "
                          "continues bit for bit", file=sys.stderr)
                    return 128 + stop.signum
                if done < args.frames and time.monotonic() - last_save >= gap:
                    b0 = saver.blocked_s
                    saver.save(done, rollout.state_dict)
                    last_save = time.monotonic()
                    gap = save_interval(args.save_every_s, args.max_save_overhead, saver.blocked_s - b0)
            saver.save(rollout.frames_done, rollout.state_dict, wait=True)
        finally:
            try:
                saver.close()
            except OSError as e:
                print(f"deepforcing generate: {e}", file=sys.stderr)
    if mismatched:
        print(f"warning: the regenerated blocks at frames {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''} "
              "differ from those on disk (another thread count, device or library version?); the new ones replace "
              "them", file=sys.stderr)
    store.write_manifest(settings, frames=args.frames, block_frames=bf, batch_size=args.batch_size,
                         frames_done=rollout.frames_done, complete=True)
    new = rollout.frames_done - done_at_start
    spent = rollout.elapsed_s - time_at_start
    fps = new / spent if spent > 0 else float("nan")
    print(f"wrote {args.out}: {rollout.frames_done} latent frames ({new} new, {fps:.1f} frames/s), "
          f"policy {args.policy}, cache {rollout.cache_frames:g} frames; blocks and resume state in {store.dir}")
    return 0
