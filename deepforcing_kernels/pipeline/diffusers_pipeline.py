"""The package in diffusers' shape: :class:`DeepForcingPipeline` (a ``DiffusionPipeline``) over a Hub folder.

A Hub folder (``save_pretrained`` / ``from_pretrained`` / ``deepforcing convert``)::

    model_index.json          the pipeline class, one [library, class] per component, the default cache policy
    transformer/              config.json + diffusion_pytorch_model.safetensors: the causal Wan DiT
                              (CausalWanTransformer; original Wan2.1 parameter names)
    vae/                      diffusers' AutoencoderKLWan (config.json with the latent mean / std + safetensors)
    text_encoder/             transformers' UMT5EncoderModel (config.json + model.safetensors)
    tokenizer/                a transformers tokenizer (umT5's; ByT5's byte-level one for the tiny models)
    scheduler/                scheduler_config.json: the few-step sampler's settings (SelfForcingScheduler)

``vae/``, ``text_encoder/`` and ``tokenizer/`` load with diffusers' and transformers' own ``from_pretrained``.

The pipeline wraps this package's engine, it does not rerun it differently: every call builds a
:class:`~deepforcing_kernels.pipeline.VideoPipeline` over the same component objects (the umT5 encoder and the
VAE wrapped as :class:`~deepforcing_kernels.video.UMT5Encoder` / :class:`~deepforcing_kernels.video.WanVAE`) and
runs its stream, so for the same seed the frames are the engine's, bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..video._deps import require
from .core import VideoPipeline
from .hub_models import CausalWanTransformer, SelfForcingScheduler, wan_config_of
from .offload import ComponentOffload
from .stream import FrameStream

_diffusers = require("diffusers", "DeepForcingPipeline")
DiffusionPipeline = _diffusers.DiffusionPipeline
BaseOutput = _diffusers.utils.BaseOutput

__all__ = ["DeepForcingPipeline", "DeepForcingPipelineOutput", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class DeepForcingPipelineOutput(BaseOutput):
    """``frames``: per video, ``1 + 4 (F - 1)`` frames: ``np`` float32 ``[B, T, H, W, 3]`` in [0, 1] (so
    ``frames[0]`` is what ``diffusers.utils.export_to_video`` takes), ``pil`` a list of lists of images, ``pt`` a
    tensor ``[B, T, 3, H, W]`` in [0, 1]; ``latent``: the latents ``[B, F, C, h, w]``."""

    frames: Any


def _seed(generator: Any) -> int:
    """The rollout's seed: the rollout owns its generator (it is saved with the resume state), seeded with the
    given generator's ``initial_seed()``; None draws one from torch's global RNG, as diffusers would."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError(f"generator: give one torch.Generator (the rollout draws the whole batch's noise from "
                             f"one), got a list of {len(generator)}")
        generator = generator[0]
    if generator is None:
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed())
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator
    raise TypeError(f"generator must be a torch.Generator (or an int seed), got {type(generator).__name__}")


def _policy_config(policy: Any) -> Union[str, Dict[str, Any]]:
    from ..policy import CachePolicy
    from ..presets import canonical_policy_name

    if isinstance(policy, CachePolicy):
        return policy.to_dict()
    if isinstance(policy, str):
        return canonical_policy_name(policy)
    if isinstance(policy, dict):
        CachePolicy.from_dict(dict(policy))  # validates
        return dict(policy)
    raise TypeError(f"policy must be a CachePolicy, a policy name or a policy dict, got {type(policy).__name__}")


def _make_policy(cfg: Any) -> Any:
    from ..policy import CachePolicy
    from ..presets import make_policy

    if isinstance(cfg, CachePolicy):
        return cfg
    if isinstance(cfg, str):
        return make_policy(cfg)
    return CachePolicy.from_dict(dict(cfg))


