"""Wan2.1's causal video VAE, run by diffusers' ``AutoencoderKLWan``, with a streaming decoder.

The network is diffusers' own; this module adds what Wan2.1 users need on top of it:

* :meth:`WanVAE.from_original` reads the original ``Wan2.1_VAE.pth`` (key names of ``wan/modules/vae.py``:
  ``encoder.downsamples.N.residual.2.weight``, ``decoder.upsamples.N...``, ``conv1`` / ``conv2``, ...) and maps
  them onto diffusers' names for any configuration (the published conversion script
  ``scripts/convert_wan_to_diffusers.py`` hard-codes the real sizes; :func:`original_to_diffusers_key` derives
  the same table from the configuration).
* Latents are in the DiT's normalised space: Wan2.1's wrapper (``wan/modules/vae.py``, class ``WanVAE``) keeps
  ``scale = [mean, 1 / std]``; encode returns ``(mu - mean) * (1 / std)`` and decode takes ``z / (1 / std) + mean``.
  Both are applied here, in that exact arithmetic.
* :meth:`WanVAE.stream_decoder` keeps the causal decoder's feature cache (the last two frames of the input of
  each causal 3-D convolution, plus the ``"Rep"`` marker of the temporal upsamplers) across calls. Wan2.1 and
  diffusers decode one latent frame at a time through that cache anyway (and here the 1x1x1 ``post_quant_conv``
  too), so decoding a stream block by block gives bit for bit the frames of one decode of the whole stream, and
  memory is the cache (constant) plus one block's frames.

Shapes: latents ``[B, F, z_dim, h, w]`` (frame-major, as the DiT produces them); video ``[B, T, 3, H, W]`` in
[-1, 1] with ``T = 1 + 4 (F - 1)`` and ``H, W = 8 h, 8 w`` for Wan2.1's configuration.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..formats import STREAM_DECODER_FORMAT
from ._deps import require
from .vae_layout import _check_config, original_state_dict_shapes, original_to_diffusers_key, random_original_state_dict  # noqa: F401

__all__ = ["WanVAE", "StreamDecoder", "STREAM_DECODER_FORMAT", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD",
           "original_to_diffusers_key",
           "WAN21_VAE_CONFIG", "TINY_VAE_CONFIG"]

#: Wan2.1's per-channel latent statistics (``wan/modules/vae.py``, class ``WanVAE``).
WAN21_LATENT_MEAN: Tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD: Tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

#: The real Wan2.1 VAE, in the original keyword names (``_video_vae`` in ``wan/modules/vae.py``).
WAN21_VAE_CONFIG: Dict[str, Any] = dict(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                                        temperal_downsample=(False, True, True))
#: The tiny random VAE of ``--model tiny``: Wan2.1's layout (8x spatial, 4x temporal) at base width 8 and 4 latent
#: channels (the tiny DiT's ``in_dim``); latent mean 0, std 1.
TINY_VAE_CONFIG: Dict[str, Any] = dict(dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=1, attn_scales=(),
                                       temperal_downsample=(False, True, True))


def _load_file(path: Union[str, os.PathLike], what: str) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such file {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{what}: {str(p)!r} is a folder; pass the weights file (or use from_pretrained for a "
                         "diffusers-format folder)")
    try:
        if p.suffix == ".safetensors":
            st = require("safetensors.torch", what)
            return st.load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip, safetensors errors all mean "not a weights file"
        raise ValueError(f"{what}: {str(p)!r} is not a readable weights file "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{what}: {str(p)!r} holds a {type(sd).__name__}, not a state dict")
    return dict(sd)


def _short(names: Sequence[str], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _diffusers_folder(folder: Union[str, os.PathLike], sub: str, original: str, cls: str) -> Path:
    """The diffusers-format ``sub/`` folder ``from_pretrained`` reads: ``folder`` itself or its ``sub/``; a
    FileNotFoundError naming the missing ``config.json`` otherwise (pointing at ``from_original`` when the folder
    holds the original ``original`` file instead)."""
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"{cls}.from_pretrained: no such folder {str(p)!r}")
    if not (p / "config.json").exists() and (p / sub / "config.json").exists():
        p = p / sub
    if not (p / "config.json").exists():
        hint = ""
        if (p / original).exists():
            hint = f"; it holds the original {original}: use {cls}.from_original({str(p / original)!r})"
        raise FileNotFoundError(f"{cls}.from_pretrained: {str(p / 'config.json')!r} is missing "
                                f"(not a diffusers-format {sub}/ folder){hint}")
    return p


def _diffusers_model(dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                     temperal_downsample: Sequence[bool], mean: Sequence[float], std: Sequence[float]):
    diffusers = require("diffusers", "WanVAE")
    return diffusers.AutoencoderKLWan(base_dim=dim, z_dim=z_dim, dim_mult=list(dim_mult),
                                      num_res_blocks=num_res_blocks, attn_scales=[],
                                      temperal_downsample=list(temperal_downsample), latents_mean=list(mean),
                                      latents_std=list(std))


def _place(model: Any, dtype: torch.dtype, device: Union[str, torch.device]) -> Any:
    # nn.Module.to, not ModelMixin.to: the latter warns about "modules to keep in float32" even when that list is
    # empty, as it is for AutoencoderKLWan
    torch.nn.Module.to(model, device=device)
    if next(model.parameters()).dtype != dtype:
        torch.nn.Module.to(model, dtype=dtype)
    return model


class WanVAE(torch.nn.Module):
    """Wan2.1's video VAE in the DiT's normalised latent space.

    Build it with :meth:`from_original`, :meth:`from_pretrained` or :meth:`tiny`; the diffusers model is
    ``self.model``. ``latent_channels``, ``temporal_factor`` (4) and ``spatial_factor`` (8) describe the shapes.
    """

    def __init__(self, model: Any, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        """Wrap a diffusers ``AutoencoderKLWan``; ``mean`` / ``std`` default to its config's latent statistics."""
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        z = int(cfg.z_dim)
        mean = list(cfg.latents_mean if mean is None else mean)
        std = list(cfg.latents_std if std is None else std)
        if len(mean) != z or len(std) != z:
            raise ValueError(f"latent mean/std must have z_dim={z} values, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError("latent std values must be positive")
        p = next(model.parameters())
        # Wan2.1 keeps scale = [mean, 1 / std] in the model dtype and computes with those tensors.
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=p.dtype, device=p.device), persistent=False)
        self.register_buffer("latent_inv_std", 1.0 / torch.tensor(std, dtype=p.dtype, device=p.device),
                             persistent=False)
        self.latent_channels = z
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1)
        conv = require("diffusers.models.autoencoders.autoencoder_kl_wan", "WanVAE").WanCausalConv3d
        self._num_decoder_convs = sum(isinstance(m, conv) for m in model.decoder.modules())

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self.latent_mean.dtype

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.latent_mean.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_original(cls, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]], *,
                      dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                      dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                      num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                      temperal_downsample: Sequence[bool] = (False, True, True),
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> "WanVAE":
        """Load Wan2.1's original VAE weights (``Wan2.1_VAE.pth``, key names of ``wan/modules/vae.py``).

        Args:
            path_or_state_dict: the ``.pth`` (or ``.safetensors``) file, or its state dict.
            dtype, device: where the model lives.
            dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample: the original constructor's
                keywords; defaults are the real model.
            mean, std: latent statistics; Wan2.1's 16 values when ``z_dim == 16``, else zeros / ones.

        Raises:
            ValueError: keys that do not match (listed), a shape mismatch, a diffusers-format state dict, or a bad
                configuration. FileNotFoundError: no such file.
        """
        _check_config(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample)
        if isinstance(path_or_state_dict, Mapping):
            sd = dict(path_or_state_dict)
        else:
            sd = _load_file(path_or_state_dict, "WanVAE.from_original")
        for wrapper in ("state_dict", "model"):
            if wrapper in sd and isinstance(sd[wrapper], Mapping):
                sd = dict(sd[wrapper])
        if any(k.startswith(("decoder.up_blocks.", "decoder.conv_in.", "post_quant_conv.")) for k in sd):
            raise ValueError("WanVAE.from_original: these weights are in diffusers' layout (decoder.up_blocks..., "
                             "post_quant_conv...); load the vae/ folder with WanVAE.from_pretrained instead")
        if mean is None:
            mean = WAN21_LATENT_MEAN if z_dim == 16 else (0.0,) * z_dim
        if std is None:
            std = WAN21_LATENT_STD if z_dim == 16 else (1.0,) * z_dim
        model = _diffusers_model(dim, z_dim, dim_mult, num_res_blocks, temperal_downsample, mean, std)
        own = model.state_dict()
        mapped: Dict[str, torch.Tensor] = {}
        unknown: List[str] = []
        for k, v in sd.items():
            nk = original_to_diffusers_key(k, num_res_blocks=num_res_blocks, levels=len(dim_mult))
            if nk is None or nk not in own:
                unknown.append(k)
            else:
                mapped[nk] = v
        missing = sorted(set(own) - set(mapped))
        if unknown or missing:
            raise ValueError("WanVAE.from_original: the state dict does not match Wan2.1's VAE "
                             f"(dim={dim}, z_dim={z_dim}, dim_mult={tuple(dim_mult)}, num_res_blocks={num_res_blocks})"
                             f": unexpected ({len(unknown)}): {_short(sorted(unknown))}; missing ({len(missing)}): "
                             f"{_short(missing)}")
        for k, v in mapped.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"WanVAE.from_original: {k!r} is a {type(v).__name__}, not a tensor")
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"WanVAE.from_original: {k!r} has shape {list(v.shape)} but the model expects "
                                 f"{list(own[k].shape)} (check dim / z_dim / dim_mult)")
        model.load_state_dict(mapped, strict=True)
        return cls(_place(model, dtype, device))

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu") -> "WanVAE":
        """Load a diffusers-format VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), local
        files only. ``folder`` may be the ``vae/`` folder itself or a pipeline folder that holds one."""
        p = _diffusers_folder(folder, "vae", "Wan2.1_VAE.pth", "WanVAE")
        diffusers = require("diffusers", "WanVAE")
        try:
            model = diffusers.AutoencoderKLWan.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"WanVAE.from_pretrained: cannot load {str(p)!r}: {str(e).splitlines()[0]}") from None
        return cls(_place(model, dtype, device))

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
             **config: Any) -> "WanVAE":
        """A random VAE with Wan2.1's layout at tiny width (:data:`TINY_VAE_CONFIG`: dim 8, z_dim 4, one residual
        block per level), for the tiny pipeline and tests; random weights from
        :func:`random_original_state_dict` (seeded)."""
        cfg = dict(TINY_VAE_CONFIG, **config)
        return cls.from_original(random_original_state_dict(seed=seed, **cfg), dtype=dtype, device=device, **cfg)

    # ------------------------------------------------------------------ normalisation
    def _unnormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, h, w] normalised -> [B, C, F, h, w] raw, as Wan2.1: ``z / (1 / std) + mean``."""
        z = latents.to(dtype=self.latent_mean.dtype, device=self.latent_mean.device).permute(0, 2, 1, 3, 4)
        view = (1, self.latent_channels, 1, 1, 1)
        return z / self.latent_inv_std.view(view) + self.latent_mean.view(view)

    def _check_latents(self, latents: torch.Tensor, name: str = "latents") -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"{name} must be a [B, F, {self.latent_channels}, h, w] tensor, got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        if latents.shape[2] != self.latent_channels:
            raise ValueError(f"{name} has {latents.shape[2]} channels (dim 2) but the VAE has "
                             f"{self.latent_channels}; the layout is [B, F, C, h, w]")
        if not latents.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {latents.dtype}")

    # ------------------------------------------------------------------ decode / encode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents ``[B, F, C, h, w]`` to video ``[B, 1 + 4 (F - 1), 3, 8h, 8w]`` in [-1, 1]
        (clamped, as Wan2.1).

        This is diffusers' ``AutoencoderKLWan._decode`` (one latent frame at a time through the decoder and its
        feature cache) with one difference: the 1x1x1 ``post_quant_conv`` is also applied frame by frame, so that
        the result does not depend on how many frames one call holds (a GEMM over more columns may sum in another
        order) and :class:`StreamDecoder` reproduces it bit for bit whatever its block sizes.
        """
        self._check_latents(latents)
        if latents.shape[1] == 0:
            raise ValueError("latents has no frames (dim 1 is 0)")
        return StreamDecoder(self).decode(latents)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode video ``[B, 1 + 4k, 3, H, W]`` in [-1, 1] to the posterior mean, normalised:
        ``[B, 1 + k, C, H/8, W/8]`` (Wan2.1 encodes frame 0 alone, then 4 frames at a time)."""
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be a [B, T, 3, H, W] tensor, got "
                             f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
        t, h, w = video.shape[1], video.shape[3], video.shape[4]
        if (t - 1) % self.temporal_factor:
            raise ValueError(f"video has {t} frames; the VAE needs 1 + {self.temporal_factor} k")
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"video is {h}x{w}; height and width must be multiples of {self.spatial_factor}")
        x = video.to(dtype=self.latent_mean.dtype, device=self.latent_mean.device).permute(0, 2, 1, 3, 4)
        mu = self.model.encode(x).latent_dist.mean
        view = (1, self.latent_channels, 1, 1, 1)
        mu = (mu - self.latent_mean.view(view)) * self.latent_inv_std.view(view)
        return mu.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for one stream: ``dec.decode(block)`` returns the block's frames; see :class:`StreamDecoder`."""
        return StreamDecoder(self)

    def output_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames: ``1 + 4 (F - 1)`` (0 for 0)."""
        return 0 if latent_frames <= 0 else 1 + self.temporal_factor * (latent_frames - 1)


class StreamDecoder:
    """Decodes one latent stream block by block, keeping the causal decoder's feature cache between blocks.

    ``decode(block)`` takes the stream's next latent frames ``[B, f, C, h, w]`` (f >= 0) and returns their video
    frames ``[B, f', 3, 8h, 8w]`` (f' = 1 + 4 (f - 1) for the first block, 4 f after). The frames of all blocks,
    concatenated, equal ``vae.decode`` of the whole stream bit for bit on CPU. What is kept between calls is the
    feature cache only (per causal convolution, at most the last two frames of its input) and the batch / size of
    the stream, so memory does not grow with the stream's length. ``reset()`` starts a new stream;
    ``state_dict()`` / ``load_state_dict()`` save a stream between blocks and continue it exactly.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the stream (drop the feature cache); the next block is a stream's first."""
        self._cache: List[Any] = [None] * self.vae._num_decoder_convs
        self._frames_in = 0
        self._shape: Optional[Tuple[int, int, int]] = None

    @property
    def latent_frames(self) -> int:
        """Latent frames decoded so far in this stream."""
        return self._frames_in

    def cache_bytes(self) -> int:
        """Bytes held by the feature cache (bounded: two frames per causal convolution)."""
        return sum(c.numel() * c.element_size() for c in self._cache if isinstance(c, torch.Tensor))

    def state_dict(self) -> Dict[str, Any]:
        """The stream's decoding state: the feature cache (one entry per causal convolution of the decoder: a
        tensor, or None before the first frame reached it), the indices of the temporal upsamplers' ``"Rep"``
        markers, the latent frames decoded so far and the stream's batch / latent size. Tensors (cloned) and plain
        values only, so ``torch.load(weights_only=True)`` reads it back; :meth:`load_state_dict` on a decoder of
        the same VAE continues the stream exactly as if it had never stopped."""
        cache = [c.clone() if isinstance(c, torch.Tensor) else None for c in self._cache]
        rep = [i for i, c in enumerate(self._cache) if isinstance(c, str)]
        return {"format": STREAM_DECODER_FORMAT, "latent_frames": self._frames_in,
                "shape": None if self._shape is None else list(self._shape), "num_convs": len(self._cache),
                "cache": cache, "rep": rep}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict` (ValueError naming what does not fit)."""
        if not isinstance(state, Mapping) or state.get("format") != STREAM_DECODER_FORMAT:
            raise ValueError(f"decoder state must come from StreamDecoder.state_dict() (format "
                             f"{STREAM_DECODER_FORMAT!r})")
        n = len(self._cache)
        cache, rep = state.get("cache"), state.get("rep", [])
        if state.get("num_convs") != n or not isinstance(cache, (list, tuple)) or len(cache) != n:
            raise ValueError(f"decoder state has {state.get('num_convs')!r} causal convolutions but this VAE's "
                             f"decoder has {n}: it was saved for another VAE")
        if not isinstance(rep, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or
                                                     not 0 <= i < n or cache[i] is not None for i in rep):
            raise ValueError("decoder state's 'rep' markers are malformed")
        frames, shape = state.get("latent_frames"), state.get("shape")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ValueError(f"decoder state's latent_frames must be a non-negative int, got {frames!r}")
        if shape is not None and (not isinstance(shape, (list, tuple)) or len(shape) != 3):
            raise ValueError(f"decoder state's shape must be [batch, h, w] or None, got {shape!r}")
        dt, dev = self.vae.latent_mean.dtype, self.vae.latent_mean.device
        new: List[Any] = []
        for i, c in enumerate(cache):
            if c is not None and not isinstance(c, torch.Tensor):
                raise ValueError(f"decoder state's cache[{i}] is a {type(c).__name__}, not a tensor or None")
            new.append(c.to(device=dev, dtype=dt, copy=True) if isinstance(c, torch.Tensor) else None)
        for i in rep:
            new[i] = "Rep"
        self._cache = new
        self._frames_in = frames
        self._shape = None if shape is None else tuple(int(v) for v in shape)

    @torch.no_grad()
    def decode(self, block: torch.Tensor) -> torch.Tensor:
        """Decode the stream's next latent frames ``[B, f, C, h, w]`` (normalised) to ``[B, f', 3, H, W]``."""
        vae = self.vae
        vae._check_latents(block, "block")
        b, f, _, h, w = block.shape
        if self._shape is not None and (b, h, w) != self._shape:
            raise ValueError(f"block has batch {b} and size {h}x{w} but this stream has batch {self._shape[0]} and "
                             f"size {self._shape[1]}x{self._shape[2]}; call reset() to start a new stream")
        sf = vae.spatial_factor
        if f == 0:
            return torch.empty(b, 0, 3, h * sf, w * sf, dtype=vae.latent_mean.dtype, device=vae.latent_mean.device)
        self._shape = (b, h, w)
        model = vae.model
        z = vae._unnormalise(block)
        outs = []
        for i in range(f):
            x = model.post_quant_conv(z[:, :, i:i + 1])  # per frame: see WanVAE.decode
            outs.append(model.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=self._frames_in == 0))
            self._frames_in += 1
        del z, x
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        del outs
        return torch.clamp(out, min=-1.0, max=1.0).permute(0, 2, 1, 3, 4)
