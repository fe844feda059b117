"""`deepforcing generate`: roll a Wan causal DiT over the streaming cache and save the latents block by block.

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

from ._common import StopRequest, check_frames, check_output_file, check_positive, fail, set_threads

from ..presets import MODEL_NAMES, POLICY_NAMES, canonical_model_name, canonical_policy_name

POLICIES = POLICY_NAMES  # spelled with underscores; the hyphenated aliases (deep-forcing) are accepted too
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKEND_CHOICES = ("auto", "triton", "cpp", "reference")
MODELS = MODEL_NAMES


def _switch(value: str):
    """argparse type of --switch FRAME:TEXT."""
    try:
        from ..pipeline import parse_switch

        return parse_switch(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def policy_name(value: str) -> str:
    """argparse type of ``--policy``: the canonical name (``deep-forcing`` -> ``deep_forcing``)."""
    try:
        return canonical_policy_name(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown policy {value!r}; choose from {', '.join(POLICY_NAMES)} "
                                         "(hyphens or underscores)") from None


def model_name(value: str) -> str:
    """argparse type of ``--model``: the canonical name (``wan-1.3b`` -> ``wan_1_3b``)."""
    try:
        return canonical_model_name(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; choose from {', '.join(MODEL_NAMES)}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", type=model_name,
                        help=f"model size: {', '.join(MODEL_NAMES)} (default tiny)")
    parser.add_argument("--checkpoint", default=None, help="Wan / Self-Forcing state dict (.pt or .safetensors); "
                                                           "default: random weights from --seed")
    parser.add_argument("--text-embeds", default=None,
                        help="a .pt / .safetensors holding a tensor [L, text_dim] or [B, L, text_dim] (or a dict with "
                             "'text_embeds' / 'prompt_embeds'); default: random from --seed")
    parser.add_argument("--frames", type=int, default=30,
                        help="latent frames of the stream, a multiple of 3 (default 30; no upper bound); with "
                             "--image / --video they include the given frames. Each latent frame is 4 video frames "
                             "(the first one 1)")
    parser.add_argument("--policy", default="deep_forcing", type=policy_name,
                        help=f"cache policy: {', '.join(POLICY_NAMES)} (default deep_forcing; deep-forcing etc. "
                             "accepted)")
    parser.add_argument("--score", default=None, choices=("mass", "logits"),
                        help="deep-forcing Top-C scoring (default mass; logits = the release)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the random weights, the random text and the rollout's noise (default 0)")
    parser.add_argument("--out", default="out/latents.pt",
                        help="the run's manifest (default out/latents.pt); blocks and the resume state go in "
                             "<out>.d/")
    parser.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    parser.add_argument("--force", action="store_true", help="replace an existing run at --out")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="videos generated together, each its own stream (default 1)")
    parser.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="latent height and width, positive multiples of 2 (default: the model's, 8 8 tiny / "
                             "60 104 wan-1.3b)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model dtype (default float32)")
    parser.add_argument("--cache-dtype", default=None, choices=tuple(DTYPES), help="KV cache dtype (default: --dtype)")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda or cuda:N (default cuda when a GPU is available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="attention backend: auto (best available), triton (CUDA), cpp (CPU) or reference "
                             "(default auto)")
    parser.add_argument("--save-every-s", type=float, default=60.0, metavar="S",
                        help="save the resume state (the whole cache) at most every S seconds (default 60; 0: after "
                             "every block, whatever --max-save-overhead says); it is also saved on SIGINT / SIGTERM "
                             "and at the end. Finished blocks are always written at once")
    parser.add_argument("--max-save-overhead", type=float, default=0.02, metavar="FRACTION",
                        help="stretch the save interval so that the time a save holds generation (its snapshot) "
                             "stays below this fraction of the run (default 0.02; 0: never stretch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny model on CPU, whose ops are too small to "
                             "gain from more; torch's default otherwise). Resume with the same count: CPU matmuls "
                             "may round differently with another")
    # prompt -> mp4 (deepforcing_kernels/commands/video.py; the video libraries load only on this path)
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="the prompt: the run goes prompt -> text encoder -> rollout -> streaming decode -> mp4 "
                             "(--out NAME.mp4)")
    parser.add_argument("--prompt-file", default=None, metavar="FILE",
                        help="one prompt a line, one video each (NAME_000.mp4, NAME_001.mp4, ...)")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="an original Wan2.1-T2V-1.3B folder (Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, "
                             "google/umt5-xxl/) or a diffusers one (vae/, text_encoder/, tokenizer/); default with "
                             "--model tiny: the embedded tiny random VAE and text encoder (the video is noise)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="image-to-video: the stream starts from this picture (its first latent frame, which "
                             "Deep Forcing keeps as the sink); --frames then counts it: 1 + a multiple of 3")
    parser.add_argument("--video", default=None, metavar="PATH",
                        help="continue this video: its last frames, encoded, start the stream (trimmed to whole "
                             "blocks, or 1 + whole blocks, of latent frames)")
    parser.add_argument("--switch", action="append", default=[], type=_switch, metavar="FRAME:TEXT",
                        help="change the prompt at latent frame FRAME (a block start), e.g. --switch 48:'a red "
                             "fox runs'; repeatable")
    parser.add_argument("--recache", action="store_true",
                        help="at each --switch, recompute the K/V of the frames the cache holds whole (sink and "
                             "recent) under the new prompt")
    parser.add_argument("--segment-frames", type=int, default=None, metavar="N",
                        help="write the mp4 as numbered segments of N video frames each (NAME_00000.mp4, ...): a "
                             "run of hours never holds more than one open")
    parser.add_argument("--fps", type=float, default=16.0, help="mp4 frames per second (default 16, as Wan2.1)")
    # multi-GPU (deepforcing_kernels/distributed/cli.py; nothing of it is imported without --parallel)
    parser.add_argument("--parallel", default=None, choices=("sequence", "data"),
                        help="under torchrun: 'sequence' runs one stream on all ranks (Ulysses: tokens, heads and "
                             "KV cache split P ways), 'data' splits the prompts of --text-embeds [N, L, D] across "
                             "ranks")
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                        help="with --parallel: a rank that waits longer than S seconds for another exits with an "
                             "error (default 300)")


def make_policy(name: str, score: Optional[str] = None) -> Any:
    """The :class:`CachePolicy` for a command-line name (:mod:`deepforcing_kernels.presets`; ``deep_forcing``
    takes ``score``). ValueError naming ``--policy`` / ``--score``."""
    from .. import presets

    key = canonical_policy_name(name)
    if score is not None and key != "deep_forcing":
        if key == "deep_forcing_logits" and score == "logits":
            score = None
        else:
            raise ValueError(f"--score applies to the deep_forcing policy only, not {key!r}")
    return presets.make_policy(key, score=score)


def build_model(name: str, checkpoint: Optional[str], seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """A :class:`CausalWanModel`: loaded from ``checkpoint``, or randomly initialised from ``seed``."""
    from ..models import CausalWanModel, WanConfig, load_wan_state_dict

    model = CausalWanModel(WanConfig.from_name(canonical_model_name(name)))
    if checkpoint:
        load_wan_state_dict(model, read_tensors(checkpoint, "--checkpoint"))
    else:
        model.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return model.to(device=device, dtype=dtype).eval()


def random_text_embeds(config: Any, seed: int) -> torch.Tensor:
    """Stand-in text embeddings ``[1, text_len, text_dim]`` drawn from ``seed`` (16 rows when text_len is None)."""
    g = torch.Generator().manual_seed(seed + 1)  # not the model's stream
    return torch.randn(1, config.text_len or 16, config.text_dim, generator=g)


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def read_tensors(path: str, flag: str) -> Any:
    """``torch.load`` (``weights_only``) or safetensors ``load_file``; one-line failure naming ``flag`` and file."""
    if not os.path.exists(path):
        fail(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a directory, not a file")
    if os.path.getsize(path) == 0:
        fail(f"{flag} {path} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            fail(f"{flag} {path}: reading .safetensors needs the safetensors package: pip install safetensors")
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - any damage is the file's fault
            fail(f"{flag} {path} is not a readable safetensors file ({type(e).__name__}: {_first_line(e, 120)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        fail(f"{flag} {path} is not a readable torch .pt file ({type(e).__name__}: {_first_line(e, 120)})")


def load_text(path: str, text_dim: int, batch_size: int) -> torch.Tensor:
    """The text embeddings of ``--text-embeds``, checked: a float tensor ``[L, text_dim]`` or ``[B, L, text_dim]``
    (B = 1 or ``batch_size``, L >= 1), all finite."""
    obj = read_tensors(path, "--text-embeds")
    if isinstance(obj, dict):
        for key in ("text_embeds", "prompt_embeds", "context", "embeds"):
            if isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
        else:
            tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) == 1:
                obj = obj[tensors[0]]
    if not isinstance(obj, torch.Tensor):
        fail(f"--text-embeds {path} must hold a tensor [L, {text_dim}] or [B, L, {text_dim}] (or a dict with "
             f"'text_embeds' / 'prompt_embeds'), got {type(obj).__name__}")
    if obj.dim() not in (2, 3):
        fail(f"--text-embeds {path} holds a tensor of rank {obj.dim()} {list(obj.shape)}: expected [L, {text_dim}] "
             f"or [B, L, {text_dim}]")
    if obj.shape[-1] != text_dim:
        fail(f"--text-embeds {path} has width {obj.shape[-1]} {list(obj.shape)}, the model takes {text_dim}")
    if obj.shape[-2] == 0:
        fail(f"--text-embeds {path} holds no text rows {list(obj.shape)}")
    if obj.dim() == 3 and obj.shape[0] not in (1, batch_size):
        fail(f"--text-embeds {path} holds {obj.shape[0]} prompts but --batch-size is {batch_size} (use 1 prompt "
             f"or {batch_size})")
    if obj.is_complex() or obj.dtype == torch.bool:
        fail(f"--text-embeds {path} holds {obj.dtype} values, not real numbers")
    obj = obj.float()
    bad = int((~torch.isfinite(obj)).sum())
    if bad:
        fail(f"--text-embeds {path} holds {bad} NaN / inf values: the text encoder's output must be finite")
    return obj


def check_device(name: Optional[str]) -> torch.device:
    """The ``--device`` as a torch.device, or a one-line failure (bogus name, no GPU, GPU index out of range)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {name}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                 "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_backend(backend: str, device: torch.device, flag: str = "--backend") -> None:
    """Fail unless the named attention backend runs on ``device`` here ("auto" always does)."""
    if backend == "auto":
        return
    from ..attention import available_backends

    avail = available_backends(device)
    if backend not in avail:
        why = ""
        try:
            from ..backends import get_backend

            why = get_backend(backend).reason_against(device) or ""
        except Exception:  # noqa: BLE001 - an older registry: the list below says enough
            pass
        fail(f"{flag} {backend} cannot run on {device.type}" + (f" ({why})" if why else "") +
             f"; available here: {', '.join(('auto',) + tuple(avail))}")


