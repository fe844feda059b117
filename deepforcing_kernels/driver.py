"""The Self-Forcing generation driver: roll a causal Wan DiT block by block over a :class:`StreamingKVCache`.

The driver reads nothing model-specific: it builds the cache from the model's
:meth:`~deepforcing_kernels.models.CausalVideoModel.cache_spec`, and runs each block with the sampler of
:mod:`deepforcing_kernels.sampler` (four warped flow-matching steps, then a clean pass at ``t = 0`` that rewrites
the block's K/V). Per block of ``block_frames`` latent frames starting at ``f0`` it draws the block's noise from
its own ``torch.Generator``, denoises, runs the clean pass, and yields ``x0 [B, block_frames, C, H, W]``.

Deliberate differences from the release: noise is drawn per block (the release draws the whole video's noise up
front), so a stream has no length limit and its state is small; everything random comes from one generator owned
by the rollout, so a seed gives the same latents on a given backend and device, whatever else uses the global RNG.

Resume: :meth:`Rollout.state_dict` (after any yielded block) holds the cache state, the generator state and the
frames done, only tensors and plain values; ``generate(..., resume_from=state)`` with the same model, text, policy,
seed and settings continues bit for bit, as if the run had never stopped.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from .models.base import build_cache, check_model
from .sampler import DENOISING_STEPS, SHIFT, clean_pass, denoise_block, warp_timesteps

__all__ = ["generate", "Rollout", "warp_timesteps", "DENOISING_STEPS", "STATE_FORMAT"]

STATE_FORMAT = "deepforcing-rollout-v1"


def _model_dtype_device(model: Any) -> Tuple[torch.dtype, torch.device]:
    params = getattr(model, "parameters", None)
    p = next(params(), None) if callable(params) else None
    if p is not None:
        return p.dtype, p.device
    return getattr(model, "dtype", torch.float32), torch.device(getattr(model, "device", "cpu"))


def _generator_for(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Rollout:
    """An in-progress Self-Forcing rollout; iterate it to get blocks ``[B, block_frames, C, H, W]`` as they are
    produced. Built by :func:`generate` (see there for the arguments)."""

    def __init__(self, model: torch.nn.Module, text_embeds: torch.Tensor, num_frames: int, policy: Any, seed: int,
                 *, batch_size: Optional[int] = None, latent_size: Optional[Sequence[int]] = None,
                 cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT, progress: bool = True,
                 callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                 resume_from: Optional[Dict[str, Any]] = None):
        check_model(model)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        from .policy import CachePolicy

        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        self.block_frames = policy.block_frames
        if num_frames % self.block_frames:
            raise ValueError(f"num_frames ({num_frames}) must be a multiple of the policy's block_frames "
                             f"({self.block_frames})")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable(block, start_frame)")
        self.model, self.policy, self.seed, self.num_frames = model, policy, seed, num_frames
        self.callback, self.progress = callback, progress
        self.dtype, self.device = _model_dtype_device(model)
        self.cache_dtype = cache_dtype or self.dtype

        # text: [L, D] or [B, L, D]; one prompt may drive a whole batch
        if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() not in (2, 3):
            raise ValueError("text_embeds must be a tensor [L, text_dim] or [B, L, text_dim]")
        if text_embeds.dim() == 2:
            text_embeds = text_embeds[None]
        b_text = text_embeds.shape[0]
        self.batch_size = int(batch_size) if batch_size is not None else b_text
        if self.batch_size <= 0 or b_text not in (1, self.batch_size):
            raise ValueError(f"batch_size {batch_size} does not match text_embeds batch {b_text}")
        if text_embeds.shape[-1] != model.text_dim:
            raise ValueError(f"text_embeds has width {text_embeds.shape[-1]}, the model takes {model.text_dim}")
        self.text = text_embeds.to(self.device, self.dtype).expand(self.batch_size, -1, -1)

        self.latent_size = tuple(int(v) for v in (latent_size if latent_size is not None
                                                  else model.default_latent_size))
        self.latent_channels = int(model.latent_channels)
        self.timesteps = warp_timesteps(denoising_steps, shift)
        self.cache = build_cache(model, policy, latent_size=self.latent_size, batch_size=self.batch_size,
                                 dtype=self.cache_dtype, device=self.device, backend=backend)
        self.tokens_per_frame = self.cache.tokens_per_frame

        self.frames_done = 0
        self.generator = _generator_for(self.device, seed)
        self.elapsed_s = 0.0
        if resume_from is not None:
            self._load_state(resume_from)
        self._pbar = None

    # ------------------------------------------------------------ setup
    def _settings(self) -> Dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "latent_size": list(self.latent_size),
                "block_frames": self.block_frames, "timesteps": list(self.timesteps), "policy": repr(self.policy),
                "cache_dtype": str(self.cache_dtype).replace("torch.", "")}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"resume_from must be a state from Rollout.state_dict() (format {STATE_FORMAT!r})")
        mine = self._settings()
        for key, value in state["settings"].items():
            if mine.get(key) != value:
                raise ValueError(f"cannot resume: {key} was {value!r} in the saved run but is {mine.get(key)!r} now")
        done = int(state["frames_done"])
        if done % self.block_frames or done > self.num_frames:
            raise ValueError(f"cannot resume at frame {done} of a {self.num_frames}-frame run")
        self.cache.load_state_dict(state["cache"])
        self.generator.set_state(state["generator"].to("cpu"))
        self.frames_done = done
        self.elapsed_s = float(state.get("elapsed_s", 0.0))

    # ------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this rollout exactly: tensors and plain values only (so
        ``torch.load(weights_only=True)`` reads it back). Take it between blocks."""
        return {"format": STATE_FORMAT, "frames_done": self.frames_done, "num_frames": self.num_frames,
                "settings": self._settings(), "generator": self.generator.get_state(),
                "cache": self.cache.state_dict(), "elapsed_s": self.elapsed_s}

    @property
    def cache_frames(self) -> float:
        """Frames' worth of tokens the cache holds now (layer 0, batch element 0)."""
        return self.cache.layers[0].frames().shape[1] / self.tokens_per_frame

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.frames_done >= self.num_frames:
            self._close()
            raise StopIteration
        if self._pbar is None and self.progress:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.num_frames, initial=self.frames_done, unit="frame", desc="generate",
                              dynamic_ncols=True)
        t0 = time.perf_counter()
        f0 = self.frames_done
        block = self._block(f0)
        self.frames_done = f0 + self.block_frames
        self.elapsed_s += time.perf_counter() - t0
        if self._pbar is not None:
            self._pbar.update(self.block_frames)
            self._pbar.set_postfix(cache=f"{self.cache_frames:g}f", refresh=False)
        if self.callback is not None:
            self.callback(block, f0)
        if self.frames_done >= self.num_frames:
            self._close()
        return block

    def _close(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def run(self) -> torch.Tensor:
        """Produce every remaining block (calling ``callback`` for each); return them ``[B, frames, C, H, W]``."""
        blocks = list(self)
        if not blocks:
            raise ValueError("nothing left to generate")
        return torch.cat(blocks, dim=1)

    @torch.no_grad()
    def _block(self, f0: int) -> torch.Tensor:
        g = self.generator
        shape = (self.batch_size, self.block_frames, self.latent_channels) + self.latent_size
        noise = lambda: torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)  # noqa: E731

        def flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model(x, t, self.text, cache=self.cache, start_frame=f0)

        x0 = denoise_block(flow, noise, self.timesteps, batch_size=self.batch_size, block_frames=self.block_frames,
                           dtype=self.dtype, device=self.device)
        clean_pass(flow, x0)
        return x0


