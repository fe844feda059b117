"""From a prompt to an mp4: text encoder -> Self-Forcing rollout -> streaming VAE decode -> mp4 writer.

:class:`VideoPipeline` ties the pieces together and streams: each latent block the rollout produces is decoded
at once (the VAE's :class:`~deepforcing_kernels.video.vae.StreamDecoder` keeps the causal decoder's feature cache
between blocks) and, in :meth:`VideoPipeline.write`, encoded into the mp4 before the next block is generated, so
frames leave memory as soon as they are written and a run of any length holds one block's frames.

* :meth:`VideoPipeline.frames` -> a :class:`FrameStream` of :class:`FrameChunk` (decoded frames
  ``[B, t, 3, H, W]`` in [-1, 1], the latent block, their indices): what a live viewer needs.
* :meth:`VideoPipeline.open` -> a :class:`VideoRun` (iterate it to generate, decode and write block by block;
  :meth:`VideoRun.state_dict` between blocks to resume) and :meth:`VideoPipeline.write`, which runs one to the
  end.

Segments (``segment_frames=N``): ``run.mp4`` becomes ``run_00000.mp4``, ``run_00001.mp4``, ...; segment ``k``
holds video frames ``[k N, (k + 1) N)`` exactly (the last one fewer); a block whose frames cross a boundary is
split between the two files. A segment is finished and renamed to its final name before the next one is opened,
so at most one is open; the open one is written to a hidden temporary file (see
:class:`~deepforcing_kernels.video.writer.VideoWriter`).

Resume rule (exact): an mp4 cannot be appended to once closed, so the open segment is rewritten from its start.
The run's state (:meth:`VideoRun.state_dict`) holds the rollout's state and the decoder's state after the last
block, the segment index and frames written, and an *anchor*: the decoder state before the block that holds the
open segment's first frame plus the latent blocks from that block on (at most ``N / 4 + block_frames`` latent
frames: latents are 48x smaller than their frames at Wan's sizes). Resuming restores the anchor, re-decodes those
latents, drops the frames before the open segment, writes the segment anew up to where the run stopped, then
continues generating from the rollout's state. Closed segments are never touched. Decoding and generation are
bit for bit what they would have been, so the frames of all segments equal an uninterrupted run's. Without
segments the one file is the open segment: its anchor holds every latent block of the run (use segments for
long runs).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["VideoPipeline", "FrameStream", "FrameChunk", "VideoRun", "WriteResult", "parse_switch",
           "segment_path", "read_image", "read_video", "prefix_from_pixels", "FRAMES_FORMAT", "RUN_FORMAT"]

FRAMES_FORMAT = "deepforcing-frame-stream/1"
RUN_FORMAT = "deepforcing-video-run/1"

PromptLike = Union[str, Sequence[str], Sequence[Tuple[int, str]]]
PathOrTensor = Union[str, os.PathLike, torch.Tensor]


# ---------------------------------------------------------------------------------------------- small helpers
def parse_switch(text: str) -> Tuple[int, str]:
    """``"48:a red fox"`` -> ``(48, "a red fox")`` (the command line's ``--switch FRAME:TEXT``); ValueError
    naming the value otherwise."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"--switch {text!r}: expected FRAME:TEXT, e.g. 48:a red fox")
    head, prompt = text.split(":", 1)
    try:
        frame = int(head.strip())
    except ValueError:
        raise ValueError(f"--switch {text!r}: FRAME must be an int (latent frame), got {head!r}") from None
    if frame < 0:
        raise ValueError(f"--switch {text!r}: FRAME must be >= 0")
    if not prompt.strip():
        raise ValueError(f"--switch {text!r}: TEXT is empty")
    return frame, prompt


def segment_path(path: Union[str, os.PathLike], index: int) -> Path:
    """The file of segment ``index`` of ``path``: ``out/run.mp4`` -> ``out/run_00003.mp4``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_{index:05d}{p.suffix or '.mp4'}")


def _remove_dead_temporaries(target: Path) -> None:
    """Remove ``.NAME.PID.writing.mp4`` files of ``target`` left by a process that no longer runs (killed)."""
    folder = target.parent if str(target.parent) else Path(".")
    for p in folder.glob(f".{target.stem}.*.writing{target.suffix}"):
        pid = p.name[len(target.stem) + 2:-len(".writing" + target.suffix)]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _u8_to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _fit(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[T, 3, h0, w0]`` float -> ``[T, 3, H, W]``: resized (bilinear, antialiased) so that it covers ``size``,
    then centre-cropped to it."""
    H, W = size
    h0, w0 = frames.shape[-2:]
    if (h0, w0) != (H, W):
        s = max(H / h0, W / w0)
        nh, nw = max(H, round(h0 * s)), max(W, round(w0 * s))
        frames = torch.nn.functional.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False,
                                                 antialias=True)
        top, left = (nh - H) // 2, (nw - W) // 2
        frames = frames[:, :, top:top + H, left:left + W]
    return frames.clamp(-1.0, 1.0)


