"""Find the text encoder and the VAE in a Wan2.1 weights folder, in either published layout.

* ``original`` -- Wan-AI/Wan2.1-T2V-1.3B as released: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  the tokenizer in ``google/umt5-xxl/`` (and the DiT in ``diffusion_pytorch_model.safetensors`` + ``config.json``).
* ``diffusers`` -- Wan-AI/Wan2.1-T2V-1.3B-Diffusers: ``model_index.json``, ``vae/``, ``text_encoder/``,
  ``tokenizer/`` (and ``transformer/``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch

if TYPE_CHECKING:
    from .t5 import UMT5Encoder
    from .vae import WanVAE

__all__ = ["weights_layout", "load_front_end", "ORIGINAL_FILES", "DIFFUSERS_FILES"]

ORIGINAL_FILES = ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl")
DIFFUSERS_FILES = ("vae/config.json", "text_encoder/config.json", "tokenizer")


def weights_layout(folder: Union[str, os.PathLike]) -> str:
    """``"original"`` or ``"diffusers"`` (see the module); ``ValueError`` naming what is missing otherwise."""
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"weights folder {str(p)!r} does not exist")
    orig = [f for f in ORIGINAL_FILES if (p / f).exists()]
    diff = [f for f in DIFFUSERS_FILES if (p / f).exists()]
    if len(orig) == len(ORIGINAL_FILES):
        return "original"
    if len(diff) == len(DIFFUSERS_FILES):
        return "diffusers"
    if diff or (p / "model_index.json").exists():
        missing = [str(p / f) for f in DIFFUSERS_FILES if f not in diff]
        raise FileNotFoundError(f"weights folder {str(p)!r} looks diffusers-format but lacks {', '.join(missing)}")
    if orig:
        missing = [str(p / f) for f in ORIGINAL_FILES if f not in orig]
        raise FileNotFoundError(f"weights folder {str(p)!r} looks like an original Wan2.1 folder but lacks "
                                f"{', '.join(missing)}")
    raise FileNotFoundError(f"weights folder {str(p)!r} is neither an original Wan2.1 folder "
                            f"({', '.join(ORIGINAL_FILES)}) "
                            f"nor a diffusers one ({', '.join(DIFFUSERS_FILES)})")


def load_front_end(folder: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32,
                   device: Union[str, torch.device] = "cpu", text_len: int = 512,
                   text_dtype: Optional[torch.dtype] = None, vae_config: Optional[Dict[str, Any]] = None,
                   text_config: Optional[Dict[str, Any]] = None) -> Tuple["UMT5Encoder", "WanVAE"]:
    """The text encoder (with its tokenizer) and the VAE of a Wan2.1 weights folder of either layout.

    Args:
        folder: the weights folder.
        dtype, device: of the VAE (and of the text encoder unless ``text_dtype``).
        text_len: rows of the text embeddings (Wan2.1: 512).
        text_dtype: the text encoder's dtype (umT5-XXL is published in bf16).
        vae_config, text_config: original-format configuration keywords (default: the real models); a
            diffusers folder carries its own.
    """
    from .t5 import UMT5Encoder
    from .vae import WanVAE

    p = Path(folder)
    layout = weights_layout(p)
    tdt = text_dtype or dtype
    if layout == "original":
        enc = UMT5Encoder.from_original(p / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer=p / "google" / "umt5-xxl",
                                        text_len=text_len, dtype=tdt, device=device, **(text_config or {}))
        vae = WanVAE.from_original(p / "Wan2.1_VAE.pth", dtype=dtype, device=device, **(vae_config or {}))
    else:
        enc = UMT5Encoder.from_pretrained(p / "text_encoder", tokenizer=p / "tokenizer", text_len=text_len,
                                          dtype=tdt, device=device)
        vae = WanVAE.from_pretrained(p / "vae", dtype=dtype, device=device)
    return enc, vae
