"""`deepforcing generate`: a long video from a prompt (an mp4), or its latents (a .pt run), block by block.

The subcommand's arguments and its dispatch; the work is in the modules beside this one:

* :mod:`.latents` -- the latents run (``--out NAME.pt``): a manifest plus one file per block in ``<out>.d/``,
  resumable bit for bit (:mod:`deepforcing_kernels.runio`);
* :mod:`.mp4` -- prompt -> text encoder -> rollout -> streaming decode -> mp4 (``--prompt`` / ``--out NAME.mp4``),
  through :class:`~deepforcing_kernels.pipeline.VideoPipeline`;
* :mod:`.parallel` -- ``--parallel sequence|data`` under ``torchrun``;
* :mod:`.common` -- the checks and settings the three share.

Each of them imports only :mod:`.common` (and :mod:`.latents` / :mod:`.mp4`, which the parallel runs reuse);
none imports this module.
"""
from __future__ import annotations

import argparse
import os

from ...presets import (
    BACKEND_NAMES,
    DTYPE_NAMES,
    MODEL_NAMES,
    POLICY_NAMES,
    RECIPE_NAMES,
    canonical_model_name,
    canonical_policy_name,
    canonical_recipe_name,
    recipe_help,
)

__all__ = ["add_arguments", "run", "policy_name", "model_name", "default_out"]

#: where the output goes without ``--out``: a video for a prompt run, latents otherwise
DEFAULT_VIDEO_OUT = os.path.join("out", "video.mp4")
DEFAULT_LATENTS_OUT = os.path.join("out", "latents.pt")

def _switch(value: str):
    """argparse type of --switch FRAME:TEXT."""
    try:
        from ...pipeline import parse_switch

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


MAX_COMMIT_FRAMES = 100_000


