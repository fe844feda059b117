"""Steer a stream while it runs: :class:`LiveStream` (switch prompts, pause, resume, stop between blocks).

A live stream is the command line's engine, not a second rollout: :meth:`VideoPipeline.open
<deepforcing_kernels.pipeline.VideoPipeline.open>` builds the :class:`~deepforcing_kernels.pipeline.VideoRun`
that ``deepforcing generate --prompt ... --out NAME.mp4`` runs (same rollout, decoder and mp4 writer), and this
class only decides, between two blocks, what happens next:

* :meth:`LiveStream.switch` queues a prompt (and ``recache=``); the next block boundary applies it
  (:meth:`Rollout.add_switch <deepforcing_kernels.driver.Rollout.add_switch>`), so every frame before it is
  exactly an unswitched run's;
* :meth:`~LiveStream.pause` holds the stream before its next block, :meth:`~LiveStream.resume` lets it go on,
  :meth:`~LiveStream.stop` ends it there: the mp4 so far is finished under its final name, the file a run of that
  many latent frames writes (the rollout is causal and draws each block's noise in turn);
* each block comes back as a :class:`LiveBlock`: its decoded frames, a :func:`cache_picture` of the cache right
  after it (which frame each slot holds, sink / Top-C / recent, and the RoPE position it is attended at) and the
  frames per second of generation and of decoding so far.

Any thread may call switch / pause / resume / stop; one thread iterates (or :meth:`LiveStream.start` runs it in
its own). Example::

    live = LiveStream(pipe, "a red fox", 48, seed=0, path="out/live.mp4")
    for block in live:
        show(block.frames)
        if block.latent_end == 24:
            live.switch("a blue whale", recache=True)
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

__all__ = ["LiveStream", "LiveBlock", "cache_picture"]

#: the states of a live stream
STATES = ("running", "paused", "stopped", "done", "error")


def cache_picture(rollout: Any, layer: int = 0) -> Dict[str, Any]:
    """What the cache holds now, one entry per frame-sized group of slots (``tokens_per_frame`` token slots, in
    slot order): ``{"kind": "sink" | "topc" | "recent", "frames": [...], "positions": [...]}`` (the distinct
    source frames of its tokens and the temporal RoPE positions they are attended at; a whole frame has one of
    each, a Top-C group gathers tokens of several frames). Layer ``layer``, batch element 0; plain values only."""
    lay = rollout.cache.layers[layer]
    n = int(rollout.tokens_per_frame)
    kinds = lay.kinds()
    frames = lay.frames()[0].tolist()
    pos = lay.positions()[0].tolist()
    slots = []
    for s in range(0, len(frames), n):
        slots.append({"kind": kinds[s] if s < len(kinds) else "recent",
                      "frames": sorted(set(frames[s:s + n])), "positions": sorted(set(pos[s:s + n]))})
    return {"tokens_per_frame": n, "slots": slots, "frames_done": int(rollout.frames_done),
            "policy": getattr(rollout.policy, "kind", "")}


@dataclass
class LiveBlock:
    """One block of a live stream: ``frames [1, t, 3, H, W]`` in [-1, 1] (video frames ``[frame_start,
    frame_end)``), latent frames ``[latent_start, latent_end)``, the ``prompt`` it was made under, ``switched``
    (a switch applied at its start, else None: ``(prompt, recache)``), the :func:`cache_picture` after it, and
    video frames per second of generation (``gen_fps``) and of decoding (``decode_fps``) so far."""

    frames: torch.Tensor
    latent_start: int
    latent_end: int
    frame_start: int
    prompt: str
    cache: Dict[str, Any]
    gen_fps: float
    decode_fps: float
    switched: Optional[Tuple[str, bool]] = None
    index: int = 0

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.frames.shape[1]


@dataclass
class _Switch:
    prompt: str
    recache: bool


class LiveStream:
    """A stream steered while it runs (see the module docstring).

    Args:
        pipe: a :class:`~deepforcing_kernels.pipeline.VideoPipeline` (its policy, model, VAE and text encoder).
        prompt, num_frames, seed, fps: as :meth:`VideoPipeline.write`; ``num_frames`` counts latent frames.
        path: the ``.mp4`` to write (finished when the stream ends or stops; NAME.partial.mp4 on an error).
        picture_every: make the cache picture after every ``picture_every``-th block (0: never).

    Every argument is checked, and the prompt encoded, here (ValueError / TypeError naming it), before a block
    runs; nothing is written until the first block.
    """

    def __init__(self, pipe: Any, prompt: str, num_frames: int, seed: int = 0, *,
                 path: Union[str, os.PathLike], fps: float = 16, picture_every: int = 1) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        self.run = pipe.open(path, prompt, num_frames, seed, fps=fps, progress=False, resumable=False,
                             steerable=True, on_error="partial", write_ahead=True)
        self.rollout = self.run.stream.rollout
        self.prompt = prompt
        self.picture_every = int(picture_every)
        self.blocks = 0
        self.state = "running"
        self.error: Optional[str] = None
        self.switches: List[Tuple[int, str, bool]] = []  # (latent frame, prompt, recache) as applied
        self._pending: Optional[_Switch] = None
        self._cond = threading.Condition()
        self._stop = False
        self._paused = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ control (any thread)
    def switch(self, prompt: str, *, recache: bool = False) -> None:
        """Switch to ``prompt`` at the next block boundary (a later call before it replaces this one)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        if not isinstance(recache, bool):
            raise TypeError(f"recache must be a bool, got {type(recache).__name__}")
        with self._cond:
            if self.state in ("stopped", "done", "error"):
                raise ValueError(f"the stream is {self.state}: nothing left to switch")
            self._pending = _Switch(prompt, recache)

    def pause(self) -> None:
        """Hold the stream before its next block (the block in progress finishes)."""
        with self._cond:
            if self.state == "running":
                self._paused, self.state = True, "paused"

    def resume(self) -> None:
        """Let a paused stream go on."""
        with self._cond:
            if self.state == "paused":
                self._paused, self.state = False, "running"
                self._cond.notify_all()

    def stop(self) -> None:
        """End the stream before its next block: the mp4 so far is finished (a paused stream stops too)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        return self.state in ("stopped", "done", "error")

    @property
    def frames_done(self) -> int:
        """Latent frames made so far."""
        return int(self.rollout.frames_done)

    @property
    def num_frames(self) -> int:
        return int(self.rollout.num_frames)

    @property
    def paths(self) -> List[Any]:
        """The finished mp4 (empty until the stream has ended)."""
        return list(self.run.paths)

    def schedule(self) -> List[Tuple[int, str, bool]]:
        """``[(latent frame, prompt, recache), ...]``: the prompt from frame 0 and every switch applied."""
        return [(0, self.prompt, False)] + list(self.switches)

    # ------------------------------------------------------------ iteration (one thread)
    def __iter__(self) -> Iterator[LiveBlock]:
        return self

    def __next__(self) -> LiveBlock:
        with self._cond:
            while self._paused and not self._stop:
                self._cond.wait()
            if self.finished:
                raise StopIteration
            if self._stop or self.frames_done >= self.num_frames:
                self._finish("stopped" if self.frames_done < self.num_frames else "done")
                raise StopIteration
            pending, self._pending = self._pending, None
        try:
            switched = None
            if pending is not None:
                f = self.run.switch(pending.prompt, recache=pending.recache)
                self.switches = [s for s in self.switches if s[0] < f] + [(f, pending.prompt, pending.recache)]
                switched = (pending.prompt, pending.recache)
            chunk = next(self.run)
        except StopIteration:
            self._finish("done")
            raise
        except BaseException as e:
            self._fail(e)
            raise
        s = self.run.stream
        self.blocks += 1
        every = self.picture_every
        pic = cache_picture(self.rollout) if every and self.blocks % every == 0 else {}
        out = LiveBlock(chunk.frames, chunk.latent_start, chunk.latent_end, chunk.frame_start,
                        self.schedule()[-1][1], pic, s.frames_out / s.gen_s if s.gen_s else 0.0,
                        s.frames_out / s.decode_s if s.decode_s else 0.0, switched, self.blocks - 1)
        if self.frames_done >= self.num_frames:
            self._finish("done")
        return out

    def _finish(self, state: str) -> None:
        self.run.close()
        with self._cond:
            self.state = state
            self._paused = False
            self._cond.notify_all()

    def _fail(self, e: BaseException) -> None:
        self.run.abort()
        with self._cond:
            self.state = "error"
            self.error = " ".join(str(e).split()) or type(e).__name__
            self._cond.notify_all()

    def close(self) -> None:
        """Stop and finish the file now (from the iterating thread, or after :meth:`start`'s thread ended)."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.finished:
            self._finish("stopped")

    # ------------------------------------------------------------ in its own thread
    def start(self, on_block: Callable[[LiveBlock], None],
              on_end: Optional[Callable[["LiveStream"], None]] = None) -> threading.Thread:
        """Run the stream in a daemon thread: ``on_block(block)`` for each block (in that thread), then
        ``on_end(stream)`` once it has ended, stopped or failed (``state`` / ``error`` say which)."""
        def work() -> None:
            try:
                for block in self:
                    on_block(block)
            except Exception as e:  # noqa: BLE001 - reported through state / error, never lost
                if not self.finished:
                    self._fail(e)
            finally:
                if not self.finished:
                    self._finish("stopped")
                if on_end is not None:
                    on_end(self)

        t = threading.Thread(target=work, name="deepforcing-live", daemon=True)
        t.start()
        self._thread = t  # once started: wait() and close() may join it from any thread
        return t

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for :meth:`start`'s thread to end; True when it has."""
        if self._thread is None:
            return self.finished
        self._thread.join(timeout)
        return not self._thread.is_alive()