def _policy_settings(name: str, score: Optional[str]) -> Dict[str, Any]:
    try:
        p = make_policy(name, score)
    except ValueError:
        return {}
    return {"score": p.score if p.compresses else None, "policy_config": p.to_dict()}


def run_settings(args: argparse.Namespace, policy: Any, latent_size: Any, device: torch.device,
                 threads: Optional[int]) -> Dict[str, Any]:
    """The settings a run is saved with (and that ``--resume`` must match, ``frames`` and ``threads`` aside)."""
    return {"model": args.model, "checkpoint": args.checkpoint, "text_embeds": args.text_embeds,
            "policy": args.policy, "score": policy.score if policy.compresses else None,
            "policy_config": policy.to_dict(), "seed": args.seed, "batch_size": args.batch_size,
            "latent_size": list(latent_size), "dtype": args.dtype, "cache_dtype": args.cache_dtype or args.dtype,
            "backend": args.backend, "device": device.type, "frames": args.frames, "threads": threads}


_NOT_COMPARED = ("frames", "threads")


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any], default_latent: Any) -> Dict[str, Any]:
    """``{key: (saved, now)}`` for the settings that differ; runs of earlier versions are normalised first (an
    implicit ``--score`` is the policy's default, a missing latent size the model's)."""
    old = dict(saved)
    for key, canon in (("policy", canonical_policy_name), ("model", canonical_model_name)):
        try:  # runs of earlier versions spelled deep-forcing / wan-1.3b
            old[key] = canon(old[key]) if key in old else old.get(key)
        except (TypeError, ValueError):
            pass
    if "policy_config" not in old and "policy" in old:
        old.update(_policy_settings(old["policy"], old.get("score")))
    if old.get("latent_size") is None:
        old["latent_size"] = list(default_latent)
    return {k: (old[k], v) for k, v in now.items()
            if k not in _NOT_COMPARED and k in old and old[k] != v}


