"""`deepforcing generate`: roll a Wan causal DiT over the streaming cache and save the latents block by block.

The output ``.pt`` is rewritten atomically (temporary file + ``os.replace``) after every ``--save-every`` blocks,
so an interrupted run keeps what it produced; ``--resume`` continues it bit for bit (the file carries the driver's
resume state: cache, generator, frames done). It holds only tensors and plain values, so
``torch.load(path)`` (``weights_only=True``) reads it::

    {"latents": [frames, C, H, W] (or [B, frames, C, H, W] with --batch-size > 1),
     "settings": {...}, "frames_done": int, "complete": bool, "state": {...resume state...}}

Without ``--checkpoint`` the model is randomly initialised from ``--seed`` (a stand-in for tests and timing);
without ``--text-embeds`` the text embeddings are random from ``--seed`` too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, Optional

import torch

POLICIES = ("full", "sliding", "frame-sink", "deep-sink", "deep-forcing")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", choices=("tiny", "wan-1.3b"), help="model sizes (default tiny)")
    parser.add_argument("--checkpoint", default=None, help="Wan / Self-Forcing state dict (.pt or .safetensors)")
    parser.add_argument("--text-embeds", default=None,
                        help="a .pt holding a tensor [L, text_dim] or [B, L, text_dim] (or a dict with "
                             "'text_embeds' / 'prompt_embeds'); default: random from --seed")
    parser.add_argument("--frames", type=int, default=30, help="latent frames, a multiple of 3 (default 30)")
    parser.add_argument("--policy", default="deep-forcing", choices=POLICIES, help="cache policy")
    parser.add_argument("--score", default=None, choices=("mass", "logits"),
                        help="deep-forcing Top-C scoring (default mass; logits = the release)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/latents.pt", help="output .pt (default out/latents.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="latent height and width (default: the model's, 8 8 tiny / 60 104 wan-1.3b)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model dtype")
    parser.add_argument("--cache-dtype", default=None, choices=tuple(DTYPES), help="KV cache dtype (default: --dtype)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "reference"))
    parser.add_argument("--save-every", type=int, default=1, metavar="K",
                        help="rewrite --out every K blocks (default 1; the file includes the cache state)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny model on CPU, whose ops are too small to "
                             "gain from more; torch's default otherwise). Resume with the same count: CPU matmuls "
                             "may round differently with another")


def make_policy(name: str, score: Optional[str] = None) -> Any:
    """The :class:`CachePolicy` for a command-line name (``deep-forcing`` takes ``score``)."""
    from ..cache import CachePolicy

    if score is not None and name != "deep-forcing":
        raise ValueError(f"--score applies to the deep-forcing policy only, not {name!r}")
    if name == "full":
        return CachePolicy.full()
    if name == "sliding":
        return CachePolicy.sliding()
    if name == "frame-sink":
        return CachePolicy.frame_sink()
    if name == "deep-sink":
        return CachePolicy.deep_sink()
    if name == "deep-forcing":
        return CachePolicy.deep_forcing(score=score or "mass")
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def build_model(name: str, checkpoint: Optional[str], seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """A :class:`CausalWanModel`: loaded from ``checkpoint``, or randomly initialised from ``seed``."""
    from ..models import CausalWanModel, WanConfig, load_wan_state_dict

    model = CausalWanModel(WanConfig.from_name(name))
    if checkpoint:
        load_wan_state_dict(model, _load_tensors(checkpoint))
    else:
        model.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return model.to(device=device, dtype=dtype).eval()


def random_text_embeds(config: Any, seed: int) -> torch.Tensor:
    """Stand-in text embeddings ``[1, text_len, text_dim]`` drawn from ``seed`` (16 rows when text_len is None)."""
    g = torch.Generator().manual_seed(seed + 1)  # not the model's stream
    return torch.randn(1, config.text_len or 16, config.text_dim, generator=g)


def _load_tensors(path: str) -> Any:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise SystemExit(f"reading {path} needs the safetensors package") from e
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_text(path: str) -> torch.Tensor:
    obj = _load_tensors(path)
    if isinstance(obj, dict):
        for key in ("text_embeds", "prompt_embeds", "context", "embeds"):
            if isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, torch.Tensor):
        raise SystemExit(f"{path} must hold a tensor [L, text_dim] or [B, L, text_dim]")
    return obj.float()


def _load_run(path: str) -> Dict[str, Any]:
    """A run file written by ``deepforcing generate``, or SystemExit naming the file (never a traceback)."""
    try:
        run_file = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, or not one of ours
        raise SystemExit(f"cannot resume {path}: not a file written by `deepforcing generate` ({type(e).__name__})")
    if not (isinstance(run_file, dict) and isinstance(run_file.get("settings"), dict)
            and isinstance(run_file.get("state"), dict) and isinstance(run_file.get("latents"), torch.Tensor)):
        raise SystemExit(f"cannot resume {path}: not a file written by `deepforcing generate` "
                         "(it needs 'latents', 'settings' and 'state')")
    return run_file


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` (a crash never leaves half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def run(args: argparse.Namespace) -> int:
    if args.frames <= 0 or args.frames % 3:
        raise SystemExit(f"--frames must be a positive multiple of 3 (the block size), got {args.frames}")
    if args.save_every <= 0:
        raise SystemExit("--save-every must be >= 1")
    try:
        policy = make_policy(args.policy, args.score)
    except ValueError as e:
        raise SystemExit(str(e))
    settings = {"model": args.model, "checkpoint": args.checkpoint, "text_embeds": args.text_embeds,
                "policy": args.policy, "score": args.score, "seed": args.seed, "batch_size": args.batch_size,
                "latent_size": list(args.latent_size) if args.latent_size else None, "dtype": args.dtype,
                "cache_dtype": args.cache_dtype or args.dtype, "backend": args.backend}

    previous = None
    if os.path.exists(args.out):
        if args.resume:
            previous = _load_run(args.out)
            old = previous["settings"]
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise SystemExit(f"cannot resume {args.out}: settings differ (saved, now): {diff}")
            if previous.get("frames_done", 0) >= args.frames:
                print(f"{args.out} already holds {previous['frames_done']} frames; nothing to do")
                return 0
        elif not args.force:
            raise SystemExit(f"{args.out} exists: pass --resume to continue it or --force to overwrite it")
    elif args.resume:
        print(f"{args.out} does not exist yet: starting a new run", file=sys.stderr)

    threads = args.threads if args.threads is not None else (1 if args.model == "tiny" and args.device == "cpu"
                                                              else None)
    if threads is not None and threads < 1:
        raise SystemExit("--threads must be >= 1")
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _generate(args, policy, settings, previous)
    finally:
        torch.set_num_threads(saved)


def _generate(args: argparse.Namespace, policy: Any, settings: Dict[str, Any], previous: Optional[Dict]) -> int:
    from ..driver import generate

    dtype = DTYPES[args.dtype]
    try:
        model = build_model(args.model, args.checkpoint, args.seed, dtype, args.device)
    except ValueError as e:
        raise SystemExit(f"cannot load {args.checkpoint}: {e}")
    text = _load_text(args.text_embeds) if args.text_embeds else random_text_embeds(model.config, args.seed)
    rollout = generate(model, text, args.frames, policy, args.seed, batch_size=args.batch_size,
                       latent_size=args.latent_size, cache_dtype=DTYPES[args.cache_dtype] if args.cache_dtype else None,
                       backend=args.backend, progress=not args.no_progress,
                       resume_from=previous["state"] if previous is not None else None)
    blocks = []
    if previous is not None:
        lat = previous["latents"]
        blocks.append(lat[None] if args.batch_size == 1 else lat)
    settings["frames"] = args.frames

    def save(complete: bool) -> None:
        lat = torch.cat(blocks, dim=1)
        atomic_save({"latents": lat[0] if args.batch_size == 1 else lat, "settings": settings,
                     "frames_done": rollout.frames_done, "complete": complete,
                     "state": _to_cpu(rollout.state_dict())}, args.out)

    done_at_start, time_at_start = rollout.frames_done, rollout.elapsed_s
    n = 0
    for block in rollout:
        blocks.append(block.detach().cpu())
        n += 1
        if n % args.save_every == 0 or rollout.frames_done >= args.frames:
            save(rollout.frames_done >= args.frames)
    new = rollout.frames_done - done_at_start
    spent = rollout.elapsed_s - time_at_start
    fps = new / spent if spent > 0 else float("nan")
    print(f"wrote {args.out}: {rollout.frames_done} latent frames ({new} new, {fps:.1f} frames/s), "
          f"policy {args.policy}, cache {rollout.cache_frames:g} frames")
    return 0
