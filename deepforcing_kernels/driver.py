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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .formats import ROLLOUT_STATE_FORMAT
from .models.base import build_cache, check_model
from .runio.files import content_digest
from .sampler import (
    DENOISING_STEPS,
    SHIFT,
    check_text_schedule,
    checked_timesteps,
    clean_pass,
    denoise_block,
    warp_timesteps,
)
from .schedule import switch_state

__all__ = ["generate", "Rollout", "load_run", "warp_timesteps", "DENOISING_STEPS"]


def load_run(path: str, *, with_state: bool = False) -> Dict[str, Any]:
    """A ``deepforcing generate`` output, whatever its on-disk layout: ``{"latents": [B, F, C, h, w] (or
    [F, C, h, w] for batch 1), "settings": {...}, ...}`` (see :func:`deepforcing_kernels.runio.load_run`)."""
    from .runio import load_run as _load_run

    return _load_run(path, with_state=with_state)


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


TextSchedule = Sequence[Tuple[int, torch.Tensor]]


class Rollout:
    """An in-progress Self-Forcing rollout; iterate it to get blocks ``[B, frames, C, H, W]`` as they are produced
    (``block_frames`` frames each; a prefix's blocks come first, unchanged). Built by :func:`generate` (see there
    for the arguments)."""

    def __init__(self, model: torch.nn.Module, text_embeds: Optional[torch.Tensor], num_frames: int, policy: Any,
                 seed: int, *, batch_size: Optional[int] = None, latent_size: Optional[Sequence[int]] = None,
                 cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT, progress: bool = True,
                 callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                 resume_from: Optional[Dict[str, Any]] = None, prefix_latents: Optional[torch.Tensor] = None,
                 text_schedule: Optional[TextSchedule] = None, recache: bool = False, steerable: bool = False,
                 first_block_steps: Optional[Sequence[float]] = None, scene_cuts: Sequence[int] = ()):
        check_model(model)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        from .policy import CachePolicy

        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable(block, start_frame)")
        if not isinstance(recache, bool):
            raise TypeError(f"recache must be a bool, got {type(recache).__name__}")
        if not isinstance(steerable, bool):
            raise TypeError(f"steerable must be a bool, got {type(steerable).__name__}")
        self.block_frames = F = policy.block_frames
        self.model, self.policy, self.seed, self.num_frames = model, policy, seed, num_frames
        self.callback, self.progress = callback, progress
        self.dtype, self.device = _model_dtype_device(model)
        self.cache_dtype = cache_dtype or self.dtype
        self.latent_size = tuple(int(v) for v in (latent_size if latent_size is not None
                                                  else model.default_latent_size))
        self.latent_channels = int(model.latent_channels)

        # text: one tensor, or a schedule of (first frame, tensor); [L, D] or [B, L, D]; one prompt may drive a batch
        if text_schedule is None:
            if text_embeds is None:
                raise ValueError("give text_embeds or text_schedule")
            text_schedule = [(0, text_embeds)]
        texts = check_text_schedule(text_schedule, model.text_dim)
        b_text = max(t.shape[0] for _, t in texts)
        self.batch_size = int(batch_size) if batch_size is not None else b_text
        if self.batch_size <= 0 or any(t.shape[0] not in (1, self.batch_size) for _, t in texts):
            raise ValueError(f"batch_size {batch_size} does not match the text embeddings' batch {b_text}")
        self.switch_frames = [f for f, _ in texts]
        self._texts = [t.to(self.device, self.dtype).expand(self.batch_size, -1, -1) for _, t in texts]
        self._contexts: Dict[int, Any] = {}
        self.recache = recache
        # per switch: whether it re-caches (the constructor's flag for a given schedule; add_switch sets its own)
        self._recache_at = [recache and i > 0 for i in range(len(texts))]
        if any(f not in self.switch_frames[1:] for f in scene_cuts) or (scene_cuts and not policy.block_relative):
            raise ValueError(f"scene_cuts {list(scene_cuts)} must be switch frames of text_schedule "
                             f"({self.switch_frames[1:]}) of an infinity_rope policy (rope_cut), not {policy.kind!r}")
        self._cut_at = [f in scene_cuts and i > 0 for i, f in enumerate(self.switch_frames)]
        # a live switch may ask for a re-cache at any boundary: keep the clean latents it needs from the start
        self.steerable = steerable
        self._keeps_clean = steerable or (recache and len(texts) > 1)

        # prefix: the stream's first P frames, given (image-to-video: P = 1; video continuation: P > 1)
        self.prefix = None
        P = 0
        if prefix_latents is not None:
            self.prefix = self._check_prefix(prefix_latents)
            P = self.prefix.shape[1]
        self.prefix_frames = P
        if P % F not in (0, 1):
            raise ValueError(f"prefix_latents has {P} frames: a prefix is whole blocks of {F} frames, or one "
                             f"image frame then whole blocks (1 + {F}k), as in Self-Forcing")
        if num_frames < P or (num_frames - P) % F:
            raise ValueError(f"num_frames ({num_frames}) must be the prefix's {P} frames plus a multiple of the "
                             f"policy's block_frames ({F})")
        for f in self.switch_frames[1:]:
            if not self.is_block_start(f):
                raise ValueError(f"text_schedule switches at frame {f}, which is not a block boundary (blocks start "
                                 f"at {self._starts_hint()}): switches happen between blocks")

        self.timesteps = checked_timesteps(denoising_steps, shift, "denoising_steps")
        # Causal Forcing++'s first generated block takes its own (longer) list: its configs'
        # denoising_step_list_first_chunk, applied to block_index 0 of the generated blocks (a prefix's given
        # blocks come before it)
        self.first_timesteps = (None if first_block_steps is None
                                else checked_timesteps(first_block_steps, shift, "first_block_steps"))
        self.cache = build_cache(model, policy, latent_size=self.latent_size, batch_size=self.batch_size,
                                 dtype=self.cache_dtype, device=self.device, backend=backend)
        self.tokens_per_frame = self.cache.tokens_per_frame
        # clean latents the re-cache needs: the sink's frames and the last window of frames (bounded)
        self._clean: Dict[int, torch.Tensor] = {}
        self.frames_done = 0
        self.generator = _generator_for(self.device, seed)
        self.elapsed_s = 0.0
        if resume_from is not None:
            self._load_state(resume_from)
        self._pbar = None

    # ------------------------------------------------------------ checks
    def _check_prefix(self, prefix: Any) -> torch.Tensor:
        if not isinstance(prefix, torch.Tensor) or prefix.dim() not in (4, 5) or not prefix.is_floating_point():
            raise ValueError("prefix_latents must be a float tensor [B, P, C, h, w] (or [P, C, h, w])")
        if prefix.dim() == 4:
            prefix = prefix[None]
        want = (self.latent_channels,) + self.latent_size
        if tuple(prefix.shape[2:]) != want or prefix.shape[1] == 0:
            raise ValueError(f"prefix_latents must be [B, P >= 1, {', '.join(map(str, want))}] (latent channels and "
                             f"size of this run), got {list(prefix.shape)}")
        if not bool(torch.isfinite(prefix).all()):
            raise ValueError("prefix_latents hold NaN or inf")
        return prefix.to(self.device, self.dtype)

    def is_block_start(self, frame: int) -> bool:
        """Whether a block of this stream starts at ``frame``."""
        P, F = self.prefix_frames, self.block_frames
        if frame < P:
            return frame == 0 or (frame - P % F) % F == 0
        return (frame - P) % F == 0

    def _starts_hint(self) -> str:
        starts = [f for f in range(0, max(self.prefix_frames, 0) + 4 * self.block_frames) if self.is_block_start(f)]
        return ", ".join(map(str, starts[:5])) + ", ..."

    def _block_at(self, f0: int) -> Tuple[int, bool]:
        """``(frames, from the prefix)`` of the block starting at ``f0``."""
        P, F = self.prefix_frames, self.block_frames
        if f0 < P:
            return (1 if (f0 == 0 and P % F == 1) else F), True
        return F, False

    def _text_index(self, f0: int) -> int:
        return max(i for i, f in enumerate(self.switch_frames) if f <= f0)

    def _context(self, index: int) -> Any:
        """The text a block cross-attends to: the model's prepared form when it has one (computed once per
        prompt), else the embeddings."""
        ctx = self._contexts.get(index)
        if ctx is None:
            prepare = getattr(self.model, "prepare_text", None)
            ctx = prepare(self._texts[index]) if callable(prepare) else self._texts[index]
            self._contexts = {index: ctx}  # one prompt's context at a time
        return ctx

    # ------------------------------------------------------------ steering
    def add_switch(self, text_embeds: torch.Tensor, *, recache: bool = False, scene_cut: bool = False) -> int:
        """Switch prompts at the next block boundary: every block from frame ``frames_done`` on cross-attends to
        ``text_embeds`` (``[L, text_dim]`` or ``[B, L, text_dim]``); returns that frame. Call it between blocks,
        from the thread that iterates. The blocks already yielded are untouched, so the stream up to the
        boundary is exactly an unswitched run's. A second switch before the next block replaces the first.

        ``recache=True`` recomputes, at the boundary, the K/V of the frames the cache holds whole under the new
        prompt (as ``generate(..., recache=True)`` does at a scheduled switch); it needs the clean latents of
        the sink and the last window, which a rollout keeps when made with ``steerable=True`` (or with a
        re-caching schedule): ValueError otherwise. The switch joins :meth:`state_dict`'s settings
        (``switch_frames``, ``recache_frames``): a resume must give the same schedule. ``scene_cut``: as
        ``generate(..., scene_cuts=[f])`` (``infinity_rope`` only)."""
        switch_state(self.policy, self.cache.layers[0].state, scene_cut)  # ValueError for a cut it cannot make
        if not isinstance(recache, bool):
            raise TypeError(f"recache must be a bool, got {type(recache).__name__}")
        f = self.frames_done
        if f >= self.num_frames:
            raise ValueError(f"the stream is finished ({self.num_frames} frames): no block is left to switch")
        (_, t), = check_text_schedule([(0, text_embeds)], self.model.text_dim)
        if t.shape[0] not in (1, self.batch_size):
            raise ValueError(f"text_embeds has batch {t.shape[0]}; this stream has batch {self.batch_size}")
        if recache and f and not self._keeps_clean:
            raise ValueError("recache=True needs the clean latents of the frames in the cache: build the rollout "
                             "with steerable=True (generate(..., steerable=True))")
        t = t.to(self.device, self.dtype).expand(self.batch_size, -1, -1)
        if self.switch_frames[-1] == f:  # nothing ran under the last switch yet: this one replaces it
            i = len(self.switch_frames) - 1
            self._texts[i], self._recache_at[i], self._cut_at[i] = t, recache and i > 0, scene_cut and i > 0
            self._contexts.pop(i, None)
        else:
            self.switch_frames.append(f)
            self._texts.append(t)
            self._recache_at.append(recache)
            self._cut_at.append(scene_cut)
        return f

    # ------------------------------------------------------------ state
    def _settings(self) -> Dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "latent_size": list(self.latent_size),
                "block_frames": self.block_frames, "timesteps": list(self.timesteps),
                "first_timesteps": None if self.first_timesteps is None else list(self.first_timesteps),
                "head_jitter": self.policy.head_jitter_setting,  # before "policy": a refusal names it plainly
                "policy": repr(self.policy),
                "cache_dtype": str(self.cache_dtype).replace("torch.", ""), "prefix_frames": self.prefix_frames,
                "switch_frames": list(self.switch_frames), "recache": self.recache,
                "recache_frames": self._recache_frames(), "text": self._text_digest(),
                "cut_frames": [f for f, c in zip(self.switch_frames, self._cut_at) if c]}

    def _text_digest(self) -> str:
        """Digest of the text embeddings the blocks attend to (the prompts, as the model sees them; a live switch
        adds one): a resume under another prompt is refused like one under another seed, whichever front end
        made the embeddings. Computed per state (a few ms per prompt), never cached across switches."""
        return content_digest([t[:1] for t in self._texts])  # batch rows are one prompt expanded

    def _recache_frames(self) -> List[int]:
        return [f for f, r in zip(self.switch_frames, self._recache_at) if r]

    def _load_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != ROLLOUT_STATE_FORMAT:
            raise ValueError(f"resume_from must be a state from Rollout.state_dict() (format {ROLLOUT_STATE_FORMAT!r})")
        settings = state.get("settings")
        if not isinstance(settings, dict):
            raise ValueError("resume_from has no settings: not a Rollout.state_dict()")
        mine = self._settings()
        for key, value in settings.items():
            if key in ("prefix_frames", "switch_frames", "recache", "recache_frames", "cut_frames") or key not in mine:
                continue
            if mine.get(key) != value:
                if key == "text":
                    raise ValueError("cannot resume: the prompt (its text embeddings) differs from the saved run's")
                raise ValueError(f"cannot resume: {key} was {value!r} in the saved run but is {mine.get(key)!r} now")
        # which switches re-cache is what counts (a live switch sets its own); a state saved before per-switch
        # flags existed re-caches at every switch when its "recache" is set
        derived = list(settings.get("switch_frames", [0]))[1:] if settings.get("recache", False) else []
        for key, default in (("prefix_frames", 0), ("switch_frames", [0]), ("recache_frames", derived),
                             ("cut_frames", [])):
            if settings.get(key, default) != mine[key]:
                raise ValueError(f"cannot resume: {key} was {settings.get(key, default)!r} in the saved run but is "
                                 f"{mine[key]!r} now")
        done = state.get("frames_done")
        if isinstance(done, bool) or not isinstance(done, int) or done < 0 or done > self.num_frames or \
                (done and not (done == self.num_frames or self.is_block_start(done))):
            raise ValueError(f"cannot resume at frame {done!r} of a {self.num_frames}-frame run")
        gen = state.get("generator")
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError("cannot resume: the saved generator state is not a uint8 tensor")
        clean = state.get("clean", {"frames": [], "latents": None})
        if not isinstance(clean, dict) or not isinstance(clean.get("frames"), list):
            raise ValueError("cannot resume: the saved re-cache latents are malformed")
        probe = _generator_for(torch.device("cpu"), 0)
        try:
            probe.set_state(gen.to("cpu"))
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"cannot resume: the saved generator state is invalid ({e})") from None
        self.cache.load_state_dict(state["cache"])
        self.generator.set_state(gen.to("cpu"))
        self.frames_done = done
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        lat = clean.get("latents")
        self._clean = {} if lat is None else {f: lat[:, i].to(self.device, self.dtype)
                                              for i, f in enumerate(clean["frames"])}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this rollout exactly: tensors and plain values only (so
        ``torch.load(weights_only=True)`` reads it back). Take it between blocks."""
        frames = sorted(self._clean)
        clean = {"frames": frames,
                 "latents": torch.stack([self._clean[f] for f in frames], dim=1) if frames else None}
        return {"format": ROLLOUT_STATE_FORMAT, "frames_done": self.frames_done, "num_frames": self.num_frames,
                "settings": self._settings(), "generator": self.generator.get_state(),
                "cache": self.cache.state_dict(), "elapsed_s": self.elapsed_s, "clean": clean}

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
        frames, given = self._block_at(f0)
        idx = self._text_index(f0)
        if idx and self.switch_frames[idx] == f0:  # infinity_rope flushes here (kv_flush), maybe with a cut
            if self._recache_at[idx]:
                self._recache(idx)
            self.cache.switch(scene_cut=self._cut_at[idx])
        block = self._prefix_block(f0, frames, idx) if given else self._block(f0, idx)
        if self._keeps_clean:
            self._keep_clean(f0, block)
        self.frames_done = f0 + frames
        self.elapsed_s += time.perf_counter() - t0
        if self._pbar is not None:
            self._pbar.update(frames)
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

    def _noise_fn(self, frames: int) -> Callable[[], torch.Tensor]:
        g = self.generator
        shape = (self.batch_size, frames, self.latent_channels) + self.latent_size
        return lambda: torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)

    def _flow(self, f0: int, idx: int, cache: Any = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        ctx, cache = self._context(idx), self.cache if cache is None else cache
        return lambda x, t: self.model(x, t, ctx, cache=cache, start_frame=f0)

    @torch.no_grad()
    def _block(self, f0: int, idx: int) -> torch.Tensor:
        flow = self._flow(f0, idx)
        steps = self.timesteps if self.first_timesteps is None or f0 != self.prefix_frames else self.first_timesteps
        x0 = denoise_block(flow, self._noise_fn(self.block_frames), steps, batch_size=self.batch_size,
                           block_frames=self.block_frames, dtype=self.dtype, device=self.device)
        clean_pass(flow, x0)
        return x0

    @torch.no_grad()
    def _prefix_block(self, f0: int, frames: int, idx: int) -> torch.Tensor:
        """A given block: one clean pass writes its K/V (as Self-Forcing's context caching); it comes back as
        is. A whole-block prefix consumes the noise a generated block would, so the rest of the stream draws the
        same noise as a run that generated these blocks."""
        x0 = self.prefix[:, f0:f0 + frames]
        if x0.shape[0] != self.batch_size:
            x0 = x0.expand(self.batch_size, -1, -1, -1, -1)
        if frames == self.block_frames:
            noise = self._noise_fn(frames)
            for _ in self.timesteps:
                noise()
        clean_pass(self._flow(f0, idx), x0)
        return x0

    # ------------------------------------------------------------ prompt switches
    def _keep_clean(self, f0: int, block: torch.Tensor) -> None:
        """Keep the clean latents the re-cache may need: frames of the sink (the first ``sink_frames`` of the
        stream; Rolling Sink: its tape's ``tape_frames``) and the last ``window_frames`` frames; at most
        ``sink + window`` frames, whatever the length."""
        p = self.cache.policy  # as the cache resolved it (a frame size in tokens may resize its window)
        for i in range(block.shape[1]):
            self._clean[f0 + i] = block[:, i]
        end = f0 + block.shape[1]
        # the stream's first frames the cache may hold again: the sink, or Rolling Sink's tape (it replays them)
        keep_sink = max(p.sink_frames if p.rephase_sink or p.kind == "frame_sink" else 0,
                        p.tape_frames if p.has_tape else 0)
        window = p.window_frames if p.kind != "full" else end
        for f in [f for f in self._clean if f >= keep_sink and f < end - window]:
            del self._clean[f]

    @torch.no_grad()
    def _recache(self, idx: int) -> None:
        """At a prompt switch: recompute the K/V of every frame the cache holds whole (sink and recent; Top-C
        tokens keep theirs) by clean passes under the new prompt, in time order, each block-causal over the
        slots before it (LongLive's KV re-cache, on a compressed, re-phased cache)."""
        from .cache.executor import RecacheView

        for slot_start, first, frames in self.cache.layers[0].whole_frame_groups():
            lat = torch.stack([self._clean[f] for f in range(first, first + frames)], dim=1)
            clean_pass(self._flow(first, idx, RecacheView(self.cache, slot_start)), lat)


def generate(model: torch.nn.Module, text_embeds: Optional[torch.Tensor], num_frames: int, policy: Any, seed: int = 0, *,
             batch_size: Optional[int] = None, latent_size: Optional[Sequence[int]] = None,
             cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
             denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT, progress: bool = True,
             callback: Optional[Callable[[torch.Tensor, int], None]] = None,
             resume_from: Optional[Dict[str, Any]] = None, prefix_latents: Optional[torch.Tensor] = None,
             text_schedule: Optional[TextSchedule] = None, recache: bool = False,
             steerable: bool = False, first_block_steps: Optional[Sequence[float]] = None,
             scene_cuts: Sequence[int] = ()) -> Rollout:
    """Generate ``num_frames`` latent frames with the Self-Forcing rollout, streaming them block by block.

    Args:
        model: a :class:`~deepforcing_kernels.models.CausalVideoModel` such as
            :class:`~deepforcing_kernels.models.CausalWanModel` (any dtype / device; it is not modified).
        text_embeds: ``[L, text_dim]`` or ``[B, L, text_dim]`` text-encoder output.
        num_frames: latent frames of the stream, a multiple of the policy's ``block_frames`` (plus the prefix's
            frames when one is given); no upper limit.
        policy: a :class:`~deepforcing_kernels.cache.CachePolicy` (full, sliding, frame_sink, deep_sink,
            deep_forcing); the driver builds the :class:`StreamingKVCache` from it and the model's sizes.
        seed: seeds the rollout's own ``torch.Generator`` (on the model's device).
        batch_size: videos generated together (default: the text batch; one prompt may drive several).
        latent_size: latent ``(H, W)``; default ``model.default_latent_size`` (60 x 104 for Wan 1.3B).
        cache_dtype: dtype of the cached K/V and of attention (default: the model's dtype).
        backend: attention backend, passed to the cache when it takes one.
        denoising_steps, shift: the schedule before the warp (see :func:`warp_timesteps`).
        first_block_steps: the schedule of the first generated block only (Causal Forcing++'s
            ``denoising_step_list_first_chunk``: 4 steps before 1- or 2-step blocks); None: ``denoising_steps``.
        progress: show a tqdm bar (frames, frames/s, frames in cache).
        callback: ``callback(block, start_frame)`` called for each block as it is produced; with it,
            ``generate(..., callback=f).run()`` is the callback form.
        resume_from: a :meth:`Rollout.state_dict` saved by an earlier run with the same model, text, policy, seed
            and settings; the rollout continues from there bit for bit (``num_frames`` may grow).
        prefix_latents: ``[B, P, C, h, w]`` (or ``[P, C, h, w]``) frames the stream starts with (image-to-video:
            ``P = 1``; video continuation: ``P`` whole blocks, or ``1 +`` whole blocks). They are written into the
            cache by clean passes (``t = 0``) block by block (a single first frame is its own block, as
            Self-Forcing's ``independent_first_frame``) and yielded unchanged (in the model's dtype and device) as
            the stream's first ``P`` frames; ``num_frames`` counts them. With Deep Forcing they are the sink.
        text_schedule: ``[(0, emb_a), (f1, emb_b), ...]``: blocks starting at or after ``f1`` cross-attend to
            ``emb_b``; switch frames must be block starts (ValueError otherwise), in increasing order, the first 0.
            Replaces ``text_embeds``.
        recache: at each switch, recompute the K/V of the frames the cache holds whole (sink and recent frames;
            Top-C tokens keep theirs) under the new prompt, by clean passes over their clean latents at the same
            slots and positions. The rollout keeps the clean latents this needs: the sink's frames and the last
            ``window_frames`` frames, never more.
        steerable: keep those clean latents from the start, so that :meth:`Rollout.add_switch` can switch
            prompts mid-stream with ``recache=True`` (a live viewer); the blocks are the same either way.
        scene_cuts: switch frames of ``text_schedule`` that are scene cuts: ``infinity_rope`` places the block
            there at its ``cut_position`` (rope_cut). Every switch of an ``infinity_rope`` stream flushes its cache
            (kv_flush: the sink and the last ``flush_frames`` frames stay), as the authors' pipeline does.

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
                   progress=progress, callback=callback, resume_from=resume_from, prefix_latents=prefix_latents,
                   text_schedule=text_schedule, recache=recache, steerable=steerable,
                   first_block_steps=first_block_steps, scene_cuts=scene_cuts)