def run(args: argparse.Namespace) -> int:
    from ..models import WanConfig
    from ..runio import RunError, RunStore

    if getattr(args, "parallel", None):  # torchrun ... --parallel sequence|data
        from ..distributed.cli import run as run_parallel

        return run_parallel(args)

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.threads, "--threads")
    if not math.isfinite(args.save_every_s) or args.save_every_s < 0:
        fail(f"--save-every-s must be a number of seconds >= 0, got {args.save_every_s}")
    if not math.isfinite(args.max_save_overhead) or not 0 <= args.max_save_overhead < 1:
        fail(f"--max-save-overhead must be a fraction in [0, 1), got {args.max_save_overhead}")
    try:
        policy = make_policy(args.policy, args.score)
    except ValueError as e:
        fail(str(e))
    from .video import run_video, wants_video

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
    device = check_device(args.device)
    check_backend(args.backend, device)
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: " + ("is a directory, not a file" if os.path.isdir(args.checkpoint)
                                                      else "no such file"))
    if args.resume and args.force:
        fail("--resume and --force contradict each other: --resume continues the run at --out, --force replaces it")
    if video:
        if args.text_embeds:
            fail("--text-embeds and a video run (--prompt / .mp4) contradict each other: the prompt is encoded here")
        check_output_file(args.out, "--out")
        return run_video(args, policy, device)
    text = load_text(args.text_embeds, cfg.text_dim, args.batch_size) if args.text_embeds else None

    store = RunStore(args.out)
    try:
        store.check_writable()
    except RunError as e:
        fail(str(e))
    threads = args.threads if args.threads is not None else (1 if args.model == "tiny" and device.type == "cpu"
                                                              else None)
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
        finally:
            torch.set_num_threads(saved)
    finally:
        try:
            store.close()  # every queued block reaches the disk, whatever happened
        except OSError as e:
            print(f"deepforcing generate: {e}", file=sys.stderr)


