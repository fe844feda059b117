"""The frame stream: a rollout's latent blocks decoded as they come (:class:`FrameStream` of :class:`FrameChunk`)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from ..formats import FRAME_STREAM_FORMAT

__all__ = ["FrameChunk", "FrameStream", "video_frames"]


@dataclass
class FrameChunk:
    """One block of the stream: decoded ``frames [B, t, 3, H, W]`` in [-1, 1] (the VAE's dtype and device), the
    ``latents [B, f, C, h, w]`` they came from, and where they sit: latent frames ``[latent_start,
    latent_end)``, video frames ``[frame_start, frame_end)``; ``gen_s`` / ``decode_s`` the seconds spent."""

    frames: torch.Tensor
    latents: torch.Tensor
    latent_start: int
    frame_start: int
    gen_s: float = 0.0
    decode_s: float = 0.0

    @property
    def latent_end(self) -> int:
        return self.latent_start + self.latents.shape[1]

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.frames.shape[1]


def video_frames(latent_frames: int, tf: int = 4) -> int:
    return 0 if latent_frames <= 0 else 1 + tf * (latent_frames - 1)


class FrameStream:
    """Decoded frames as the rollout produces them; iterate for :class:`FrameChunk`. Built by
    :meth:`VideoPipeline.frames`.

    ``state_dict()`` (between chunks) holds the rollout's and the decoder's states: tensors and plain values only;
    ``pipe.frames(..., resume=state)`` with the same arguments continues with the next chunk, bit for bit.
    ``rollout`` and ``decoder`` are the driver's :class:`~deepforcing_kernels.driver.Rollout` and the VAE's
    :class:`~deepforcing_kernels.video.vae.StreamDecoder`; ``gen_s`` / ``decode_s`` sum the time spent in each.
    """

    def __init__(self, rollout: Any, decoder: Any, *, progress: bool = True, info: Optional[Dict] = None,
                 before_decode: Optional[Callable[[torch.Tensor, int, int], None]] = None,
                 auto_tick: bool = True, encode: Optional[Callable[[str], torch.Tensor]] = None,
                 decode_context: Optional[Callable[[], Any]] = None) -> None:
        self.rollout, self.decoder = rollout, decoder
        self.encode = encode  # prompt -> text embeddings, for switch() (the pipeline's text encoder)
        # entered around every decode: the pipeline lends the VAE to the accelerator there (pipeline/offload.py)
        self.decode_context = decode_context or nullcontext
        self.tf = int(decoder.vae.temporal_factor)
        self.progress = progress
        self.info = dict(info or {})
        self.gen_s = self.decode_s = 0.0
        self.frames_out = 0
        self.before_decode = before_decode
        self.auto_tick = auto_tick  # False: the consumer calls tick() (VideoRun, after writing)
        self._pbar = None
        self._t_write = 0.0  # seconds a consumer (VideoRun) spent writing, shown as part of decode

    @property
    def num_frames(self) -> int:
        """Video frames of the whole stream: ``1 + 4 (num_frames - 1)``."""
        return video_frames(self.rollout.num_frames, self.tf)

    @property
    def latent_frames_done(self) -> int:
        return self.rollout.frames_done

    def __iter__(self) -> Iterator[FrameChunk]:
        return self

    def __next__(self) -> FrameChunk:
        r = self.rollout
        if r.frames_done >= r.num_frames:
            self.close()
            raise StopIteration
        if self._pbar is None and self.progress:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.num_frames, initial=video_frames(r.frames_done, self.tf), unit="frame",
                              desc="video", dynamic_ncols=True)
        f0 = r.frames_done
        a = video_frames(f0, self.tf)
        t0 = time.perf_counter()
        block = next(r)
        t1 = time.perf_counter()
        n = video_frames(f0 + block.shape[1], self.tf) - a
        if self.before_decode is not None:
            self.before_decode(block, f0, a)
        with self.decode_context():
            frames = self.decoder.decode(block)
        t2 = time.perf_counter()
        if frames.shape[1] != n:  # the decoder and the rollout disagree on where the stream is
            raise RuntimeError(f"decoder gave {frames.shape[1]} frames for latent frames [{f0}, "
                               f"{f0 + block.shape[1]}), expected {n} (decoder at {self.decoder.latent_frames})")
        self.gen_s += t1 - t0
        self.decode_s += t2 - t1
        self.frames_out = a + n
        chunk = FrameChunk(frames, block, f0, a, t1 - t0, t2 - t1)
        if self.auto_tick:
            self.tick(chunk)
        return chunk

    def switch(self, prompt: str, *, recache: bool = False, scene_cut: bool = False) -> int:
        """Switch to ``prompt`` at the next block boundary (:meth:`Rollout.add_switch
        <deepforcing_kernels.driver.Rollout.add_switch>`); returns the latent frame it applies from. Call it
        between chunks. ``info["schedule"]`` records it."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        if self.encode is None:
            raise ValueError("this stream has no text encoder to switch with (build it with VideoPipeline.frames)")
        f = self.rollout.add_switch(self.encode(prompt), recache=recache, scene_cut=scene_cut)
        sched = [(g, t) for g, t in self.info.get("schedule", []) if g < f]
        self.info["schedule"] = sched + [(f, prompt)]
        self.info.setdefault("recache_frames", [])
        self.info["recache_frames"] = [g for g in self.info["recache_frames"] if g < f] + ([f] if recache else [])
        return f

    def tick(self, chunk: FrameChunk, write_s: float = 0.0) -> None:
        """Advance the progress bar by ``chunk`` (called after the consumer is done with it)."""
        self._t_write += write_s
        if self._pbar is not None:
            fr = self.frames_out
            gen = fr / self.gen_s if self.gen_s else 0.0
            dec = fr / (self.decode_s + self._t_write) if self.decode_s + self._t_write else 0.0
            self._pbar.update(chunk.frames.shape[1])
            self._pbar.set_postfix(gen=f"{gen:.1f}f/s", dec=f"{dec:.1f}f/s", refresh=False)
            if self.rollout.frames_done >= self.rollout.num_frames:
                self.close()

    def close(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def state_dict(self) -> Dict[str, Any]:
        """Resume state after the last chunk: ``{"format", "rollout", "decoder", "frames_out"}``."""
        return {"format": FRAME_STREAM_FORMAT, "rollout": self.rollout.state_dict(), "decoder": self.decoder.state_dict(),
                "frames_out": self.frames_out}