def _to_output(frames: torch.Tensor, output_type: str) -> Any:
    """Decoded frames ``[B, t, 3, H, W]`` in [-1, 1] -> diffusers' video output (its VideoProcessor's arithmetic:
    ``x * 0.5 + 0.5`` clamped to [0, 1], float32)."""
    x = (frames * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x.float().cpu()
    return x.permute(0, 1, 3, 4, 2).float().cpu().numpy()


class DeepForcingPipeline(DiffusionPipeline):
    """Prompt -> umT5 -> causal Wan DiT streamed over the Deep Forcing KV cache -> Wan VAE, the diffusers way.

    Args:
        transformer: :class:`~deepforcing_kernels.pipeline.hub_models.CausalWanTransformer`.
        vae: diffusers' ``AutoencoderKLWan`` (its config's ``latents_mean`` / ``latents_std`` normalise).
        text_encoder: transformers' ``UMT5EncoderModel``.
        tokenizer: a transformers tokenizer (padding / truncation to the DiT's ``text_len``, as Wan2.1).
        scheduler: :class:`~deepforcing_kernels.pipeline.hub_models.SelfForcingScheduler`.
        policy: the default cache policy: a name of :mod:`deepforcing_kernels.presets`, a
            :class:`~deepforcing_kernels.CachePolicy` or its ``to_dict()`` (saved in ``model_index.json``).

    Build it with :meth:`from_pretrained` (a Hub folder), :meth:`tiny` (random tiny models) or
    :meth:`from_video_pipeline`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "frames"]

    def __init__(self, transformer: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any,
                 policy: Any = "deep_forcing") -> None:
        super().__init__()
        wan_config_of(transformer)
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.register_to_config(policy=_policy_config(policy))
        self._offload_setup: Optional[Tuple[torch.device, Tuple[str, ...]]] = None
        self._kv_host: Optional[torch.device] = None
        self._last_offload: Optional[ComponentOffload] = None
        self._last_stream: Optional[FrameStream] = None
        self._interrupt = False

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_video_pipeline(cls, pipe: VideoPipeline, tokenizer: Any = None) -> "DeepForcingPipeline":
        """The components of an engine :class:`VideoPipeline` (its DiT copied as a :class:`CausalWanTransformer`,
        its VAE, umT5 model, tokenizer, sampler settings and policy). ``tokenizer``: a transformers tokenizer,
        default the encoder's own (the tiny models' byte-level stand-in becomes transformers' ``ByT5Tokenizer``,
        which gives the same ids)."""
        from ..video.tokenizer import ByteTokenizer

        enc = pipe.text_encoder
        model = getattr(enc, "model", None)
        if model is None or not hasattr(model, "save_pretrained"):
            raise TypeError("the engine's text encoder must be a UMT5Encoder (a transformers model inside)")
        tok = tokenizer if tokenizer is not None else getattr(enc, "tokenizer_object", None)
        if isinstance(tok, ByteTokenizer):
            tf = require("transformers", "DeepForcingPipeline")
            tok = tf.ByT5Tokenizer()
        if tok is None or not hasattr(tok, "save_pretrained"):
            raise ValueError("the text encoder's tokenizer is not a transformers tokenizer: pass tokenizer= (e.g. "
                             "AutoTokenizer.from_pretrained('google/umt5-xxl'))")
        return cls(CausalWanTransformer.from_wan(pipe.model), pipe.vae.model, model, tok,
                   SelfForcingScheduler(denoising_steps=list(pipe.denoising_steps), shift=pipe.shift,
                                        first_block_steps=None if pipe.first_block_steps is None
                                        else list(pipe.first_block_steps)),
                   policy=pipe.policy)

    @classmethod
    def tiny(cls, seed: int = 0, *, latent_size: Sequence[int] = (8, 8), policy: Any = "deep_forcing",
             dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
             **kw: Any) -> "DeepForcingPipeline":
        """The tiny random pipeline of :meth:`VideoPipeline.tiny` (same seed, same weights): its video is noise."""
        return cls.from_video_pipeline(VideoPipeline.tiny(seed, latent_size=latent_size, policy=policy, dtype=dtype,
                                                          device=device, **kw))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any
                        ) -> "DeepForcingPipeline":
        """diffusers' ``DiffusionPipeline.from_pretrained`` (``torch_dtype=``, ``device_map=``, ...). A local
        folder must hold ``model_index.json`` (FileNotFoundError naming it otherwise)."""
        p = Path(pretrained_model_name_or_path)
        if p.exists() or str(pretrained_model_name_or_path).startswith((".", "/", "~")):
            if not (p / "model_index.json").is_file():
                raise FileNotFoundError(f"{str(p / 'model_index.json')!r} is missing: not a pipeline folder "
                                        "(write one with save_pretrained or `deepforcing convert`)")
        dep = getattr(_diffusers.utils, "deprecation_utils", None)
        if "torch_dtype" in kwargs and hasattr(dep, "_resolve_dtype") and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")  # diffusers >= 0.42 names it dtype (torch_dtype still works)
        if "low_cpu_mem_usage" not in kwargs and not _diffusers.utils.is_accelerate_available():
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, without its warning
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, *,
                        force: bool = False, **kwargs: Any) -> None:
        """Write the Hub folder (see the module) whole: into a temporary sibling renamed when complete; an
        existing folder with files is refused (one line naming a file) unless ``force``."""
        from ..runio.folders import atomic_folder

        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported here: save the folder, then upload it")
        with atomic_folder(save_directory, force=force) as tmp:
            super().save_pretrained(str(tmp), safe_serialization=safe_serialization, **kwargs)

    # ------------------------------------------------------------ memory
    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[str, torch.device, None] = None,
                                 *, kv_cache: bool = False) -> None:
        """Keep the text encoder and the VAE on the CPU and lend each to ``device`` only while it is used (prompt
        encoding; each block's decode); the DiT stays on ``device``. ``kv_cache=True`` also keeps the KV cache
        of the layers not in use on the CPU (:func:`~deepforcing_kernels.cache.offload.offload_layers`).
        ``device`` defaults to ``cuda`` (``cuda:gpu_id``) when there is one, else the CPU: the same code path,
        nothing moves. :meth:`memory_report` gives the resident peak per component after a call."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and gpu_id is not None:
            dev = torch.device("cuda", gpu_id)
        self._offload_setup = (dev, ("text_encoder", "vae"))
        torch.nn.Module.to(self.transformer, device=dev)
        for name in ("text_encoder", "vae"):
            torch.nn.Module.to(getattr(self, name), device="cpu")
        if kv_cache:
            self.enable_kv_cache_offload()

    def enable_kv_cache_offload(self, host: Union[str, torch.device] = "cpu") -> None:
        """Keep the KV cache of the layers not in use on ``host``; each layer's slots are on the DiT's device
        only during its own attention pass."""
        self._kv_host = torch.device(host)

    def disable_offload(self) -> None:
        """Undo :meth:`enable_model_cpu_offload` / :meth:`enable_kv_cache_offload` (components stay where they
        are: move them with ``.to(device)``)."""
        self._offload_setup, self._kv_host = None, None

    def memory_report(self) -> Dict[str, Any]:
        """After a call: per component (``transformer``, ``text_encoder``, ``vae``) its weights' bytes, whether
        it is offloaded, its uses and its resident peak on the execution device (``cuda_peak_bytes``: the CUDA
        allocator's peak during its uses); ``peak_resident_bytes`` of the components together; ``kv_cache``: the
        cache's slot bytes, those on the device at most, and the bytes moved (with KV offload)."""
        off = self._last_offload
        if off is None:
            raise ValueError("memory_report() follows a call of the pipeline (or a stream): none has run yet")
        out: Dict[str, Any] = {"device": str(off.device), "components": off.report(),
                               "peak_resident_bytes": off.peak_resident_bytes}
        s = self._last_stream
        kv = getattr(getattr(s, "rollout", None), "kv_offload", None)
        if kv is not None:
            out["kv_cache"] = kv.report()
        elif s is not None:
            n = sum(t.numel() * t.element_size() for layer in s.rollout.cache.layers for t in layer.storage.per_slot())
            out["kv_cache"] = {"device": str(off.device), "slot_bytes": n, "peak_device_bytes": n, "bytes_moved": 0}
        return out

    @property
    def _execution_device(self) -> torch.device:
        if self._offload_setup is not None:
            return self._offload_setup[0]
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------ the engine
    def engine(self, policy: Any = None, *, height: Optional[int] = None, width: Optional[int] = None,
               cache_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> VideoPipeline:
        """The :class:`VideoPipeline` over these components (what every call runs); ``policy`` None: the
        folder's default; ``height`` / ``width`` in pixels (default the DiT's latent size times 8)."""
        from ..video import UMT5Encoder, WanVAE

        cfg = wan_config_of(self.transformer)
        enc = UMT5Encoder(self.text_encoder, tokenizer=self.tokenizer, text_len=cfg.text_len or 512)
        vae = WanVAE(self.vae)
        latent = None
        if height is not None or width is not None:
            sf, ph, pw = vae.spatial_factor, cfg.patch_size[1], cfg.patch_size[2]
            h = cfg.latent_size[0] * sf if height is None else height
            w = cfg.latent_size[1] * sf if width is None else width
            for name, v, step in (("height", h, sf * ph), ("width", w, sf * pw)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
                    raise ValueError(f"{name} must be a positive multiple of {step} (the VAE's {sf}x times the "
                                     f"DiT's patch), got {v!r}")
            latent = (h // sf, w // sf)
        vp = VideoPipeline(self.transformer, vae, enc, policy=_make_policy(self.config.policy if policy is None
                                                                            else policy),
                           cache_dtype=cache_dtype, backend=backend, latent_size=latent,
                           **self.scheduler.sampler_kwargs)
        dev, offloaded = self._offload_setup or (self._execution_device, ())
        vp.offload = ComponentOffload({"transformer": self.transformer, "text_encoder": enc, "vae": vae}, dev,
                                      offloaded=offloaded)
        vp.kv_offload = self._kv_host
        self._last_offload = vp.offload
        return vp

    def stream(self, prompt: Any, num_frames: int = 21, *, generator: Any = None, policy: Any = None,
               height: Optional[int] = None, width: Optional[int] = None, image: Any = None, video: Any = None,
               switches: Any = None, recache: bool = False, cache_dtype: Optional[torch.dtype] = None,
               backend: str = "auto", resume: Any = None, progress: bool = True) -> FrameStream:
        """The frames as they are made: a :class:`~deepforcing_kernels.pipeline.FrameStream` of
        :class:`~deepforcing_kernels.pipeline.FrameChunk` (``chunk.frames [B, t, 3, H, W]`` in [-1, 1],
        ``chunk.latents``); its ``state_dict()`` resumes (``resume=``). Arguments as :meth:`__call__`."""
        vp = self.engine(policy, height=height, width=width, cache_dtype=cache_dtype, backend=backend)
        s = vp.frames(prompt, num_frames, _seed(generator), image=image, video=video, switches=switches,
                      recache=recache, resume=resume, progress=progress)
        self._last_stream = s
        return s

    def check_inputs(self, output_type: str, callback_on_step_end: Any,
                     callback_on_step_end_tensor_inputs: Sequence[str]) -> None:
        """ValueError naming the argument (the engine checks prompt, frames and prefixes)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable(pipe, step, timestep, callback_kwargs)")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} are not among "
                             f"{self._callback_tensor_inputs}")

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. in a callback) to stop after the current block."""
        return self._interrupt

    @torch.no_grad()
    def __call__(self, prompt: Any, num_frames: int = 21, *, height: Optional[int] = None,
                 width: Optional[int] = None, generator: Any = None, policy: Any = None, output_type: str = "np",
                 return_dict: bool = True, callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), image: Any = None,
                 video: Any = None, switches: Any = None, recache: bool = False,
                 cache_dtype: Optional[torch.dtype] = None, backend: str = "auto", progress: bool = True) -> Any:
        """Generate videos.

        Args:
            prompt: a prompt, a list of prompts (a batch) or a schedule ``[(0, "a"), (48, "b")]``.
            num_frames: latent frames (the video has ``1 + 4 (num_frames - 1)``): the prefix's plus a multiple of
                the policy's ``block_frames`` (3).
            height, width: pixels (default the DiT's latent size times 8).
            generator: a ``torch.Generator`` whose ``initial_seed()`` seeds the rollout (the rollout owns its
                generator, saved with its state, so the generator given is not advanced; the frames are
                :class:`VideoPipeline`'s with that seed); None: a seed from torch's global RNG.
            policy: the cache policy for this call (default the folder's).
            output_type: ``"np"`` (default), ``"pil"``, ``"pt"`` or ``"latent"`` (see :class:`DeepForcingPipelineOutput`).
            return_dict: False returns ``(frames,)``.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs) -> dict`` after each latent block
                (the rollout's unit of work: ``step`` the block's index, ``timestep`` its first latent frame,
                ``callback_kwargs`` the block's ``latents`` and/or decoded ``frames``); set ``pipe._interrupt``
                to stop early (the output holds the blocks made so far).
            image, video, switches, recache: image-to-video, video continuation, prompt switches and their KV
                re-cache (see :meth:`VideoPipeline.frames`).
            cache_dtype, backend: of the KV cache and attention.
            progress: a progress bar.
        """
        tensor_inputs = getattr(callback_on_step_end, "tensor_inputs", None) or callback_on_step_end_tensor_inputs
        self.check_inputs(output_type, callback_on_step_end, tensor_inputs)
        self._interrupt = False
        s = self.stream(prompt, num_frames, generator=generator, policy=policy, height=height, width=width,
                        image=image, video=video, switches=switches, recache=recache, cache_dtype=cache_dtype,
                        backend=backend, progress=progress)
        parts: List[Any] = []
        for i, chunk in enumerate(s):
            parts.append(chunk.latents.cpu() if output_type == "latent" else _to_output(chunk.frames, output_type))
            if callback_on_step_end is not None:
                given = {"latents": chunk.latents, "frames": chunk.frames}
                callback_on_step_end(self, i, chunk.latent_start, {k: given[k] for k in tensor_inputs})
            if self._interrupt:
                s.close()
                break
        if output_type in ("latent", "pt"):
            frames: Any = torch.cat(parts, dim=1)
        else:
            frames = np.concatenate(parts, axis=1)
            if output_type == "pil":
                from PIL import Image

                frames = [[Image.fromarray((f * 255).round().astype("uint8")) for f in vid] for vid in frames]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return DeepForcingPipelineOutput(frames=frames)
