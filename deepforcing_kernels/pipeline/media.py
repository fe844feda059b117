"""Reading the media a stream starts from: an image or a video file as frames, and those frames as the stream's
first latent frames (encoded by the VAE); also the small helpers of the command line's inputs (``--switch``) and
of the run's files (segment names, dead temporaries)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["parse_switch", "segment_path", "read_image", "read_video", "prefix_from_pixels", "PathOrTensor"]

PathOrTensor = Union[str, os.PathLike, torch.Tensor]


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
    from ..video._deps import require

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