def read_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` uint8 (RGB): Pillow when installed, else PyAV (png, jpg, ...).
    FileNotFoundError if it does not exist, ValueError naming it if it cannot be read as an image."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"image {str(p)!r} is a folder, not an image file")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(p) as im:
                arr = torch.from_numpy(__import__("numpy").array(im.convert("RGB")))
            return arr.permute(2, 0, 1).contiguous()
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, truncated files
            raise ValueError(f"image {str(p)!r} cannot be read as an image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    frames = read_video(p, what="image", limit=1)
    return frames[0]


def read_video(path: Union[str, os.PathLike], *, what: str = "video", limit: Optional[int] = None) -> torch.Tensor:
    """A video (or image) file -> ``[T, 3, H, W]`` uint8 (RGB) via PyAV; ``limit`` keeps the first frames only.
    FileNotFoundError if it does not exist, ValueError naming it if it holds no readable video frame."""
    from .video._deps import require

    av = require("av", f"reading --{what}")
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder, not a file")
    frames: List[np.ndarray] = []
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            for fr in c.decode(video=0):
                frames.append(fr.to_ndarray(format="rgb24"))
                if limit is not None and len(frames) >= limit:
                    break
    except Exception as e:  # noqa: BLE001 - av.error.*, OSError, our ValueError
        raise ValueError(f"{what} {str(p)!r} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not frames:
        raise ValueError(f"{what} {str(p)!r} holds no video frame")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _valid_prefix_frames(latent_frames: int, block_frames: int) -> int:
    """The largest prefix length <= ``latent_frames`` the driver takes: whole blocks, or 1 + whole blocks."""
    p = latent_frames
    while p > 1 and p % block_frames not in (0, 1):
        p -= 1
    return max(p, 1)


def prefix_from_pixels(vae: Any, pixels: torch.Tensor, size: Tuple[int, int], block_frames: int, *,
                       what: str = "video") -> Tuple[torch.Tensor, Dict[str, int]]:
    """Pixel frames ``[T, 3, h0, w0]`` (uint8 or float in [-1, 1]) -> prefix latents ``[1, P, C, h, w]``.

    The frames are resized to cover ``size`` (pixels) and centre-cropped; then, for a continuation, only the
    **last** ``1 + 4 (P - 1)`` frames are kept, ``P`` the largest valid prefix length (whole blocks, or 1 + whole
    blocks) that ``T`` frames give (``1 + (T - 1) // 4`` latent frames at most), so the stream continues from the
    video's end. Returns the latents and ``{"frames_in", "frames_used", "prefix_frames"}``.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        got = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"{what} must be RGB frames [T, 3, H, W] (uint8, or float in [-1, 1]), got {got}")
    if pixels.dtype == torch.uint8:
        x = _u8_to_unit(pixels)
    elif pixels.is_floating_point():
        if not bool(torch.isfinite(pixels).all()):
            raise ValueError(f"{what} holds NaN or inf")
        x = pixels.float()
    else:
        raise ValueError(f"{what} must be uint8 or float, got {pixels.dtype}")
    T = x.shape[0]
    tf = int(vae.temporal_factor)
    P = _valid_prefix_frames(1 + (T - 1) // tf, block_frames)
    used = 1 + tf * (P - 1)
    x = _fit(x[T - used:], size)
    lat = vae.encode(x[None].to(vae.dtype))
    return lat, {"frames_in": T, "frames_used": used, "prefix_frames": P}


# ---------------------------------------------------------------------------------------------- chunks
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


def _video_frames(latent_frames: int, tf: int = 4) -> int:
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
                 auto_tick: bool = True) -> None:
        self.rollout, self.decoder = rollout, decoder
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
        return _video_frames(self.rollout.num_frames, self.tf)

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

            self._pbar = tqdm(total=self.num_frames, initial=_video_frames(r.frames_done, self.tf), unit="frame",
                              desc="video", dynamic_ncols=True)
        f0 = r.frames_done
        a = _video_frames(f0, self.tf)
        t0 = time.perf_counter()
        block = next(r)
        t1 = time.perf_counter()
        n = _video_frames(f0 + block.shape[1], self.tf) - a
        if self.before_decode is not None:
            self.before_decode(block, f0, a)
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
        return {"format": FRAMES_FORMAT, "rollout": self.rollout.state_dict(), "decoder": self.decoder.state_dict(),
                "frames_out": self.frames_out}


# ---------------------------------------------------------------------------------------------- writing
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
                 crf: int = 18, resume: Optional[Mapping[str, Any]] = None, resumable: bool = True) -> None:
        from .video.writer import VideoWriter  # noqa: F401 - fail early without the extra

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
        stream.before_decode = self._before_decode
        if resume is not None:
            self._resume(resume)

    # ------------------------------------------------------------ files
    def file_for(self, index: int) -> Path:
        """The final path of segment ``index`` (the path itself without segments)."""
        return self.path if self.segment_frames is None else segment_path(self.path, index)

    def _open(self) -> None:
        from .video.writer import VideoWriter, _partial_name

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

    def _open_start(self) -> int:
        N = self.segment_frames
        return 0 if N is None else (self.frames_written // N) * N

    def _before_decode(self, block: torch.Tensor, latent_start: int, frame_start: int) -> None:
        """Keep the anchor: the decoder state before the block holding the first frame of the segment that this
        block's last frame falls in, and the latent blocks from there."""
        if not self.resumable:
            return
        n = _video_frames(latent_start + block.shape[1], self.stream.tf) - frame_start
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
        self._write_frames(chunk.frames, chunk.frame_start)
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
        s = self.stream
        return WriteResult(paths=list(self.paths), frames=self.frames_written,
                           latent_frames=s.rollout.frames_done,
                           bytes=sum(p.stat().st_size for p in self.paths if p.exists()), gen_s=s.gen_s,
                           decode_s=s.decode_s, write_s=self.write_s, info=dict(s.info))

    def close(self) -> List[Path]:
        """Finish the open file (the stream need not be done); returns every finished path."""
        if not self.closed:
            self.closed = True
            self.stream.close()
            if self._writer is not None:
                self._close_writer()
        return list(self.paths)

    def abort(self) -> Optional[Path]:
        """Stop now: the open file is finished and kept by ``on_error``; returns where it went."""
        self.closed = True
        self.stream.close()
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
        open_start = self._open_start()
        anchor = None
        if open_start < self.frames_written:  # a segment is open: keep what rewrites it
            a = self._anchor
            anchor = {"decoder": a["decoder"], "latent_start": a["latent_start"], "frame_start": a["frame_start"],
                      "latents": torch.cat(self._pending, dim=1)}
        return {"format": RUN_FORMAT, "settings": self._settings(), "stream": self.stream.state_dict(),
                "frames_written": self.frames_written, "segment": self.segment, "open_start": open_start,
                "paths": [str(p) for p in self.paths], "anchor": anchor}

    def _resume(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != RUN_FORMAT:
            raise ValueError(f"resume must be a VideoRun.state_dict() (format {RUN_FORMAT!r})")
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


# ---------------------------------------------------------------------------------------------- the pipeline
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

    Build one with :meth:`from_weights` (real Wan2.1 weights) or :meth:`tiny` (random stand-ins: its video is
    noise).
    """

    def __init__(self, model: Any, vae: Any, text_encoder: Any, *, policy: Any = "deep_forcing",
                 cache_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 latent_size: Optional[Sequence[int]] = None) -> None:
        from .policy import CachePolicy

        if isinstance(policy, str):
            from .presets import make_policy

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
        from .models import CausalWanModel, WanConfig
        from .video import UMT5Encoder, WanVAE

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
                     text_config: Optional[Dict[str, Any]] = None) -> "VideoPipeline":
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

        Raises:
            FileNotFoundError naming the missing file or folder; ValueError for weights that do not match.
        """
        from .checkpoints import load_checkpoint
        from .models import CausalWanModel
        from .presets import model_config
        from .video import load_front_end, weights_layout

        folder = Path(weights_dir)
        layout = weights_layout(folder)
        if checkpoint is None:
            checkpoint = cls._own_dit(folder, layout)
        elif not isinstance(checkpoint, Mapping) and not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
        from .models import WanConfig

        cfg = model if isinstance(model, WanConfig) else model_config(model)
        enc, vae = load_front_end(folder, dtype=vae_dtype or dtype, device=device, text_dtype=text_dtype or dtype,
                                  text_len=text_len or cfg.text_len or 512, vae_config=vae_config,
                                  text_config=text_config)
        dit = CausalWanModel(cfg).eval()
        load_checkpoint(dit, checkpoint, lora=lora, lora_alpha=lora_alpha, use_ema=use_ema,
                        trust_pickle=trust_pickle)
        dit = dit.to(device=device, dtype=dtype)
        return cls(dit, vae, enc, policy=policy, cache_dtype=cache_dtype, backend=backend, latent_size=latent_size)

    @staticmethod
    def _own_dit(folder: Path, layout: str) -> Path:
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
        with torch.no_grad():
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
        lat, info = prefix_from_pixels(self.vae, px, self.pixel_size, self.policy.block_frames, what=what)
        info[what] = str(src) if not isinstance(src, torch.Tensor) else "<tensor>"
        return lat, info

    # ------------------------------------------------------------ streams
    def frames(self, prompt: PromptLike, num_frames: int, seed: int = 0, *, image: Optional[PathOrTensor] = None,
               video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
               switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
               resume: Optional[Mapping[str, Any]] = None, progress: bool = True,
               _auto_tick: bool = True) -> FrameStream:
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
            resume: a :meth:`FrameStream.state_dict` of the same call; the stream continues after it.
            progress: a tqdm bar with frames/s of generation and of decoding.

        Raises:
            ValueError / FileNotFoundError naming the argument or file, before anything is generated.
        """
        from .driver import generate

        schedule, info = self._schedule(prompt, switches)
        prefix, pinfo = self._prefix(image, video, prefix_latents)
        info.update(pinfo)
        rstate = dstate = None
        if resume is not None:
            if not isinstance(resume, Mapping) or resume.get("format") != FRAMES_FORMAT:
                raise ValueError(f"resume must be a FrameStream.state_dict() (format {FRAMES_FORMAT!r})")
            rstate, dstate = resume.get("rollout"), resume.get("decoder")
        rollout = generate(self.model, None, num_frames, self.policy, seed, latent_size=self.latent_size,
                           cache_dtype=self.cache_dtype, backend=self.backend, progress=False,
                           resume_from=rstate, prefix_latents=prefix, text_schedule=schedule, recache=recache)
        decoder = self.vae.stream_decoder()
        if dstate is not None:
            decoder.load_state_dict(dstate)
            if decoder.latent_frames != rollout.frames_done:
                raise ValueError(f"cannot resume: the decoder state is at latent frame {decoder.latent_frames} but "
                                 f"the rollout state at {rollout.frames_done}")
        stream = FrameStream(rollout, decoder, progress=progress, info=info, auto_tick=_auto_tick)
        stream.frames_out = _video_frames(rollout.frames_done, stream.tf)
        return stream

    def open(self, path: Union[str, os.PathLike], prompt: PromptLike, num_frames: int, seed: int = 0, *,
             fps: float = 16, segment_frames: Optional[int] = None, image: Optional[PathOrTensor] = None,
             video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
             switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
             resume: Optional[Mapping[str, Any]] = None, progress: bool = True, on_error: str = "partial",
             codec: Optional[str] = None, crf: int = 18, resumable: bool = True) -> VideoRun:
        """A :class:`VideoRun` writing ``path`` (or its segments); iterate it (or call ``run()``). Arguments as
        :meth:`frames` and :meth:`write`; ``resume`` is a :meth:`VideoRun.state_dict`; ``resumable=False`` keeps
        no anchor (no ``state_dict``, no latents held). Every input is checked before any file is created."""
        if resume is not None and (not isinstance(resume, Mapping) or resume.get("format") != RUN_FORMAT):
            raise ValueError(f"resume must be a VideoRun.state_dict() (format {RUN_FORMAT!r})")
        stream = self.frames(prompt, num_frames, seed, image=image, video=video, prefix_latents=prefix_latents,
                             switches=switches, recache=recache, progress=progress,
                             resume=None if resume is None else resume.get("stream"), _auto_tick=False)
        return VideoRun(stream, path, fps=fps, segment_frames=segment_frames, on_error=on_error, codec=codec,
                        crf=crf, resume=resume, resumable=resumable)

    def write(self, path: Union[str, os.PathLike], prompt: PromptLike, num_frames: int, seed: int = 0, *,
              fps: float = 16, segment_frames: Optional[int] = None, image: Optional[PathOrTensor] = None,
              video: Optional[PathOrTensor] = None, prefix_latents: Optional[torch.Tensor] = None,
              switches: Optional[Sequence[Union[Tuple[int, str], str]]] = None, recache: bool = False,
              resume: Optional[Mapping[str, Any]] = None, progress: bool = True, on_error: str = "partial",
              codec: Optional[str] = None, crf: int = 18,
              on_block: Optional[Callable[[FrameChunk, VideoRun], None]] = None,
              resumable: bool = True) -> WriteResult:
        """Generate and write the mp4 while the rollout runs; returns a :class:`WriteResult`.

        Args:
            path: the ``.mp4``; with ``segment_frames=N`` the files are ``NAME_00000.mp4``, ``NAME_00001.mp4``,
                ... of exactly ``N`` video frames each (the last fewer), each finished before the next opens.
            prompt, num_frames, seed, image, video, prefix_latents, switches, recache, progress: as
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
                        resumable=resumable or resume is not None)
        return run.run(on_block)
