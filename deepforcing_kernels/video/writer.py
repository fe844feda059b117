"""An mp4 writer that takes frames as the stream produces them (PyAV / FFmpeg).

H.264 (``libx264``, which PyAV's wheels bundle; another H.264 encoder, or MPEG-4 part 2 with a warning, when it
is absent), ``yuv420p`` so every player opens it, constant frame rate.

Sizes: yuv420p needs an even width and height; an odd size is padded by repeating the last row / column
(``even="pad"``, the default: no picture is lost) or cropped by one (``even="crop"``).

Determinism: the same frames give the same bytes. libx264's AVX-512 kernels do not: with identical input (the
yuv420p planes checked bit for bit) their output depends on what the encoding thread computed before (a torch
matmul on random data between frames changes the stream in 11 of 16 encodes of one 8-frame clip, never with
``asm=AVX2``), so identical runs gave different segments (frame types, pixels off by up to ~29 of 255). On a CPU
with AVX-512 the writer therefore runs libx264 with its AVX2 kernels (:func:`x264_params`); elsewhere libx264
picks its kernels as usual.

Files: frames go to a hidden temporary file in the target folder (``.NAME.PID.writing.mp4``), so a half-written
file never carries the final name:

* ``close()`` (or leaving the ``with`` block normally) finishes the mp4 and renames it to ``path``;
* leaving the ``with`` block by an exception or a ``KeyboardInterrupt`` (Ctrl-C / SIGINT) still finishes the
  mp4 (what was written plays) and, by ``on_error``: ``"partial"`` (default) renames it to ``NAME.partial.mp4``
  beside ``path`` (playable, and visibly not the complete video), ``"keep"`` renames it to ``path``, ``"delete"``
  removes it. ``abort()`` does the same by hand. A video with no frames is never left behind.
"""
from __future__ import annotations

import functools
import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..runio.host import cpu_facts
from ._deps import require

__all__ = ["VideoWriter", "pick_codec", "frames_to_uint8", "x264_params"]

# libx264's x86 kernel sets, for ``asm=``: AVX2 is the widest whose output is a function of the input alone.
# "AVX2" implies SSE2..SSE4.2, AVX, FMA3, LZCNT, BMI1/2: every CPU with AVX-512 has them all.
_X264_DETERMINISTIC_ASM = "AVX2,Cache64"


