"""The multi-GPU runs of ``deepforcing generate --parallel sequence|data``, under ``torchrun``.

``sequence``: one stream on P ranks (:class:`~deepforcing_kernels.distributed.ulysses.SequenceParallelWan`).
Rank 0 writes the run exactly as a single process does (manifest ``--out`` and the blocks in ``<out>.d/``, read by
:func:`deepforcing_kernels.runio.load_run`); every rank saves its own resume state, whose cache holds only its
heads, as ``<out>.d/state.rank<r>-of-<P>.pt`` (and keeps the previous one as ``...prev.pt``, so a crash between
the ranks' writes still leaves one frame count that every rank has). ``--resume`` checks each shard (format,
rank, world size, settings digest) and continues from the latest frame count every rank holds.

``data``: the prompts (the rows of ``--text-embeds [N, L, D]``) are split across ranks
(:func:`~deepforcing_kernels.distributed.launch.split_prompts`); rank r generates its prompts one by one as
single-process runs ``<out stem>.p<i>.pt`` (each resumable on its own), so no prompt is done twice or lost.

Every input error is one line on rank 0 and exit code 1 on every rank; see :func:`.launch.run_ranked`.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...distributed.launch import ParallelError, RankError, check_same_settings, run_ranked, split_prompts, torchrun_env
from ...formats import SHARD_FORMAT
from .._common import fail
from . import common as g

__all__ = ["run", "SHARD_FORMAT", "shard_path"]


def run(args: argparse.Namespace) -> int:
    """Entry from ``deepforcing generate`` when ``--parallel`` is given; exits the process (every rank)."""
    if torchrun_env() is None:
        fail(f"--parallel {args.parallel} needs torchrun: run `torchrun --nproc-per-node P -m deepforcing_kernels "
             f"generate ... --parallel {args.parallel}` (RANK / WORLD_SIZE / MASTER_ADDR are not set)")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        fail(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    body = _run_sequence if args.parallel == "sequence" else _run_data
    run_ranked(lambda: body(args), rank=rank, world=world, prog="deepforcing generate")
    return 1  # not reached


# ------------------------------------------------------------------------------------------------ helpers
def _agree(error: Optional[str]) -> None:
    """Every rank raises :class:`ParallelError` if any rank has an error (the first one, by rank)."""
    import torch.distributed as dist

    errors: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    for r, e in enumerate(errors):
        if e is not None:
            raise ParallelError(e if r == 0 else f"rank {r}: {e}")


def _local(fn, *a, **kw) -> Tuple[Any, Optional[str]]:
    """``fn(...)`` with a user error (SystemExit with a message, ParallelError, ValueError) turned into text."""
    try:
        return fn(*a, **kw), None
    except SystemExit as e:
        return None, str(e.code)
    except (ParallelError, ValueError, TypeError, OSError) as e:
        return None, " ".join(str(e).split()) or type(e).__name__


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _device(args: argparse.Namespace) -> str:
    if args.device is not None and args.device.startswith("cuda") or (args.device is None
                                                                      and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def shard_path(store_dir: str, rank: int, world: int, prev: bool = False) -> str:
    """Where rank ``rank`` of ``world`` keeps its resume state (``prev``: the one before)."""
    return os.path.join(store_dir, f"state.rank{rank}-of-{world}{'.prev' if prev else ''}.pt")


def _common(args: argparse.Namespace):
    """What ``deepforcing generate`` checks first, through its own helpers (same messages, same settings)."""
    from ...models import WanConfig
    from .._common import check_frames, check_positive

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.threads, "--threads")
    try:
        policy = g.policy_from_args(args.policy, args.score, g.sampling_from_args(args)["block_frames"],
                                    **g.jitter_from_args(args), commit_rule=getattr(args, "commit_rule", None))
    except ValueError as e:
        raise ParallelError(str(e))
    check_frames(args.frames, block=policy.block_frames)
    cfg = WanConfig.from_name(args.model)
    latent_size = tuple(args.latent_size) if args.latent_size else tuple(cfg.latent_size)
    try:
        cfg.token_grid(latent_size)
    except ValueError as e:
        raise ParallelError(f"--latent-size {latent_size[0]} {latent_size[1]}: {e}")
    return g, policy, cfg, latent_size


# ------------------------------------------------------------------------------------------------ sequence
def _run_sequence(args: argparse.Namespace) -> int:
    from ...distributed.comm import SequenceComm
    from ...distributed.launch import check_divisible, init_from_env
    from ...distributed.ulysses import SequenceParallelWan, check_same_weights
    from ...driver import generate
    from ...runio import RunError, RunStore, atomic_save, to_cpu

    info = init_from_env(timeout_s=args.dist_timeout, device=_device(args), flag="--parallel sequence")
    rank, world, device = info["rank"], info["world_size"], torch.device(info["device"])
    g, policy, cfg, latent_size = _common(args)
    check_divisible(num_heads=cfg.num_heads, num_kv_heads=getattr(cfg, "num_kv_heads", None),
                    tokens_per_frame=cfg.tokens_per_frame(latent_size), world=world)
    if args.resume and args.force:
        raise ParallelError("--resume and --force contradict each other")
    text = g.load_text(args.text_embeds, cfg.text_dim, args.batch_size) if args.text_embeds else None
    threads = args.threads if args.threads is not None else (1 if args.model == "tiny" and device.type == "cpu"
                                                              else None)
    if threads is not None:
        torch.set_num_threads(threads)
    model = g.build_model(args.model, args.checkpoint, args.seed, g.model_dtype(args), str(device),
                          g.sampling_from_args(args)["use_ema"])
    if text is None:
        text = g.random_text_embeds(model.config, args.seed)
    settings = g.run_settings(args, policy, latent_size, device, threads)
    settings.update({"parallel": "sequence", "world_size": world})
    check_same_settings(dict(settings, text_digest=_digest(text)))  # same command, same text on every rank
    comm = SequenceComm()
    check_same_weights(model, comm)
    sp = SequenceParallelWan(model, comm)

    store = RunStore(args.out)
    digest = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in settings.items()
                                        if k not in ("frames", "threads"))).encode()).hexdigest()
    err = None
    if rank == 0:  # rank 0 owns the run's files, as a single process does
        try:
            store.check_writable()
        except RunError as e:
            err = str(e)
    _agree(err)
    state, start = _resume_sequence(args, store, settings, rank, world, digest, g, cfg)
    if rank == 0:
        _, err = _local(store.lock)
        if err is None:
            for p in store.clean_temporaries():
                print(f"removed {p}, a temporary file left by an interrupted save", file=sys.stderr)
    _agree(err)  # the parts directory exists from here on
    try:
        return _loop_sequence(args, generate, sp, text, policy, latent_size, g, store, settings, state, start,
                              rank, world, digest, comm, device, atomic_save, to_cpu)
    finally:
        if rank == 0:
            (getattr(store, "close", None) or store.unlock)()


def _loop_sequence(args, generate, sp, text, policy, latent_size, g, store, settings, state, start, rank, world,
                   digest, comm, device, atomic_save, to_cpu) -> int:
    from .._common import StopRequest

    stop = StopRequest().__enter__()  # on every rank before the run's first file: a Ctrl-C from then on stops at a block end
    sampling = g.sampling_from_args(args)
    rollout = generate(sp, text, args.frames, policy, args.seed, batch_size=args.batch_size,
                       latent_size=latent_size, cache_dtype=g.cache_dtype(args),
                       backend=args.backend, progress=not args.no_progress and rank == 0, resume_from=state,
                       denoising_steps=sampling["denoising_steps"], first_block_steps=sampling["first_block_steps"])
    bf = rollout.block_frames
    _agree(None)  # every rank has its stop handler before rank 0 writes anything
    if rank == 0:
        store.write_manifest(settings, frames=args.frames, block_frames=bf, batch_size=args.batch_size,
                             frames_done=max(start, rollout.frames_done), complete=False)
    last = time.monotonic()
    t_start, f_start = rollout.elapsed_s, rollout.frames_done

    def save() -> None:
        cur = shard_path(store.dir, rank, world)
        if os.path.exists(cur):
            os.replace(cur, shard_path(store.dir, rank, world, prev=True))
        shard = {"format": SHARD_FORMAT, "rank": rank, "world_size": world, "digest": digest}
        atomic_save({"format": SHARD_FORMAT, "frames_done": rollout.frames_done,
                     "rollout": dict(to_cpu(rollout.state_dict()), shard=shard)}, cur)
        _agree(None)  # every shard of this frame count is on disk before anyone goes on

    with stop:
        for block in rollout:
            f0 = rollout.frames_done - bf
            if rank == 0:
                store.write_block(f0, block.detach().cpu())
            # rank 0's clock decides when to save, so every rank saves the same frame count; a stop request on
            # any rank (Ctrl-C reaches every rank, torchrun's SIGTERM too) stops them all after this block
            flags = torch.tensor([float(time.monotonic() - last >= args.save_every_s),
                                  float(stop.signum is not None)], device=device)
            flags = comm.all_gather(flags).cpu()
            if bool(flags[:, 1].max() > 0):
                save()
                if rank == 0:
                    print(f"stopped at frame {rollout.frames_done} of {args.frames} on all {world} ranks; their "
                          f"states are saved in {store.dir}: --resume continues bit for bit", file=sys.stderr)
                return 128 + (stop.signum or signal.SIGINT)
            if rollout.frames_done < args.frames and bool(flags[0, 0] > 0):
                save()
                last = time.monotonic()
        save()
    if rank == 0:
        store.write_manifest(settings, frames=args.frames, block_frames=bf, batch_size=args.batch_size,
                             frames_done=rollout.frames_done, complete=True)
        new = rollout.frames_done - f_start
        spent = rollout.elapsed_s - t_start
        print(f"wrote {args.out}: {rollout.frames_done} latent frames ({new} new, "
              f"{new / spent if spent > 0 else float('nan'):.1f} frames/s) on {world} ranks (sequence parallel), "
              f"policy {args.policy}; per-rank resume states in {store.dir}")
    return 0


def _read_shard(path: str, rank: int, world: int, digest: str) -> Tuple[Optional[Dict[str, Any]], str]:
    if not os.path.exists(path):
        return None, "missing"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        st = obj["rollout"]
        sh = st["shard"]
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, not raised
        return None, f"unreadable ({type(e).__name__})"
    if sh.get("format") != SHARD_FORMAT or sh.get("rank") != rank or sh.get("world_size") != world:
        return None, (f"written by rank {sh.get('rank')} of {sh.get('world_size')}, not rank {rank} of {world}")
    if sh.get("digest") != digest:
        return None, "written with other settings"
    return obj, "ok"


def _resume_sequence(args, store, settings, rank, world, digest, g, cfg) -> Tuple[Optional[Dict[str, Any]], int]:
    """(the rollout state this rank resumes from or None, frames on disk). Every rank agrees, or all raise."""
    exists = os.path.exists(args.out)
    err = None
    if exists and not args.resume and not args.force:
        err = f"--out {args.out} exists: pass --resume to continue it or --force to replace it"
    _agree(err if rank == 0 else None)
    if exists and args.force and not args.resume:
        if rank == 0:
            store.remove()
        for p in (shard_path(store.dir, rank, world), shard_path(store.dir, rank, world, prev=True)):
            if os.path.exists(p):
                os.unlink(p)
        _agree(None)
        return None, 0
    if not (exists and args.resume):
        return None, 0
    prev, err = _local(store.read_for_resume) if rank == 0 else (None, None)
    if prev is not None:
        if prev["settings"].get("world_size") != world:
            err = (f"cannot resume {args.out}: it was written by {prev['settings'].get('world_size') or 1} rank(s) "
                   f"(--parallel {prev['settings'].get('parallel') or 'none'}), this run has {world}")
        else:
            diff = g.settings_diff(prev["settings"], settings, cfg.latent_size)
            if diff:
                err = f"cannot resume {args.out}: settings differ: " + ", ".join(
                    f"{k} {a!r} (saved) vs {b!r} (now)" for k, (a, b) in diff.items())
    _agree(err)
    # each rank: which frame counts can it resume from?
    mine: Dict[int, str] = {}
    notes = []
    for p in (shard_path(store.dir, rank, world), shard_path(store.dir, rank, world, prev=True)):
        obj, why = _read_shard(p, rank, world, digest)
        if obj is not None:
            mine[int(obj["frames_done"])] = p
        elif why != "missing":
            notes.append(f"{p}: {why}")
    import torch.distributed as dist

    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, (sorted(mine), notes))
    common = set(everyone[0][0]).intersection(*(set(e[0]) for e in everyone[1:]))
    if not any(e[0] or e[1] for e in everyone):  # nothing saved yet anywhere: frame 0 is the exact resume point
        if rank == 0:
            print(f"no per-rank state saved in {args.out} yet: restarting from frame 0", file=sys.stderr)
        return None, 0
    if not common:
        bad = "; ".join(n for e in everyone for n in e[1]) or "no per-rank state saved yet"
        raise ParallelError(f"cannot resume {args.out}: no frame count has a valid state on every rank ({bad}); "
                            "pass --force to start over")
    at = max(common)
    obj, _ = _read_shard(mine[at], rank, world, digest)
    state = obj["rollout"]
    state.pop("shard", None)
    if rank == 0:
        print(f"resuming {args.out} from frame {at} on {world} ranks", file=sys.stderr)
    return state, at


# ------------------------------------------------------------------------------------------------ data
def _run_data(args: argparse.Namespace) -> int:
    from ...distributed.launch import init_from_env
    from .latents import run as run_latents

    info = init_from_env(timeout_s=args.dist_timeout, device=_device(args), flag="--parallel data")
    rank, world = info["rank"], info["world_size"]
    _, policy, cfg, latent_size = _common(args)
    if g.wants_video(args):  # prompts -> one mp4 each, split across ranks
        prompts = [args.prompt] if args.prompt else g.read_prompt_file(args.prompt_file) if args.prompt_file else []
        plain = (str, int, float, bool, list, tuple, type(None))
        check_same_settings({"argv": sorted(f"{k}={v!r}" for k, v in vars(args).items()
                                            if k != "no_progress" and isinstance(v, plain)),
                             "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()})
        from .mp4 import run_video

        mine = split_prompts(list(range(len(prompts))), rank, world)
        sub = copy.copy(args)
        sub.parallel = None
        if info["device"].startswith("cuda"):
            sub.device = info["device"]
        code = run_video(sub, policy, torch.device(sub.device or "cpu"), indices=mine) if mine else 0
        print(f"rank {rank} of {world}: prompts {mine} (data parallel)")
        return code
    if args.text_embeds is None:
        raise ParallelError("--parallel data splits the prompts of --prompt-file (one mp4 each) or the rows of "
                            "--text-embeds (a tensor [N, L, text_dim]) across ranks: pass one of them")
    if args.batch_size != 1:
        raise ParallelError("--parallel data generates one prompt at a time: drop --batch-size")
    text = g.read_tensors(args.text_embeds, "--text-embeds")
    if isinstance(text, dict):
        text = next((text[k] for k in ("text_embeds", "prompt_embeds", "context", "embeds")
                     if isinstance(text.get(k), torch.Tensor)), None)
    if not isinstance(text, torch.Tensor) or text.dim() not in (2, 3):
        raise ParallelError(f"--text-embeds {args.text_embeds} must hold a tensor [N, L, {cfg.text_dim}]")
    text = text[None] if text.dim() == 2 else text
    plain = (str, int, float, bool, list, tuple, type(None))
    check_same_settings({"argv": sorted(f"{k}={v!r}" for k, v in vars(args).items()
                                        if k != "no_progress" and isinstance(v, plain)),
                         "prompts": int(text.shape[0]), "text_digest": _digest(text)})
    root, ext = os.path.splitext(args.out)
    mine = split_prompts(list(range(text.shape[0])), rank, world)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for i in mine:
        sub = copy.copy(args)
        sub.parallel, sub.batch_size = None, 1
        sub.out = f"{root}.p{i:04d}{ext or '.pt'}"
        sub.text_embeds = f"{root}.p{i:04d}.text.pt"
        if info["device"].startswith("cuda"):
            sub.device = info["device"]
        from ...runio import atomic_save

        if os.path.exists(sub.text_embeds) and not args.force:
            _, why = _local(torch.load, sub.text_embeds, map_location="cpu", weights_only=True)
            old = None if why else _
            same = isinstance(old, dict) and isinstance(old.get("text_embeds"), torch.Tensor) \
                and torch.equal(old["text_embeds"], text[i].float())
            if not same:  # the run at sub.out was made from another prompt: never continue it with this one
                raise RankError(f"prompt {i}: {sub.text_embeds} holds other text embeddings (did the prompt list "
                                "change?); pass --force to start these runs over")
        else:
            atomic_save({"text_embeds": text[i].float().clone()}, sub.text_embeds)
        try:
            code = run_latents(sub)
        except SystemExit as e:  # a failure of this prompt's run: this rank reports it
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                raise RankError(f"prompt {i} ({sub.out}): {e.code}")
        if code:
            return code
    # no barrier here: ranks with fewer prompts would wait past the process-group timeout for the others
    print(f"rank {rank} of {world}: prompts {mine} -> {root}.p<i>{ext or '.pt'} (data parallel)")
    return 0
