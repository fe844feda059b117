"""The run's on-disk layout (see :mod:`deepforcing_kernels.runio`) and reading it back: :func:`load_run`."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

import torch

from ..formats import RUN_BLOCK_FORMAT, RUN_FORMAT, RUN_STATE_FORMAT
from .files import RunError, _load, check_checksum

__all__ = ["STATE_NAME", "parts_dir", "load_run"]

STATE_NAME = "state.pt"
_BLOCK_RE = re.compile(r"^latents-(\d{8,})\.pt$")


def parts_dir(out: str) -> str:
    """The directory beside ``out`` holding the run's block files and resume state (``out + ".d"``)."""
    return out + ".d"


def _block_name(start_frame: int) -> str:
    return f"latents-{start_frame:08d}.pt"


def _check_block_tensor(t: Any, path: str, f0: int, like: Optional[torch.Tensor], block_frames: Optional[int],
                        batch: Optional[int]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or not t.is_floating_point():
        got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise RunError(f"{path}: 'latents' must be a float tensor [B, frames, C, h, w], got {got}")
    if block_frames is not None and t.shape[1] != block_frames:
        raise RunError(f"{path}: holds {t.shape[1]} frames, the run's blocks have {block_frames}")
    if batch is not None and t.shape[0] != batch:
        raise RunError(f"{path}: batch {t.shape[0]}, the run's is {batch}")
    if like is not None and (t.shape[0] != like.shape[0] or t.shape[2:] != like.shape[2:] or t.dtype != like.dtype):
        raise RunError(f"{path}: latents {list(t.shape)} {t.dtype} do not match the run's first block "
                       f"{list(like.shape)} {like.dtype}")
    if not torch.isfinite(t).all():
        raise RunError(f"{path}: latents hold NaN or inf")
    return t


def _block_files(d: str) -> Dict[int, str]:
    out: Dict[int, str] = {}
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for name in names:
        m = _BLOCK_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(d, name)
    return out


def _read_blocks(d: str, block_frames: int, batch: Optional[int], limit: Optional[int] = None
                 ) -> List[torch.Tensor]:
    files = _block_files(d)
    blocks: List[torch.Tensor] = []
    f0 = 0
    while f0 in files and (limit is None or f0 < limit):
        obj = _load(files[f0], "block file")
        if not (isinstance(obj, dict) and obj.get("format") == RUN_BLOCK_FORMAT and "latents" in obj):
            raise RunError(f"{files[f0]} is not a block file of `deepforcing generate` (format {RUN_BLOCK_FORMAT!r})")
        if obj.get("start_frame") != f0:
            raise RunError(f"{files[f0]} says it starts at frame {obj.get('start_frame')!r}, its name says {f0}")
        blocks.append(_check_block_tensor(obj["latents"], files[f0], f0, blocks[0] if blocks else None,
                                          block_frames, batch))
        f0 += block_frames
    later = sorted(s for s in files if s >= f0 and (limit is None or s < limit))
    if later:
        raise RunError(f"{os.path.join(d, _block_name(f0))} is missing but later blocks exist "
                       f"({os.path.basename(files[later[0]])}, ...)")
    return blocks


def _check_manifest(m: Any, path: str) -> Dict[str, Any]:
    if not isinstance(m, dict):
        raise RunError(f"{path} is not a run of `deepforcing generate` (a {type(m).__name__}, not a dict)")
    if m.get("format") != RUN_FORMAT:
        raise RunError(f"{path} is not a run of `deepforcing generate` (format {m.get('format')!r}, "
                       f"expected {RUN_FORMAT!r})")
    if not isinstance(m.get("settings"), dict):
        raise RunError(f"{path} is damaged: it has no 'settings' dict")
    for key in ("block_frames", "batch_size", "frames"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise RunError(f"{path} is damaged: {key!r} must be a positive int, got {v!r}")
    if not isinstance(m.get("complete"), bool):
        raise RunError(f"{path} is damaged: 'complete' must be a bool, got {m.get('complete')!r}")
    return m


def _legacy(obj: Any, path: str) -> Dict[str, Any]:
    """Check a single-file run of earlier versions."""
    if not (isinstance(obj, dict) and isinstance(obj.get("latents"), torch.Tensor)):
        raise RunError(f"{path} is not a run of `deepforcing generate` (it needs 'latents' and 'settings')")
    if not isinstance(obj.get("settings"), dict):
        raise RunError(f"{path} is damaged: it has no 'settings' dict")
    lat = obj["latents"]
    batch = obj["settings"].get("batch_size", 1)
    if lat.dim() not in (4, 5) or (lat.dim() == 5) != (batch not in (None, 1)):
        raise RunError(f"{path} is damaged: latents {list(lat.shape)} do not fit batch size {batch}")
    frames = lat.shape[0] if lat.dim() == 4 else lat.shape[1]
    done = obj.get("frames_done", frames)
    if isinstance(done, bool) or not isinstance(done, int) or done != frames:
        raise RunError(f"{path} is damaged: frames_done {done!r} does not match its {frames} latent frames")
    st = obj.get("state")
    if isinstance(st, dict) and st.get("frames_done") != frames:
        raise RunError(f"{path} is damaged: its resume state is at frame {st.get('frames_done')!r} but it holds "
                       f"{frames} latent frames")
    return obj


def load_run(path: str, *, with_state: bool = False) -> Dict[str, Any]:
    """Read the output of ``deepforcing generate`` at ``path``, whatever its on-disk layout.

    Args:
        path: the ``--out`` path (the manifest of the block layout, or a single-file run of earlier versions).
        with_state: also return the resume state (``"state"``, ``Rollout.state_dict()``), or None if none was
            saved; it can be large (the whole KV cache), so it is not read by default.

    Returns:
        ``{"latents": [B, F, C, h, w] (or [F, C, h, w] for batch 1), "settings": {...}, "frames_done": F,
        "frames": the run's target, "complete": bool, "layout": "blocks" | "single-file", "state_frames": frames
        the saved resume state covers (0 if none), "state": ... (with_state only)}``.

    Raises:
        RunError (a ValueError) naming the file when something is missing or damaged.
    """
    if not os.path.isfile(path):
        raise RunError(f"{path} is not a file" if os.path.exists(path) else f"{path} does not exist")
    obj = _load(path, "run file")
    if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
        m = _check_manifest(obj, path)
        d = os.path.join(os.path.dirname(os.path.abspath(path)), m.get("parts") or os.path.basename(parts_dir(path)))
        blocks = _read_blocks(d, m["block_frames"], m["batch_size"])
        if blocks:
            lat = torch.cat(blocks, dim=1)
        else:
            lat = torch.zeros(m["batch_size"], 0, 0, 0, 0)
        done = lat.shape[1]
        if m["complete"] and done < m["frames"]:
            raise RunError(f"{path} says the run is complete with {m['frames']} frames but {d} holds {done}")
        state_path = os.path.join(d, STATE_NAME)
        state, state_frames = None, 0
        if os.path.exists(state_path):
            # without with_state the tensors are only memory-mapped, never read
            # (only a resume reads the tensors and their checksum; a listing just maps them)
            st = _check_state_file(_load(state_path, "state file", mmap=not with_state), state_path, done,
                                   verify=with_state)
            state, state_frames = (st["rollout"] if with_state else None), st["frames_done"]
        res = {"latents": lat[0] if m["batch_size"] == 1 else lat, "settings": m["settings"], "frames_done": done,
               "frames": m["frames"], "complete": bool(m["complete"] and done >= m["frames"]), "layout": "blocks",
               "state_frames": state_frames}
        if with_state:
            res["state"] = state
        return res
    obj = _legacy(obj, path)
    lat = obj["latents"]
    frames = lat.shape[0] if lat.dim() == 4 else lat.shape[1]
    res = {"latents": lat, "settings": obj["settings"], "frames_done": frames,
           "frames": obj["settings"].get("frames", frames), "complete": bool(obj.get("complete", False)),
           "layout": "single-file", "state_frames": frames if isinstance(obj.get("state"), dict) else 0}
    if with_state:
        res["state"] = obj.get("state") if isinstance(obj.get("state"), dict) else None
    return res


def _check_state_file(st: Any, path: str, frames_on_disk: int, *, verify: bool = True) -> Dict[str, Any]:
    if verify:
        check_checksum(st, path)
    if not (isinstance(st, dict) and st.get("format") == RUN_STATE_FORMAT and isinstance(st.get("rollout"), dict)):
        raise RunError(f"{path} is not a resume state of `deepforcing generate` (format {RUN_STATE_FORMAT!r})")
    n = st.get("frames_done")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RunError(f"{path} is damaged: frames_done must be an int >= 0, got {n!r}")
    if st["rollout"].get("frames_done") != n:
        raise RunError(f"{path} is damaged: frames_done {n} but its rollout state says "
                       f"{st['rollout'].get('frames_done')!r}")
    if n > frames_on_disk:
        raise RunError(f"{path} is at frame {n} but only {frames_on_disk} frames of latents are on disk")
    return st