def save_interval(every_s: float, max_overhead: float, blocked_s: float) -> float:
    """Seconds until the next state save: ``--save-every-s``, stretched so that a save holding generation for
    ``blocked_s`` costs at most ``max_overhead`` of the run (``blocked_s / max_overhead``). ``every_s == 0``
    (after every block) is taken as asked."""
    if max_overhead <= 0 or every_s == 0:
        return every_s
    return max(every_s, blocked_s / max_overhead)


def _StopRequest() -> StopRequest:
    return StopRequest("deepforcing generate: {signal}: stopping after this block and saving the resume state (send "
                       "it again to stop at once)")


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
    from ..driver import generate

    dtype = DTYPES[args.dtype]
    try:
        model = build_model(args.model, args.checkpoint, args.seed, dtype, str(device))
    except (ValueError, TypeError, KeyError) as e:
        fail(f"--checkpoint {args.checkpoint}: {_first_line(e)}")
    if text is None:
        text = random_text_embeds(model.config, args.seed)
    state, on_disk, note = _resume_point(args, previous, store, settings, policy.block_frames)
    try:
        rollout = generate(model, text, args.frames, policy, args.seed, batch_size=args.batch_size,
                           latent_size=tuple(settings["latent_size"]),
                           cache_dtype=DTYPES[args.cache_dtype] if args.cache_dtype else None,
                           backend=args.backend, progress=not args.no_progress, resume_from=state)
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        if state is not None:
            where = os.path.join(store.dir, "state.pt") if previous["layout"] == "blocks" else args.out
            fail(f"cannot resume {args.out}: the saved state {where} does not fit this run ({_first_line(e)})")
        raise
    if note:
        print(note, file=sys.stderr)
    bf = rollout.block_frames
    store.write_manifest(settings, frames=args.frames, block_frames=bf, batch_size=args.batch_size,
                         frames_done=max(on_disk, rollout.frames_done), complete=False)
    from ..runio import retain_freed_host_memory

    retain_freed_host_memory()  # each state snapshot reuses the previous one's host pages
    saver = store.state_saver()
    done_at_start, time_at_start = rollout.frames_done, rollout.elapsed_s
    last_save = time.monotonic()
    gap = args.save_every_s
    mismatched = []
    with _StopRequest() as stop:
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
