"""`deepforcing convert`: an original Wan2.1 folder + a causal-DiT checkpoint -> a Hub folder that
``DeepForcingPipeline.from_pretrained`` (and diffusers / transformers, component by component) loads."""
from __future__ import annotations

import argparse
import os

from ..presets import DTYPE_NAMES, MODEL_NAMES, POLICY_NAMES
from ._common import fail
from .generate import model_name, policy_name

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="DIR",
                        help="a Wan2.1-T2V folder: the original release (Wan2.1_VAE.pth, "
                             "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) or its diffusers form (vae/, "
                             "text_encoder/, tokenizer/)")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="the causal DiT: Self-Forcing / Causal Forcing / Rolling Forcing .pt (generator or "
                             "generator_ema), LongLive base (+ --lora), Krea .safetensors; default: the folder's own "
                             "DiT (Wan2.1's bidirectional base model)")
    parser.add_argument("--lora", default=None, metavar="FILE", help="a LongLive LoRA, merged into the DiT")
    parser.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's alpha (default: its rank)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="take generator_ema of a training checkpoint")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                     help="take generator (default: generator when present)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="let torch.load unpickle non-tensor objects (only for files you trust)")
    parser.add_argument("--model", default="wan_1_3b", type=model_name,
                        help=f"the DiT's sizes: {', '.join(MODEL_NAMES)} (default wan_1_3b; tiny also means the "
                             "tiny VAE and text encoder)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                        help="dtype of the DiT and the text encoder (default bfloat16)")
    parser.add_argument("--vae-dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the VAE (default "
                        "float32)")
    parser.add_argument("--policy", default="deep_forcing", type=policy_name,
                        help=f"the folder's default cache policy: {', '.join(POLICY_NAMES)} (default deep_forcing)")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the Hub folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from ..runio.folders import FolderExistsError, check_folder_free

    if not args.out.strip():
        fail("--out is empty: give a folder")
    try:
        check_folder_free(args.out, force=args.force, flag="--force")
    except FolderExistsError as e:
        fail(f"--out {e}")
    if not os.path.isdir(args.weights):
        fail(f"--weights {args.weights}: " + ("is a file, not a folder" if os.path.exists(args.weights)
                                               else "no such folder"))
    for flag, path in (("--checkpoint", args.checkpoint), ("--lora", args.lora)):
        if path is not None and not os.path.exists(path):
            fail(f"{flag} {path}: no such file")
    try:
        from ..pipeline.hub import convert_original
        from ..presets import torch_dtype

        out = convert_original(args.weights, args.checkpoint, args.out, model=args.model,
                               dtype=torch_dtype(args.dtype), vae_dtype=torch_dtype(args.vae_dtype),
                               policy=args.policy, lora=args.lora, lora_alpha=args.lora_alpha, use_ema=args.use_ema,
                               trust_pickle=args.trust_pickle, force=args.force)
    except ImportError as e:
        fail(str(e).splitlines()[0])
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        fail(str(e) or type(e).__name__)  # CommandError joins a multi-line message into one line
    print(f"wrote {out}: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/")
    return 0
