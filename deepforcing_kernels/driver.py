"""The Self-Forcing generation driver: roll a causal Wan DiT block by block over a :class:`StreamingKVCache`.

Per block of ``block_frames`` (3) latent frames starting at frame ``f0`` (SPEC.md section 1):

1. draw the block's noise ``x`` from the driver's own ``torch.Generator``;
2. four denoising passes at the shift-5 warp of ``[1000, 750, 500, 250]`` = ``[1000, 937.5, 833.33.., 625]``:
   ``flow = model(x, t)``, ``x0 = x - sigma_t * flow`` (flow matching, ``sigma_t = t / 1000``, in float64 as the
   release), and between steps fresh noise: ``x = (1 - sigma_next) * x0 + sigma_next * noise``;
3. a fifth "clean context" pass at ``t = 0`` on the final ``x0`` whose only purpose is to overwrite the block's
   K/V in the cache with clean ones (its output is discarded);
4. yield ``x0`` ``[B, block_frames, C, H, W]``.

All five passes use the block's start frame, so the cache appends on the first and overwrites on the other four.

Deliberate differences from the release: noise is drawn per block (the release draws the whole video's noise up
front), so a stream has no length limit and its state is small; everything random comes from one generator owned
by the rollout, so a seed gives the same latents on a given backend and device, whatever else uses the global RNG.

Resume: :meth:`Rollout.state_dict` (after any yielded block) holds the cache state, the generator state and the
frames done, only tensors and plain values; ``generate(..., resume_from=state)`` with the same model, text, policy,
seed and settings continues bit for bit, as if the run had never stopped.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .cache import StreamingKVCache

__all__ = ["generate", "Rollout", "warp_timesteps", "DENOISING_STEPS", "STATE_FORMAT"]

# Self-Forcing's 4-step schedule before the warp, and the warp's shift.
DENOISING_STEPS: Tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
SHIFT = 5.0
STATE_FORMAT = "deepforcing-rollout-v1"


def warp_timesteps(steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT) -> List[float]:
    """The flow-matching shift warp: ``s = t / 1000``, ``t' = 1000 * shift * s / (1 + (shift - 1) * s)``.

    ``warp_timesteps()`` is ``[1000.0, 937.5, 833.333..., 625.0]`` (floats: rounding 833.33 to 833 changes the
    output by several percent).
    """
    out = []
    for t in steps:
        if not 0.0 <= float(t) <= 1000.0:
            raise ValueError(f"timesteps must lie in [0, 1000], got {t}")
        s = float(t) / 1000.0
        out.append(1000.0 * shift * s / (1.0 + (shift - 1.0) * s))
    return out


def _model_dtype_device(model: torch.nn.Module) -> Tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


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
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "num_layers"):
            raise TypeError(f"model must be a CausalWanModel (with .config), got {type(model).__name__}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.block_frames = int(getattr(policy, "block_frames", 3))
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
        if text_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"text_embeds has width {text_embeds.shape[-1]}, the model takes {cfg.text_dim}")
        self.text = text_embeds.to(self.device, self.dtype).expand(self.batch_size, -1, -1)

        self.latent_size = tuple(int(v) for v in (latent_size if latent_size is not None else cfg.latent_size))
        rows, cols = cfg.token_grid(self.latent_size)
        self.tokens_per_frame = rows * cols
        self.timesteps = warp_timesteps(denoising_steps, shift)
        self.cache = self._make_cache(cfg, backend)

        self.frames_done = 0
        self.generator = _generator_for(self.device, seed)
        self.elapsed_s = 0.0
        if resume_from is not None:
            self._load_state(resume_from)
        self._pbar = None

    # ------------------------------------------------------------ setup
    def _make_cache(self, cfg: Any, backend: str) -> StreamingKVCache:
        kw: Dict[str, Any] = dict(num_layers=cfg.num_layers, batch_size=self.batch_size, num_heads=cfg.num_heads,
                                  head_dim=cfg.head_dim, tokens_per_frame=self.tokens_per_frame, rope=cfg.rope(),
                                  dtype=self.cache_dtype, device=self.device)
        params = inspect.signature(StreamingKVCache).parameters
        if "backend" in params:
            kw["backend"] = backend
        elif backend != "auto":
            raise ValueError(f"backend={backend!r} cannot be chosen: this StreamingKVCache picks its own")
        return StreamingKVCache(self.policy, **kw)

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
        cfg, g = self.model.config, self.generator
        shape = (self.batch_size, self.block_frames, cfg.in_dim) + self.latent_size
        noise = lambda: torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)  # noqa: E731
        x = noise().to(self.dtype)
        x0 = x
        last = len(self.timesteps) - 1
        for i, t in enumerate(self.timesteps):
            ts = torch.full((self.batch_size, self.block_frames), t, dtype=torch.float32, device=self.device)
            flow = self.model(x, ts, self.text, cache=self.cache, start_frame=f0)
            sigma = t / 1000.0
            x0 = (x.double() - sigma * flow.double()).to(self.dtype)
            if i < last:
                s_next = self.timesteps[i + 1] / 1000.0
                x = ((1.0 - s_next) * x0.float() + s_next * noise()).to(self.dtype)
        # clean context pass: rewrites the block's K/V from the clean x0 at t = 0; its output is not used
        zeros = torch.zeros((self.batch_size, self.block_frames), dtype=torch.float32, device=self.device)
        self.model(x0, zeros, self.text, cache=self.cache, start_frame=f0)
        return x0


def generate(model: torch.nn.Module, text_embeds: torch.Tensor, num_frames: int, policy: Any, seed: int = 0, *,
             batch_size: Optional[int] = None, latent_size: Optional[Sequence[int]] = None,
             cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
             denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT, progress: bool = True,
             callback: Optional[Callable[[torch.Tensor, int], None]] = None,
             resume_from: Optional[Dict[str, Any]] = None) -> Rollout:
    """Generate ``num_frames`` latent frames with the Self-Forcing rollout, streaming them block by block.

    Args:
        model: a :class:`~deepforcing_kernels.models.CausalWanModel` (any dtype / device; it is not modified).
        text_embeds: ``[L, text_dim]`` or ``[B, L, text_dim]`` text-encoder output.
        num_frames: latent frames to produce, a multiple of the policy's ``block_frames``; no upper limit.
        policy: a :class:`~deepforcing_kernels.cache.CachePolicy` (full, sliding, frame_sink, deep_sink,
            deep_forcing); the driver builds the :class:`StreamingKVCache` from it and the model's sizes.
        seed: seeds the rollout's own ``torch.Generator`` (on the model's device).
        batch_size: videos generated together (default: the text batch; one prompt may drive several).
        latent_size: latent ``(H, W)``; default ``model.config.latent_size`` (60 x 104 for Wan 1.3B). Tokens per
            frame are ``(H / 2) * (W / 2)``.
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
