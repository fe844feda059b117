"""From an original Wan2.1 folder and a causal-DiT checkpoint to a Hub folder: :func:`convert_original`
(``deepforcing convert``).

The inputs are read by the engine's own loaders, the ones ``VideoPipeline.from_weights`` uses:
:func:`~deepforcing_kernels.video.load_front_end` for the text encoder, its tokenizer and the VAE (an original
release folder -- ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/`` -- or its
diffusers form), and :func:`~deepforcing_kernels.models.checkpoints.load_checkpoint` for the DiT (Self-Forcing /
Causal Forcing / Rolling Forcing ``generator`` or ``generator_ema``, LongLive base + LoRA merged, Krea or Wan
``.safetensors``). The result is written by :meth:`DeepForcingPipeline.save_pretrained`: whole or not at all,
never over an existing folder without ``force``. Loading it back gives the same weights, so the same frames.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

__all__ = ["convert_original"]


def convert_original(weights_dir: Union[str, os.PathLike], checkpoint: Any, out: Union[str, os.PathLike], *,
                     model: Any = "wan_1_3b", dtype: torch.dtype = torch.bfloat16,
                     vae_dtype: torch.dtype = torch.float32, text_dtype: Optional[torch.dtype] = None,
                     policy: Any = "deep_forcing", lora: Any = None, lora_alpha: Optional[float] = None,
                     use_ema: Optional[bool] = None, trust_pickle: bool = False,
                     vae_config: Optional[Dict[str, Any]] = None, text_config: Optional[Dict[str, Any]] = None,
                     force: bool = False) -> Path:
    """Write the Hub folder ``out`` (see :mod:`deepforcing_kernels.pipeline.diffusers_pipeline`).

    Args:
        weights_dir: a Wan2.1-T2V folder, original or diffusers layout (the text encoder, tokenizer and VAE).
        checkpoint: the causal DiT (a file, a folder of shards, or a loaded state dict); None: the folder's own
            DiT (original layout only; Wan2.1's bidirectional base model).
        out: the folder to write.
        model: a model name of :mod:`deepforcing_kernels.presets` or a :class:`~deepforcing_kernels.models.
            WanConfig` (``tiny`` also picks the tiny VAE and text-encoder sizes unless given).
        dtype: of the DiT (and of the text encoder unless ``text_dtype``); ``vae_dtype`` of the VAE.
        policy: the default cache policy saved in ``model_index.json``.
        lora, lora_alpha, use_ema, trust_pickle: passed to ``load_checkpoint``.
        vae_config, text_config: original-format sizes (default: the real Wan2.1 ones, or tiny for ``tiny``).
        force: replace an existing folder.

    Returns:
        the folder written.

    Raises:
        FileExistsError naming the file before anything is read when ``out`` holds files and not ``force``;
        FileNotFoundError / ValueError naming the file or argument for inputs that do not fit.
    """
    from ..models import WanConfig
    from ..models.checkpoints import load_checkpoint
    from ..presets import canonical_model_name
    from ..runio.folders import check_folder_free
    from ..video import load_front_end, weights_layout
    from ..video.t5 import TINY_T5_CONFIG
    from ..video.vae import TINY_VAE_CONFIG
    from .core import VideoPipeline
    from .diffusers_pipeline import DeepForcingPipeline
    from .hub_models import CausalWanTransformer, SelfForcingScheduler

    check_folder_free(out, force=force)
    folder = Path(weights_dir)
    layout = weights_layout(folder)
    checkpoint = VideoPipeline._checkpoint_for(folder, layout, checkpoint)
    cfg = model if isinstance(model, WanConfig) else WanConfig.from_name(model)
    if not isinstance(model, WanConfig) and canonical_model_name(model) == "tiny":
        vae_config = TINY_VAE_CONFIG if vae_config is None else vae_config
        text_config = TINY_T5_CONFIG if text_config is None else text_config
    enc, vae = load_front_end(folder, dtype=vae_dtype, device="cpu", text_dtype=text_dtype or dtype,
                              text_len=cfg.text_len or 512, vae_config=vae_config if layout == "original" else None,
                              text_config=text_config if layout == "original" else None)
    tok = enc.tokenizer_object
    if tok is None or not hasattr(tok, "save_pretrained"):
        where = folder / ("google/umt5-xxl" if layout == "original" else "tokenizer")
        raise FileNotFoundError(f"tokenizer folder {str(where)!r} is missing or incomplete (tokenizer_config.json "
                                "and tokenizer.json or spiece.model)")
    dit = CausalWanTransformer(**cfg.to_dict()).eval()
    load_checkpoint(dit, checkpoint, lora=lora, lora_alpha=lora_alpha, use_ema=use_ema, trust_pickle=trust_pickle)
    dit = torch.nn.Module.to(dit, dtype=dtype)
    pipe = DeepForcingPipeline(dit, vae.model, enc.model, tok, SelfForcingScheduler(), policy=policy)
    pipe.save_pretrained(out, force=force)
    return Path(out)
