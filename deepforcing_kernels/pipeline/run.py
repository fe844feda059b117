"""Writing a frame stream to mp4 (one file or numbered segments) and resuming it exactly: :class:`VideoRun`.

See :mod:`deepforcing_kernels.pipeline` for the segment layout and the resume rule."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch

from ..formats import VIDEO_RUN_FORMAT
from .media import _remove_dead_temporaries, segment_path
from .stream import FrameChunk, FrameStream, video_frames

__all__ = ["VideoRun", "WriteResult"]


@dataclass
class WriteResult:
    """What :meth:`VideoPipeline.write` wrote: the final ``paths`` (one, or one per segment), video ``frames``,
    ``latent_frames``, ``bytes`` on disk, seconds of generation / decoding / writing, ``info`` (prefix trimming,
    prompts)."""

    paths: List[Path]
    frames: int
    latent_frames: int
    bytes: int
    gen_s: float
    decode_s: float
    write_s: float
    info: Dict[str, Any] = field(default_factory=dict)


class VideoRun:
    """One mp4 (or segmented) output being written; built by :meth:`VideoPipeline.open`.

    Iterate it: each step generates one block, decodes it, writes its frames (into the open segment, closing
    and opening segments on the way) and yields the :class:`FrameChunk`. ``state_dict()`` between steps is the
    resume state (see the module docstring for the exact rule); ``close()`` finishes the open file; used as a
    context manager, an exception or Ctrl-C inside the block finishes what was written and keeps it by
    ``on_error`` (``"partial"``: ``NAME.partial.mp4``, visibly incomplete; ``"keep"``; ``"delete"``).
    ``paths`` lists the finished files so far.
    """

    def __init__(self, stream: FrameStream, path: Union[str, os.PathLike], *, fps: float = 16,
                 segment_frames: Optional[int] = None, on_error: str = "partial", codec: Optional[str] = None,
                 crf: int = 18, resume: Optional[Mapping[str, Any]] = None, resumable: bool = True,
                 write_ahead: bool = False) -> None:
        from ..video.writer import VideoWriter  # noqa: F401 - fail early without the extra

        if segment_frames is not None and (isinstance(segment_frames, bool) or not isinstance(segment_frames, int)
                                           or segment_frames <= 0):
            raise ValueError(f"segment_frames must be a positive int (video frames per file), got "
                             f"{segment_frames!r}")
        if on_error not in ("partial", "keep", "delete"):
            raise ValueError(f"on_error must be 'partial', 'keep' or 'delete', got {on_error!r}")
        if stream.rollout.batch_size != 1:
            raise ValueError(f"an mp4 holds one video; this stream has batch {stream.rollout.batch_size} "
                             "(write one prompt at a time)")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"path {str(self.path)!r} should end in .mp4")
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot write {str(self.path)!r}: folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write {str(self.path)!r}: folder {str(folder)!r} is not writable")
        self.stream, self.fps, self.segment_frames = stream, fps, segment_frames
        self.on_error, self.codec, self.crf = on_error, codec, crf
        self.resumable = resumable
        self.frames_written = 0
        self.segment = 0
        self.paths: List[Path] = []
        self.write_s = 0.0
        self._writer: Any = None
        self._anchor: Optional[Dict[str, Any]] = None  # decoder state before the open segment's first block
        self._pending: List[torch.Tensor] = []         # latent blocks from that block on
        self.closed = False
        # write_ahead: a writer thread encodes block k while block k + 1 is generated (the encoder releases the
        # GIL); the same frames in the same order, so the same file. At most two blocks wait for it.
        self._bg: Any = None
        self._inflight: List[Any] = []
        if write_ahead:
            from concurrent.futures import ThreadPoolExecutor

            from ..runio.host import lower_thread_priority

            # the writer yields the cores to the generation a viewer waits on (see lower_thread_priority)
            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepforcing-mp4",
                                          initializer=lower_thread_priority)
        stream.before_decode = self._before_decode
        if resume is not None:
            self._resume(resume)

    # ------------------------------------------------------------ files
    def file_for(self, index: int) -> Path:
        """The final path of segment ``index`` (the path itself without segments)."""
        return self.path if self.segment_frames is None else segment_path(self.path, index)

    def _open(self) -> None:
        from ..video.writer import VideoWriter, _partial_name

        target = self.file_for(self.segment)
        _partial_name(target).unlink(missing_ok=True)  # a stale partial of this segment from a stopped run
        _remove_dead_temporaries(target)
        self._writer = VideoWriter(target, fps=self.fps, codec=self.codec, crf=self.crf, on_error=self.on_error)

    def _close_writer(self) -> None:
        w, self._writer = self._writer, None
        p = w.close()
        if p is not None:
            self.paths.append(p)

    def _write_frames(self, frames: torch.Tensor, start: int) -> None:
        """Write video frames ``[1, t, 3, H, W]`` whose first is frame ``start`` of the stream."""
        N = self.segment_frames
        n, pos = frames.shape[1], 0
        while pos < n:
            if self._writer is None:
                self._open()
            take = n - pos if N is None else min(n - pos, N - (start + pos) % N)
            self._writer.write(frames[:, pos:pos + take])
            pos += take
            self.frames_written = start + pos
            if N is not None and self.frames_written % N == 0:
                self._close_writer()
                self.segment += 1

    def _submit(self, frames: torch.Tensor, start: int) -> None:
        if self._bg is None:
            return self._write_frames(frames, start)
        while len(self._inflight) >= 2:
            self._inflight.pop(0).result()
        self._inflight.append(self._bg.submit(self._write_frames, frames, start))

    def _drain(self) -> None:
        """Wait for the writer thread's blocks (re-raising its error, if any)."""
        while self._inflight:
            self._inflight.pop(0).result()

    def _stop_writer(self) -> None:
        if self._bg is not None:
            self._bg.shutdown(wait=True)
            self._bg = None

    def _open_start(self) -> int:
        N = self.segment_frames
        return 0 if N is None else (self.frames_written // N) * N

    def _before_decode(self, block: torch.Tensor, latent_start: int, frame_start: int) -> None:
        """Keep the anchor: the decoder state before the block holding the first frame of the segment that this
        block's last frame falls in, and the latent blocks from there."""
        if not self.resumable:
            return
        n = video_frames(latent_start + block.shape[1], self.stream.tf) - frame_start
        N = self.segment_frames
        seg_start = 0 if N is None else ((frame_start + n - 1) // N) * N
        if self._anchor is None or seg_start >= frame_start:
            self._anchor = {"decoder": self.stream.decoder.state_dict(), "latent_start": latent_start,
                            "frame_start": frame_start}
            self._pending = []
        self._pending.append(block.detach())

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[FrameChunk]:
        return self

    def __next__(self) -> FrameChunk:
        if self.closed:
            raise StopIteration
        try:
            chunk = next(self.stream)
        except StopIteration:
            self.close()
            raise
        t0 = time.perf_counter()
        try:
            self._submit(chunk.frames, chunk.frame_start)
        except BaseException:
            self.abort()
            raise
        dt = time.perf_counter() - t0
        self.write_s += dt
        self.stream.tick(chunk, dt)
        return chunk

    def run(self, on_block: Optional[Callable[[FrameChunk, "VideoRun"], None]] = None) -> WriteResult:
        """Generate, decode and write to the end (``on_block(chunk, run)`` after each block); return the
        :class:`WriteResult`. An exception or interrupt aborts the open file by ``on_error`` and propagates."""
        with self:
            for chunk in self:
                if on_block is not None:
                    on_block(chunk, self)
        return self.result()

    def result(self) -> WriteResult:
        self._drain()
        s = self.stream
        return WriteResult(paths=list(self.paths), frames=self.frames_written,
                           latent_frames=s.rollout.frames_done,
                           bytes=sum(p.stat().st_size for p in self.paths if p.exists()), gen_s=s.gen_s,
                           decode_s=s.decode_s, write_s=self.write_s, info=dict(s.info))

    def switch(self, prompt: str, *, recache: bool = False) -> int:
        """Switch to ``prompt`` at the next block boundary (the frames written so far are those of an unswitched
        run); returns the latent frame it applies from. ``recache=True`` needs ``open(..., steerable=True)``
        once a block was made."""
        if self.closed:
            raise ValueError("this run is closed: nothing left to switch")
        return self.stream.switch(prompt, recache=recache)

    def stop(self) -> List[Path]:
        """Stop between blocks: the open file is finished under its final name (a playable mp4 of the frames
        so far, the file a run of that many latent frames writes); iteration ends. Returns the finished paths."""
        return self.close()

    def close(self) -> List[Path]:
        """Finish the open file (the stream need not be done); returns every finished path."""
        if not self.closed:
            self.closed = True
            self.stream.close()
            try:
                self._drain()
            except BaseException:
                self.abort()
                raise
            self._stop_writer()
            if self._writer is not None:
                self._close_writer()
        return list(self.paths)

    def abort(self) -> Optional[Path]:
        """Stop now: the open file is finished and kept by ``on_error``; returns where it went."""
        self.closed = True
        self.stream.close()
        for f in self._inflight:  # let the writer thread finish what it holds; its error is this abort's cause
            f.exception()
        self._inflight = []
        self._stop_writer()
        w, self._writer = self._writer, None
        return None if w is None else w.abort()

    def __enter__(self) -> "VideoRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------ state
    def _settings(self) -> Dict[str, Any]:
        return {"path": str(self.path), "segment_frames": self.segment_frames, "fps": float(self.fps)}

    def state_dict(self) -> Dict[str, Any]:
        """The resume state after the last block written (tensors and plain values only)."""
        if not self.resumable:
            raise ValueError("this run was opened with resumable=False: it keeps no anchor to resume from")
        self._drain()
        open_start = self._open_start()
        anchor = None
        if open_start < self.frames_written:  # a segment is open: keep what rewrites it
            a = self._anchor
            anchor = {"decoder": a["decoder"], "latent_start": a["latent_start"], "frame_start": a["frame_start"],
                      "latents": torch.cat(self._pending, dim=1)}
        return {"format": VIDEO_RUN_FORMAT, "settings": self._settings(), "stream": self.stream.state_dict(),
                "frames_written": self.frames_written, "segment": self.segment, "open_start": open_start,
                "paths": [str(p) for p in self.paths], "anchor": anchor}

    def _resume(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != VIDEO_RUN_FORMAT:
            raise ValueError(f"resume must be a VideoRun.state_dict() (format {VIDEO_RUN_FORMAT!r})")
        saved = state.get("settings", {})
        mine = self._settings()
        for k in ("segment_frames", "fps"):
            if saved.get(k) != mine[k]:
                raise ValueError(f"cannot resume: {k} was {saved.get(k)!r} in the saved run but is {mine[k]!r} now")
        written, seg = state.get("frames_written"), state.get("segment")
        if not isinstance(written, int) or not isinstance(seg, int) or written < 0 or seg < 0:
            raise ValueError("cannot resume: the saved frames_written / segment are malformed")
        if written != self.stream.frames_out:
            raise ValueError(f"cannot resume: the run state says {written} frames were written but its stream "
                             f"state is at frame {self.stream.frames_out}")
        self.paths = [Path(p) for p in state.get("paths", [])]
        missing = [str(p) for p in self.paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"cannot resume: finished segment {missing[0]} is missing")
        self.segment = seg
        open_start = int(state.get("open_start", 0))
        anchor = state.get("anchor")
        self.frames_written = open_start
        if anchor is None:
            self.frames_written = written
            self._anchor, self._pending = None, []
            return
        # rewrite the open segment: replay the anchor's latents through a decoder restored to the anchor
        with self.stream.decode_context():
            dec = self.stream.decoder.vae.stream_decoder()
            dec.load_state_dict(anchor["decoder"])
            lat = anchor["latents"]
            frames = dec.decode(lat)
        f0 = int(anchor["frame_start"])
        if f0 + frames.shape[1] != written or not f0 <= open_start <= written:
            raise ValueError(f"cannot resume: the anchor's latents decode to frames [{f0}, {f0 + frames.shape[1]}) "
                             f"but {written} were written")
        self._write_frames(frames[:, open_start - f0:], open_start)
        self._anchor = {"decoder": anchor["decoder"], "latent_start": int(anchor["latent_start"]),
                        "frame_start": f0}
        self._pending = [lat.to(self.stream.rollout.device, self.stream.rollout.dtype)]