@functools.lru_cache(maxsize=1)
def _has_avx512() -> bool:
    """Whether libx264 would pick its AVX-512 kernels here (x86 with AVX-512 F/CD/BW/DQ/VL)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "x64"):
        return False
    flags = cpu_facts()[1]
    if flags:
        return {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags
    # not Linux: torch's own CPU probe (ATEN_CPU_CAPABILITY can only lower it, so it may miss a capable CPU)
    return str(torch.backends.cpu.get_cpu_capability()).upper().startswith("AVX512")


def x264_params() -> Dict[str, str]:
    """The codec options that make libx264's output a function of its input alone on this CPU: ``{"x264-params":
    "asm=AVX2,Cache64"}`` on a CPU with AVX-512 (see the module), else ``{}``."""
    return {"x264-params": f"asm={_X264_DETERMINISTIC_ASM}"} if _has_avx512() else {}


def pick_codec(preferred: Optional[str] = None) -> str:
    """The encoder to use: ``preferred`` if given (ValueError if this FFmpeg lacks it), else ``libx264``, another
    H.264 encoder, or ``mpeg4`` (with a warning that the file is MPEG-4 part 2, not H.264)."""
    av = require("av", "VideoWriter")

    def has(name: str) -> bool:
        try:
            av.codec.Codec(name, "w")
            return True
        except Exception:  # noqa: BLE001 - UnknownCodecError and friends
            return False

    if preferred is not None:
        if not has(preferred):
            raise ValueError(f"codec {preferred!r} is not available in this PyAV build")
        return preferred
    for name in ("libx264", "h264", "libopenh264", "h264_v4l2m2m"):
        if has(name):
            return name
    warnings.warn("VideoWriter: no H.264 encoder in this PyAV build; writing MPEG-4 part 2 (mpeg4) instead",
                  stacklevel=3)
    return "mpeg4"


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames ``[T, 3, H, W]`` or ``[1, T, 3, H, W]``, float in [-1, 1] (clamped) or uint8, as the ``[T, H, W, 3]``
    uint8 pixels a :class:`VideoWriter` encodes (the one conversion: a live viewer shows the same pixels)."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dim() == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"frames [B, T, 3, H, W] must have B = 1, got {tuple(frames.shape)}; "
                             "write each video to its own VideoWriter")
        frames = frames[0]
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W] or [1, T, 3, H, W], got {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype == torch.uint8:
        u8 = frames
    elif frames.is_floating_point():
        u8 = ((frames.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
    else:
        raise ValueError(f"frames must be float in [-1, 1] or uint8, got {frames.dtype}")
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def _partial_name(path: Path) -> Path:
    return path.with_name(f"{path.stem}.partial{path.suffix or '.mp4'}")


class VideoWriter:
    """Append frames to an mp4 as they come.

    Args:
        path: the ``.mp4`` to write; its folder must exist and be writable (checked here, ``OSError`` naming it).
        fps: frames per second (Wan2.1: 16).
        codec: the FFmpeg encoder; default :func:`pick_codec`.
        crf: constant-rate-factor quality for libx264 (lower is better; 18 is visually lossless).
        preset: libx264 speed preset.
        even: ``"pad"`` or ``"crop"`` an odd height / width to even.
        on_error: what leaving the ``with`` block by an exception does with what was written: ``"partial"``,
            ``"keep"`` or ``"delete"`` (see the module).

    ``write(frames)`` takes ``[T, 3, H, W]`` or ``[1, T, 3, H, W]`` float in [-1, 1] (clamped) or uint8 in [0, 255];
    every frame must have the first frame's size. ``frames_written``, ``size`` ``(H, W)`` as written (even),
    ``codec`` and, after closing, ``final_path`` (None if nothing was kept) describe the output.
    """

    def __init__(self, path: Union[str, os.PathLike], fps: float = 16, *, codec: Optional[str] = None,
                 crf: int = 18, preset: str = "fast", even: str = "pad", on_error: str = "partial") -> None:
        self._av = require("av", "VideoWriter")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if even not in ("pad", "crop"):
            raise ValueError(f"even must be 'pad' or 'crop', got {even!r}")
        if on_error not in ("partial", "keep", "delete"):
            raise ValueError(f"on_error must be 'partial', 'keep' or 'delete', got {on_error!r}")
        self.path = Path(path)
        if self.path.suffix.lower() not in (".mp4", ".m4v", ".mov"):
            raise ValueError(f"VideoWriter writes mp4: {str(self.path)!r} should end in .mp4")
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot write {str(self.path)!r}: folder {str(folder)!r} does not exist")
        if self.path.is_dir():
            raise IsADirectoryError(f"cannot write {str(self.path)!r}: it is a folder")
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self.codec = pick_codec(codec)
        self.crf, self.preset, self.even, self.on_error = crf, preset, even, on_error
        self._tmp = folder / f".{self.path.stem}.{os.getpid()}.writing{self.path.suffix}"
        try:
            self._container = self._av.open(str(self._tmp), mode="w", format="mp4")
        except (OSError, self._av.error.FFmpegError) as e:
            raise PermissionError(f"cannot write {str(self.path)!r}: {e}") from None
        self._stream: Any = None
        self.size: Optional[tuple] = None
        self._in_size: Optional[tuple] = None
        self.frames_written = 0
        self.final_path: Optional[Path] = None
        self.closed = False

    # ------------------------------------------------------------------ frames
    def _open_stream(self, h: int, w: int) -> None:
        if self.even == "pad":
            he, we = h + h % 2, w + w % 2
        else:
            he, we = h - h % 2, w - w % 2
            if he == 0 or we == 0:
                raise ValueError(f"frames of {h}x{w} are too small to crop to an even size")
        st = self._container.add_stream(self.codec, rate=self.fps)
        st.width, st.height, st.pix_fmt = we, he, "yuv420p"
        st.time_base = 1 / self.fps
        if st.codec_context.codec.name == "libx264":  # also when asked for "h264" and FFmpeg maps it to libx264
            st.options = {"crf": str(self.crf), "preset": self.preset, **x264_params()}
        self._stream, self.size, self._in_size = st, (he, we), (h, w)
        # one colour converter for the whole video: ``VideoFrame.reformat`` builds a new swscale context a frame
        # (at 32x32 that was 90 % of the conversion); the same context gives the same planes, bit for bit
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()

    def _to_uint8(self, frames: torch.Tensor) -> np.ndarray:
        return frames_to_uint8(frames)

    def write(self, frames: torch.Tensor) -> int:
        """Encode ``frames`` now; returns how many were written in all."""
        if self.closed:
            raise ValueError(f"VideoWriter for {str(self.path)!r} is closed")
        arr = self._to_uint8(frames)
        t, h, w = arr.shape[:3]
        if t == 0:
            return self.frames_written
        if self._stream is None:
            self._open_stream(h, w)
        elif (h, w) != self._in_size:
            raise ValueError(f"frame size {h}x{w} differs from the video's {self._in_size[0]}x{self._in_size[1]}")
        he, we = self.size
        if (he, we) != (h, w):
            if self.even == "pad":
                arr = np.pad(arr, ((0, 0), (0, he - h), (0, we - w), (0, 0)), mode="edge")
            else:
                arr = arr[:, :he, :we]
        av = self._av
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24")
            frame = self._reformatter.reformat(frame, format="yuv420p")
            frame.pts = self.frames_written
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        return self.frames_written

    # ------------------------------------------------------------------ closing
    def _finish(self) -> bool:
        """Flush the encoder and close the container; True if a playable file with frames is on disk."""
        ok = False
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
                ok = self.frames_written > 0
        finally:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - a container that cannot close is not playable
                ok = False
        return ok

    def close(self) -> Optional[Path]:
        """Finish the mp4 and give it its final name; returns ``path`` (None if no frame was written)."""
        if self.closed:
            return self.final_path
        self.closed = True
        try:
            ok = self._finish()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        if not ok:
            self._tmp.unlink(missing_ok=True)
            return None
        os.replace(self._tmp, self.path)
        self.final_path = self.path
        return self.path

    def abort(self, on_error: Optional[str] = None) -> Optional[Path]:
        """Stop early: finish what was written and keep it by ``on_error`` (default: the writer's); returns where
        it went (None if deleted or empty)."""
        if self.closed:
            return self.final_path
        self.closed = True
        mode = on_error or self.on_error
        try:
            ok = self._finish()
        except BaseException:  # noqa: BLE001 - an interrupt during the flush: nothing playable to keep
            ok = False
        if not ok or mode == "delete":
            self._tmp.unlink(missing_ok=True)
            return None
        dest = self.path if mode == "keep" else _partial_name(self.path)
        os.replace(self._tmp, dest)
        self.final_path = dest
        return dest

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a writer dropped without close(): do not leave the temporary file
        try:
            if not self.closed:
                self.abort("partial")
        except Exception:  # noqa: BLE001
            pass

    def info(self) -> Dict[str, Any]:
        """What was written: path, frames, size (H, W), fps, codec."""
        return {"path": str(self.final_path or self.path), "frames": self.frames_written, "size": self.size,
                "fps": float(self.fps), "codec": self.codec}