def generate(model: torch.nn.Module, text_embeds: torch.Tensor, num_frames: int, policy: Any, seed: int = 0, *,
             batch_size: Optional[int] = None, latent_size: Optional[Sequence[int]] = None,
             cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
             denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT, progress: bool = True,
             callback: Optional[Callable[[torch.Tensor, int], None]] = None,
             resume_from: Optional[Dict[str, Any]] = None) -> Rollout:
    """Generate ``num_frames`` latent frames with the Self-Forcing rollout, streaming them block by block.

    Args:
        model: a :class:`~deepforcing_kernels.models.CausalVideoModel` such as
            :class:`~deepforcing_kernels.models.CausalWanModel` (any dtype / device; it is not modified).
        text_embeds: ``[L, text_dim]`` or ``[B, L, text_dim]`` text-encoder output.
        num_frames: latent frames to produce, a multiple of the policy's ``block_frames``; no upper limit.
        policy: a :class:`~deepforcing_kernels.cache.CachePolicy` (full, sliding, frame_sink, deep_sink,
            deep_forcing); the driver builds the :class:`StreamingKVCache` from it and the model's sizes.
        seed: seeds the rollout's own ``torch.Generator`` (on the model's device).
        batch_size: videos generated together (default: the text batch; one prompt may drive several).
        latent_size: latent ``(H, W)``; default ``model.default_latent_size`` (60 x 104 for Wan 1.3B).
        cache_dtype: dtype of the cached K/V and of attention (default: the model's dtype).
        backend: attention backend, passed to the cache when it takes one.
        denoising_steps, shift: the schedule before the warp (see :func:`warp_timesteps`).
        progress: show a tqdm bar (frames, frames/s, frames in cache).
        callback: ``callback(block, start_frame)`` called for each block as it is produced; with it,
            ``generate(..., callback=f).run()`` is the callback form.
        resume_from: a :meth:`Rollout.state_dict` saved by an earlier run with the same model, text, policy, seed
            and settings; the rollout continues from there bit for bit (``num_frames`` may grow).

    Returns:
        a :class:`Rollout`: iterate it for blocks ``[B, block_frames, C, H, W]`` in frame order; its
        :meth:`~Rollout.state_dict` is the resume state after the last block yielded; :meth:`~Rollout.run`
        produces the rest at once.

    Example::

        rollout = generate(model, text, num_frames=120, policy=CachePolicy.deep_forcing(), seed=0)
        for block in rollout:
            save(block, rollout.state_dict())
    """
    return Rollout(model, text_embeds, num_frames, policy, seed, batch_size=batch_size, latent_size=latent_size,
                   cache_dtype=cache_dtype, backend=backend, denoising_steps=denoising_steps, shift=shift,
                   progress=progress, callback=callback, resume_from=resume_from)