def commit_rule_frames(value: str) -> int:
    """argparse type of ``--commit-rule N``: the frames the clean pass reads (a whole number >= 1)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_COMMIT_FRAMES:  # above: a cache size torch cannot even allocate (2**64 overflows)
        raise argparse.ArgumentTypeError(f"expected a number of frames in [1, {MAX_COMMIT_FRAMES}], got {value!r}")
    return n


def add_commit_rule(parser: argparse.ArgumentParser) -> None:
    """``--commit-rule [N]``: the commit rule (docs/methods.md), an option of every ``--policy``."""
    parser.add_argument("--commit-rule", nargs="?", const=True, default=None, type=commit_rule_frames, metavar="N",
                        help="the commit rule (Dwell-Jing/commit-forcing): each block's clean pass reads only the newest "
                             "real committed frames, the block included, instead of the policy's cache; alone: the "
                             "authors' window for the policy (its window; tethercache: its recent frames), N: the "
                             "newest N frames")


def model_name(value: str) -> str:
    """argparse type of ``--model``: the canonical name (``wan-1.3b`` -> ``wan_1_3b``)."""
    try:
        return canonical_model_name(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; choose from {', '.join(MODEL_NAMES)}") from None


def recipe_name(value: str) -> str:
    """argparse type of ``--recipe``: the canonical name (``causal-forcing++-2step`` -> ``causal_forcing_pp_2step``)."""
    try:
        return canonical_recipe_name(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown recipe {value!r}; choose from {', '.join(RECIPE_NAMES)}") from None


def _steps(value: str):
    """argparse type of ``--steps`` / ``--first-block-steps``: comma-separated timesteps in [0, 1000]."""
    try:
        steps = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated timesteps such as 1000,500, got {value!r}") from None
    if not steps or any(not 0.0 <= t <= 1000.0 for t in steps):  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"timesteps must lie in [0, 1000], got {value!r}")
    return steps


def _block_frames(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of latent frames, got {value!r}") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64 latent frames, got {n}")
    return n


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
    parser.add_argument("--recipe", default="self_forcing", type=recipe_name,
                        help="how the base model is sampled (frames a block, steps, EMA weights): " + recipe_help()
                        + " (default self_forcing)")
    parser.add_argument("--block-frames", type=_block_frames, default=None, metavar="N",
                        help="latent frames a block (default: the recipe's; 1 = frame-wise)")
    parser.add_argument("--steps", type=_steps, default=None, metavar="T,T,...",
                        help="denoising timesteps before the warp (default: the recipe's, e.g. 1000,750,500,250)")
    parser.add_argument("--first-block-steps", type=_steps, default=None, metavar="T,T,...",
                        help="the first generated block's own timesteps (Causal Forcing++; default: the recipe's)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                     help="load a training checkpoint's generator_ema weights (default: the recipe's choice)")
    ema.add_argument("--no-ema", dest="ema", action="store_const", const=False,
                     help="load a training checkpoint's generator weights")
    parser.add_argument("--score", default=None, choices=("mass", "logits"),
                        help="deep-forcing Top-C scoring (default mass; logits = the release)")
    parser.add_argument("--head-jitter", type=_jitter, default=0.0, metavar="S",
                        help="LoL's multi-head RoPE jitter against sink collapse, with any --policy: each head's "
                             "temporal RoPE frequencies scaled by its own factor in [1 - S/2, 1 + S/2] (S in [0, 2); "
                             "the paper's best is 0.8; default 0: off)")
    parser.add_argument("--head-jitter-seed", type=_seed, default=0, metavar="N",
                        help="which head gets which --head-jitter factor (default 0)")
    add_commit_rule(parser)
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seeds the random weights, the random text and the rollout's noise (default 0)")
    parser.add_argument("--out", default=None,
                        help="NAME.mp4 (a video) or NAME.pt (latents: a manifest, with the blocks and the resume "
                             f"state in NAME.pt.d/); default {DEFAULT_VIDEO_OUT} with --prompt / --prompt-file, "
                             f"else {DEFAULT_LATENTS_OUT}")
    parser.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    parser.add_argument("--force", action="store_true", help="replace an existing run at --out")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="videos generated together, each its own stream (default 1)")
    parser.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="latent height and width, positive multiples of 2 (default: the model's, 8 8 tiny / "
                             "60 104 wan-1.3b)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype (default float32)")
    parser.add_argument("--cache-dtype", default=None, choices=DTYPE_NAMES, help="KV cache dtype (default: --dtype)")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda or cuda:N (default cuda when a GPU is available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
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
    # prompt -> mp4 (commands/generate/mp4.py; the video libraries load only on this path)
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
    parser.add_argument("--cut", action="append", default=[], type=int, metavar="FRAME",
                        help="--policy infinity_rope: the --switch at FRAME is a scene cut (rope_cut: the block moves "
                             "to RoPE position 45); every switch of that policy flushes its cache to sink + 2 "
                             "frames (kv_flush); repeatable")
    parser.add_argument("--recache", action="store_true",
                        help="at each --switch, recompute the K/V of the frames the cache holds whole (sink and "
                             "recent) under the new prompt")
    parser.add_argument("--segment-frames", type=int, default=None, metavar="N",
                        help="write the mp4 as numbered segments of N video frames each (NAME_00000.mp4, ...): a "
                             "run of hours never holds more than one open")
    parser.add_argument("--fps", type=_fps, default=16.0, help="mp4 frames per second (default 16, as Wan2.1)")
    # multi-GPU (commands/generate/parallel.py; nothing of it is imported without --parallel)
    parser.add_argument("--parallel", default=None, choices=("sequence", "data"),
                        help="under torchrun: 'sequence' runs one stream on all ranks (Ulysses: tokens, heads and "
                             "KV cache split P ways), 'data' splits the prompts of --text-embeds [N, L, D] across "
                             "ranks")
    parser.add_argument("--dist-timeout", type=_seconds, default=None, metavar="S",
                        help="with --parallel: a rank that waits longer than S seconds for another exits with an "
                             "error (default 300)")


def __getattr__(name: str):
    # the helpers scripts and tests reach through the command (loaded on use: `generate --help` stays light)
    if name in ("build_model", "random_text_embeds", "save_interval"):
        from . import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_out(args: argparse.Namespace) -> str:
    """``--out`` as given, or the default for the kind of run asked for."""
    if args.out is not None:
        return args.out
    return DEFAULT_VIDEO_OUT if (args.prompt or args.prompt_file) else DEFAULT_LATENTS_OUT


def _ranged(kind, lo, hi, what):
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (lo <= value <= hi):  # (NaN fails both comparisons)
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value
    return parse


_seed = _ranged(int, 0, 2 ** 63 - 1, "an int in [0, 2**63 - 1]")
_fps = _ranged(float, 1e-3, 240.0, "a frame rate in [0.001, 240]")
_seconds = _ranged(float, 1e-3, 7 * 86400.0, "a number of seconds in [0.001, 604800]")


def _jitter(text: str) -> float:
    """argparse type of ``--head-jitter``: a strength in [0, 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a strength in [0, 2))") from None
    if not 0 <= value < 2:  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"{text} is out of range: a strength in [0, 2) (0: off)")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``deepforcing generate``: under ``torchrun`` with ``--parallel``, else in this process."""
    args.out = default_out(args)
    if args.dist_timeout is not None and not getattr(args, "parallel", None):
        from .._common import fail

        fail("--dist-timeout applies to --parallel runs (nothing is distributed here)")
    if args.dist_timeout is None:
        args.dist_timeout = 300.0
    if getattr(args, "parallel", None):
        from .parallel import run as run_parallel

        return run_parallel(args)
    from .._common import check_positive

    # the count checks first (latents.run repeats them for the parallel ranks): its module imports torch, seconds
    # before a bad count could be named
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.threads, "--threads")
    from .latents import run as run_here

    return run_here(args)
