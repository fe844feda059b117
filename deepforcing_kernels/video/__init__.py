"""Video front end: the umT5 text encoder, the Wan2.1 VAE with a streaming decoder, and an mp4 writer.

Needs the optional extra ``video`` (``pip install "deepforcing_kernels[video]"``: transformers, diffusers, av,
safetensors). Importing this package costs nothing; each class imports its library on first use and raises one
``ImportError`` naming the extra when it is missing.

* :class:`WanVAE` (``vae.py``): Wan2.1's causal video VAE, run by diffusers' ``AutoencoderKLWan``; loads the
  original ``Wan2.1_VAE.pth`` or a diffusers ``vae/`` folder; ``decode`` / ``encode`` in the DiT's normalised
  latent space; ``stream_decoder()`` decodes block by block with bounded memory.
* :class:`UMT5Encoder` (``t5.py``): Wan2.1's umT5-XXL text encoder, run by transformers' ``UMT5EncoderModel``;
  loads ``models_t5_umt5-xxl-enc-bf16.pth`` or a diffusers ``text_encoder/`` folder.
* :class:`VideoWriter` (``writer.py``): H.264 mp4 through PyAV, frames appended as they come.
* :class:`ByteTokenizer` (``tokenizer.py``): the byte-level stand-in tokenizer of the tiny random models.
* :func:`load_front_end` / :func:`weights_layout` (``weights.py``): both from a Wan2.1 weights folder, original
  or diffusers layout.
"""
from typing import Any

__all__ = ["WanVAE", "StreamDecoder", "UMT5Encoder", "VideoWriter", "ByteTokenizer", "WAN21_LATENT_MEAN",
           "WAN21_LATENT_STD", "load_front_end", "weights_layout"]

_WHERE = {"WanVAE": "vae", "StreamDecoder": "vae", "WAN21_LATENT_MEAN": "vae", "WAN21_LATENT_STD": "vae",
          "UMT5Encoder": "t5", "VideoWriter": "writer", "ByteTokenizer": "tokenizer", "load_front_end": "weights",
          "weights_layout": "weights"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib
        mod = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
