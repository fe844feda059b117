"""The pipeline: :class:`VideoPipeline` ties text encoder, rollout, streaming decoder and writer together."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..formats import FRAME_STREAM_FORMAT, VIDEO_RUN_FORMAT
from ..sampler import DENOISING_STEPS, SHIFT
from .media import PathOrTensor, parse_switch, prefix_from_pixels, read_image, read_video
from .offload import lend
from .run import VideoRun, WriteResult
from .stream import FrameChunk, FrameStream, video_frames

__all__ = ["VideoPipeline", "PromptLike"]

PromptLike = Union[str, Sequence[str], Sequence[Tuple[int, str]]]


class VideoPipeline:
    """Prompt -> umT5 -> causal DiT rollout over the streaming cache -> streaming VAE decode -> mp4.

    Args:
        model: a :class:`~deepforcing_kernels.models.CausalWanModel` (or any
            :class:`~deepforcing_kernels.models.CausalVideoModel`) in eval mode.
        vae: a :class:`~deepforcing_kernels.video.WanVAE` whose ``latent_channels`` equal the model's.
        text_encoder: a :class:`~deepforcing_kernels.video.UMT5Encoder` (or any callable ``prompts -> [B, L,
            text_dim]``) whose width is the model's ``text_dim``.
        policy: a :class:`~deepforcing_kernels.CachePolicy` or a name of :mod:`deepforcing_kernels.presets`
            (``deep_forcing``, ``sliding``, ...).
        cache_dtype, backend: passed to the driver.
        latent_size: latent ``(h, w)``; default the model's (the video is ``8h x 8w``).
        denoising_steps, shift: the sampler's settings (Self-Forcing's by default), passed to the driver.
        first_block_steps: the first generated block's own steps (Causal Forcing++; see
            :func:`deepforcing_kernels.presets.recipe`), passed to the driver.

    Memory: ``offload`` (a :class:`~deepforcing_kernels.pipeline.offload.ComponentOffload`, default None) lends the
    text encoder and the VAE to the accelerator only while they are used; ``kv_offload`` (a device, default None)
    keeps the KV cache of the layers not in use there (:func:`~deepforcing_kernels.cache.offload.offload_layers`).

    Build one with :meth:`from_weights` (real Wan2.1 weights) or :meth:`tiny` (random stand-ins: its video is
    noise).
    """

    def __init__(self, model: Any, vae: Any, text_encoder: Any, *, policy: Any = "deep_forcing",
                 cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 latent_size: Optional[Sequence[int]] = None, denoising_steps: Sequence[float] = DENOISING_STEPS,
                 shift: float = SHIFT, first_block_steps: Optional[Sequence[float]] = None) -> None:
        from ..policy import CachePolicy

        if isinstance(policy, str):
            from ..presets import make_policy

            policy = make_policy(policy)
        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy or a policy name, got {type(policy).__name__}")
        if int(vae.latent_channels) != int(model.latent_channels):
            raise ValueError(f"the VAE has {vae.latent_channels} latent channels but the model takes "
                             f"{model.latent_channels}")
        if not callable(text_encoder):
            raise TypeError("text_encoder must be callable(prompts) -> [B, L, text_dim]")
        self.model, self.vae, self.text_encoder, self.policy = model, vae, text_encoder, policy
        self.cache_dtype, self.backend = cache_dtype, backend
        self.denoising_steps, self.shift = tuple(float(t) for t in denoising_steps), float(shift)
        self.first_block_steps = None if first_block_steps is None else tuple(float(t) for t in first_block_steps)
        self.offload: Any = None
        self.kv_offload: Optional[Union[str, torch.device]] = None
        self.latent_size = tuple(int(v) for v in (latent_size or model.default_latent_size))
        sf = int(vae.spatial_factor)
        self.pixel_size = (self.latent_size[0] * sf, self.latent_size[1] * sf)

    # ------------------------------------------------------------ constructors
    @classmethod
    def tiny(cls, seed: int = 0, *, latent_size: Sequence[int] = (8, 8), policy: Any = "deep_forcing",
             vae_dim: int = 8, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
             **kw: Any) -> "VideoPipeline":
        """A tiny random pipeline for tests and demos (no weights needed): the tiny DiT (``WanConfig.tiny()``,
        ``init_weights(zero_head=False)`` from ``seed``), ``WanVAE.tiny(seed)`` (width ``vae_dim``, 4 latent
        channels) and ``UMT5Encoder.tiny(seed)`` (width 32, 16 tokens) with the byte-level stand-in tokenizer.
        **Its video is noise**: every weight is random; point :meth:`from_weights` at real weights for video.
        ``latent_size`` (8 x 8 -> 64 x 64 video by default) must be even (the DiT's 2 x 2 patch)."""
        from ..models import CausalWanModel, WanConfig
        from ..video import UMT5Encoder, WanVAE

        model = CausalWanModel(WanConfig.tiny(latent_size=tuple(latent_size))).eval()
        model.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
        model = model.to(device=device, dtype=dtype)
        vae = WanVAE.tiny(seed, dim=vae_dim, dtype=dtype, device=device)
        enc = UMT5Encoder.tiny(seed, dim=model.text_dim, text_len=16, dtype=dtype, device=device)
        return cls(model, vae, enc, policy=policy, **kw)

    @classmethod
    def from_weights(cls, weights_dir: Union[str, os.PathLike], checkpoint: Any = None, *, model: str = "wan_1_3b",
                     dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu",
                     policy: Any = "deep_forcing", vae_dtype: Optional[torch.dtype] = None,
                     text_dtype: Optional[torch.dtype] = None, lora: Any = None, lora_alpha: Optional[float] = None,
                     use_ema: Optional[bool] = None, trust_pickle: bool = False,
                     cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                     latent_size: Optional[Sequence[int]] = None, text_len: Optional[int] = None,
                     vae_config: Optional[Dict[str, Any]] = None,
                     text_config: Optional[Dict[str, Any]] = None, **sampler: Any) -> "VideoPipeline":
        """A pipeline from a Wan2.1-T2V folder (the original release or its diffusers form) and a DiT checkpoint.

        Args:
            weights_dir: the folder: ``Wan2.1_VAE.pth`` + ``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``
                (original) or ``vae/`` + ``text_encoder/`` + ``tokenizer/`` (diffusers); see
                :func:`~deepforcing_kernels.video.weights_layout`.
            checkpoint: the causal DiT's weights (Self-Forcing, Causal / Rolling Forcing, LongLive base, Krea
                ``.safetensors``; :func:`~deepforcing_kernels.checkpoints.load_checkpoint`). None: the folder's
                own DiT (original layout: ``diffusion_pytorch_model.safetensors``, or its shards with
                ``diffusion_pytorch_model.safetensors.index.json``) -- that is Wan2.1's bidirectional base model,
                not trained for block-causal rollout; a diffusers folder's ``transformer/`` uses diffusers' names,
                which the DiT does not read, so there ``checkpoint`` is required.
            model: a model name of :mod:`deepforcing_kernels.presets` (``wan_1_3b``, ``wan_14b``) or a
                :class:`~deepforcing_kernels.models.WanConfig`.
            dtype, device: of the DiT (and the VAE / text encoder unless ``vae_dtype`` / ``text_dtype``).
            lora, lora_alpha, use_ema, trust_pickle: passed to ``load_checkpoint``.
            text_len, vae_config, text_config: passed to ``load_front_end`` (default: the model's ``text_len``
                and the real Wan2.1 sizes; original-format folders only for the configs).
            sampler: ``denoising_steps`` / ``shift`` / ``first_block_steps``, passed to the constructor.

        Raises:
            FileNotFoundError naming the missing file or folder; ValueError for weights that do not match.
        """
        from ..models import CausalWanModel
        from ..models.checkpoints import load_checkpoint
        from ..video import load_front_end, weights_layout

        folder = Path(weights_dir)
        layout = weights_layout(folder)
        checkpoint = cls._checkpoint_for(folder, layout, checkpoint)
        from ..models import WanConfig

        cfg = model if isinstance(model, WanConfig) else WanConfig.from_name(model)
        enc, vae = load_front_end(folder, dtype=vae_dtype or dtype, device=device, text_dtype=text_dtype or dtype,
                                  text_len=text_len or cfg.text_len or 512, vae_config=vae_config,
                                  text_config=text_config)
        dit = CausalWanModel(cfg).eval()
        load_checkpoint(dit, checkpoint, lora=lora, lora_alpha=lora_alpha, use_ema=use_ema,
                        trust_pickle=trust_pickle)
        dit = dit.to(device=device, dtype=dtype)
        return cls(dit, vae, enc, policy=policy, cache_dtype=cache_dtype, backend=backend, latent_size=latent_size,
                   **sampler)

    @staticmethod
    def _checkpoint_for(folder: Path, layout: str, checkpoint: Any) -> Any:
        """The DiT to load: ``checkpoint`` as given (FileNotFoundError for a path that does not exist), or with
        None the folder's own DiT."""
        if checkpoint is not None:
            if not isinstance(checkpoint, Mapping) and not Path(checkpoint).exists():
                raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
            return checkpoint
        if layout == "diffusers":
            raise ValueError(f"weights folder {str(folder)!r} is diffusers-format: its DiT "
                             f"({str(folder / 'transformer')!r}) uses diffusers' names; pass checkpoint= (a "
                             "Self-Forcing / Deep Forcing DiT file)")
        single = folder / "diffusion_pytorch_model.safetensors"
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        if single.exists():
            return single
        if index.exists():
            return folder  # load_checkpoint reads the shards named by the index
        raise FileNotFoundError(f"weights folder {str(folder)!r} has no DiT ({str(single)!r} or {str(index)!r}); "
                                "pass checkpoint= (e.g. Self-Forcing's self_forcing_dmd.pt)")

    # ------------------------------------------------------------ inputs
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``[B, L, text_dim]`` (the text encoder, no grad)."""
        with torch.no_grad(), lend(self.offload, "text_encoder"):
            emb = self.text_encoder(list(prompts))
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[-1] != self.model.text_dim:
            raise ValueError(f"the text encoder gave {getattr(emb, 'shape', type(emb).__name__)}; the model takes "
                             f"[B, L, {self.model.text_dim}]")
        return emb

    def _schedule(self, prompt: PromptLike, switches: Optional[Sequence[Tuple[int, str]]]
                  ) -> Tuple[List[Tuple[int, torch.Tensor]], Dict[str, Any]]:
        """(driver text_schedule, info): each distinct prompt encoded once."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            sched: List[Tuple[int, Any]] = [(0, prompt)]
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt is an empty list: give a prompt, a list of prompts (a batch) or a "
                                 "schedule [(0, 'a'), (48, 'b'), ...]")
            if all(isinstance(p, str) for p in prompt):  # a batch of prompts, one video each
                bad = [i for i, p in enumerate(prompt) if not p.strip()]
                if bad:
                    raise ValueError(f"prompt[{bad[0]}] is empty")
                if switches:
                    raise ValueError("switches apply to one prompt, not to a batch of prompts")
                return [(0, self.encode_prompts(prompt))], {"prompts": list(prompt)}
            sched = []
            for i, item in enumerate(prompt):
                if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)):
                    raise ValueError(f"prompt[{i}] must be a (frame, text) pair of a schedule, got {item!r}")
                sched.append((item[0], item[1]))
        else:
            raise TypeError(f"prompt must be a str, a list of str or a schedule [(frame, text), ...], got "
                            f"{type(prompt).__name__}")
        for i, item in enumerate(switches or ()):
            if isinstance(item, str):
                item = parse_switch(item)
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)):
                raise ValueError(f"switches[{i}] must be a (frame, text) pair, got {item!r}")
            sched.append((item[0], item[1]))
        for i, (f, text) in enumerate(sched):
            if not text.strip():
                raise ValueError(f"the prompt at frame {f} is empty")
        distinct = sorted({t for _, t in sched}, key=[t for _, t in sched].index)
        emb = self.encode_prompts(distinct)
        by_text = {t: emb[i:i + 1] for i, t in enumerate(distinct)}
        return [(f, by_text[t]) for f, t in sched], {"schedule": [(f, t) for f, t in sched]}

    def _prefix(self, image: Optional[PathOrTensor], video: Optional[PathOrTensor],
                prefix_latents: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        given = [n for n, v in (("image", image), ("video", video), ("prefix_latents", prefix_latents))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of image, video, prefix_latents, not {' and '.join(given)}")
        if prefix_latents is not None:
            return prefix_latents, {"prefix_frames": int(prefix_latents.shape[-4]) if
                                    isinstance(prefix_latents, torch.Tensor) and prefix_latents.dim() >= 4 else None}
        if image is None and video is None:
            return None, {}
        what = "image" if image is not None else "video"
        src = image if image is not None else video
        if isinstance(src, torch.Tensor):
            px = src
            if what == "image":
                if px.dim() == 4 and px.shape[0] == 1:
                    px = px[0]
                if px.dim() != 3:
                    raise ValueError(f"image must be a [3, H, W] tensor (or a file path), got {list(px.shape)}")
                px = px[None]
            elif px.dim() == 5 and px.shape[0] == 1:
                px = px[0]
        elif isinstance(src, (str, os.PathLike)):
            px = read_image(src)[None] if what == "image" else read_video(src)
        else:
            raise TypeError(f"{what} must be a file path or a tensor, got {type(src).__name__}")
        if px.dim() != 4 or px.shape[1] != 3:
            raise ValueError(f"{what} must have 3 (RGB) channels: [T, 3, H, W] frames, got {list(px.shape)}")
        with lend(self.offload, "vae"):
            lat, info = prefix_from_pixels(self.vae, px, self.pixel_size, self.policy.block_frames, what=what)
        info[what] = str(src) if not isinstance(src, torch.Tensor) else "<tensor>"
        return lat, info

    # ------------------------------------------------------------ streams
    def frames(self, prompt: PromptLike, num_frames: int, seed: int = 0, *, image: Optional[PathOrTensor] = None,
               video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
               switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
               resume: Optional[Mapping[str, Any]] = None, progress: bool = True, steerable: bool = False,
               _auto_tick: bool = True, scene_cuts: Sequence[int] = ()) -> FrameStream:
        """Decoded frames as they are produced: iterate the returned :class:`FrameStream` for
        :class:`FrameChunk` (``chunk.frames [B, t, 3, H, W]`` in [-1, 1], ``chunk.latents``, indices).

        Args:
            prompt: a prompt; a list of prompts (a batch, one video each); or a schedule ``[(0, "a"), (48, "b"),
                ...]`` (latent frames; switches on block boundaries).
            num_frames: latent frames of the stream, counting the prefix (``1 + 4 (num_frames - 1)`` video
                frames); the prefix's frames plus a multiple of the policy's ``block_frames``.
            seed: the rollout's seed.
            image: a picture (path or ``[3, H, W]`` tensor, uint8 or float in [-1, 1]) to start from: resized to
                cover the model's pixel size, centre-cropped, encoded to one latent frame (image-to-video).
            video: frames (path or ``[T, 3, H, W]`` tensor) to continue: the last ``1 + 4 (P - 1)`` frames are
                encoded to ``P`` latent frames, ``P`` the largest valid prefix length (whole blocks, or 1 + whole
                blocks) that the video gives; the earlier frames are dropped (``stream.info`` says how many).
            prefix_latents: or the prefix latents themselves ``[B, P, C, h, w]``.
            switches: ``[(frame, "text"), ...]`` (or ``"FRAME:TEXT"`` strings) after ``prompt``.
            recache: the driver's KV re-cache at each switch.
            scene_cuts: switch frames that are scene cuts (``infinity_rope``: rope_cut; the driver's ``scene_cuts``).
            resume: a :meth:`FrameStream.state_dict` of the same call; the stream continues after it.
            progress: a tqdm bar with frames/s of generation and of decoding.
            steerable: let :meth:`FrameStream.switch` re-cache at a switch made while the stream runs (the
                rollout keeps the clean latents of the sink and the last window); the frames are the same.

        Raises:
            ValueError / FileNotFoundError naming the argument or file, before anything is generated.
        """
        from ..driver import generate

        schedule, info = self._schedule(prompt, switches)
        prefix, pinfo = self._prefix(image, video, prefix_latents)
        info.update(pinfo)
        rstate = dstate = None
        if resume is not None:
            if not isinstance(resume, Mapping) or resume.get("format") != FRAME_STREAM_FORMAT:
                raise ValueError(f"resume must be a FrameStream.state_dict() (format {FRAME_STREAM_FORMAT!r})")
            rstate, dstate = resume.get("rollout"), resume.get("decoder")
        rollout = generate(self.model, None, num_frames, self.policy, seed, latent_size=self.latent_size,
                           cache_dtype=self.cache_dtype, backend=self.backend, progress=False,
                           resume_from=rstate, prefix_latents=prefix, text_schedule=schedule, recache=recache,
                           steerable=steerable, denoising_steps=self.denoising_steps, shift=self.shift,
                           first_block_steps=self.first_block_steps, scene_cuts=scene_cuts)
        if self.kv_offload is not None:
            from ..cache.offload import offload_layers

            rollout.kv_offload = offload_layers(rollout.cache, self.kv_offload)
        decoder = self.vae.stream_decoder()
        if dstate is not None:
            with lend(self.offload, "vae"):  # the decoder's feature cache goes where the VAE runs
                decoder.load_state_dict(dstate)
            if decoder.latent_frames != rollout.frames_done:
                raise ValueError(f"cannot resume: the decoder state is at latent frame {decoder.latent_frames} but "
                                 f"the rollout state at {rollout.frames_done}")
        stream = FrameStream(rollout, decoder, progress=progress, info=info, auto_tick=_auto_tick,
                             encode=lambda text: self.encode_prompts([text]),
                             decode_context=lambda: lend(self.offload, "vae"))
        stream.frames_out = video_frames(rollout.frames_done, stream.tf)
        return stream

    def open(self, path: Union[str, os.PathLike], prompt: PromptLike, num_frames: int, seed: int = 0, *,
             fps: float = 16, segment_frames: Optional[int] = None, image: Optional[PathOrTensor] = None,
             video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
             switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
             resume: Optional[Mapping[str, Any]] = None, progress: bool = True, on_error: str = "partial",
             codec: Optional[str] = None, crf: int = 18, resumable: bool = True,
             steerable: bool = False, write_ahead: bool = False, scene_cuts: Sequence[int] = ()) -> VideoRun:
        """A :class:`VideoRun` writing ``path`` (or its segments); iterate it (or call ``run()``). Arguments as
        :meth:`frames` and :meth:`write`; ``resume`` is a :meth:`VideoRun.state_dict`; ``resumable=False`` keeps
        no anchor (no ``state_dict``, no latents held); ``steerable`` as :meth:`frames` (then
        :meth:`VideoRun.switch` may re-cache); ``write_ahead`` encodes each block in a writer thread while the
        next one is generated (the same file). Every input is checked before any file is created."""
        if resume is not None and (not isinstance(resume, Mapping) or resume.get("format") != VIDEO_RUN_FORMAT):
            raise ValueError(f"resume must be a VideoRun.state_dict() (format {VIDEO_RUN_FORMAT!r})")
        stream = self.frames(prompt, num_frames, seed, image=image, video=video, prefix_latents=prefix_latents,
                             switches=switches, recache=recache, progress=progress,
                             resume=None if resume is None else resume.get("stream"), steerable=steerable,
                             _auto_tick=False, scene_cuts=scene_cuts)
        return VideoRun(stream, path, fps=fps, segment_frames=segment_frames, on_error=on_error, codec=codec,
                        crf=crf, resume=resume, resumable=resumable, write_ahead=write_ahead)

    def write(self, path: Union[str, os.PathLike], prompt: PromptLike, num_frames: int, seed: int = 0, *,
              fps: float = 16, segment_frames: Optional[int] = None, image: Optional[PathOrTensor] = None,
              video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
              switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
              resume: Optional[Mapping[str, Any]] = None, progress: bool = True, on_error: str = "partial",
              codec: Optional[str] = None, crf: int = 18,
              on_block: Optional[Callable[[FrameChunk, VideoRun], None]] = None,
              resumable: bool = True, scene_cuts: Sequence[int] = ()) -> WriteResult:
        """Generate and write the mp4 while the rollout runs; returns a :class:`WriteResult`.

        Args:
            path: the ``.mp4``; with ``segment_frames=N`` the files are ``NAME_00000.mp4``, ``NAME_00001.mp4``,
                ... of exactly ``N`` video frames each (the last fewer), each finished before the next opens.
            prompt, num_frames, seed, image, video, prefix_latents, switches, recache, progress, scene_cuts: as
                :meth:`frames`.
            fps: frames per second (Wan2.1: 16).
            resume: a :meth:`VideoRun.state_dict` (e.g. saved by ``on_block``); the open segment is rewritten and
                the run continues (module docstring: the exact rule).
            on_error: what an exception / Ctrl-C leaves of the open file: ``"partial"`` (``NAME.partial.mp4``),
                ``"keep"``, ``"delete"``. Finished segments stay.
            codec, crf: the encoder (default H.264, see ``VideoWriter``) and its quality.
            on_block: ``on_block(chunk, run)`` after each block is written (``run.state_dict()`` is valid there).
            resumable: keep the anchor that ``state_dict`` needs (default).
        """
        run = self.open(path, prompt, num_frames, seed, fps=fps, segment_frames=segment_frames, image=image,
                        video=video, prefix_latents=prefix_latents, switches=switches, recache=recache,
                        resume=resume, progress=progress, on_error=on_error, codec=codec, crf=crf,
                        resumable=resumable or resume is not None, scene_cuts=scene_cuts)
        return run.run(on_block)
