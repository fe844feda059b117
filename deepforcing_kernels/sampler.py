"""The Self-Forcing few-step flow-matching sampler of one block (docs/spec.md section 1).

Per block of latent frames: four denoising passes at the shift-5 warp of ``[1000, 750, 500, 250]`` =
``[1000, 937.5, 833.33.., 625]`` (``flow = model(x, t)``, ``x0 = x - sigma_t * flow`` in float64 as the release,
``sigma_t = t / 1000``; between steps ``x = (1 - sigma_next) * x0 + sigma_next * noise``), then a clean pass at
``t = 0`` on the final ``x0`` whose only purpose is to overwrite the block's K/V with clean ones. All passes use the
block's start frame, so the cache appends on the first and overwrites on the others.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch

__all__ = ["DENOISING_STEPS", "SHIFT", "warp_timesteps", "checked_timesteps", "check_text_schedule", "denoise_block", "clean_pass"]

# Self-Forcing's 4-step schedule before the warp, and the warp's shift.
DENOISING_STEPS: Tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
SHIFT = 5.0


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


Flow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, F, C, h, w], t [B, F]) -> flow


def checked_timesteps(steps: Any, shift: float, name: str) -> List[float]:
    """The warped schedule; ValueError naming ``name`` for an empty or non-numeric list (values out of
    [0, 1000] are :func:`warp_timesteps`'s error, prefixed)."""
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of timesteps in [0, 1000], got {steps!r}")
    try:
        return warp_timesteps([float(t) for t in steps], shift)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


def check_text_schedule(schedule: Any, text_dim: int) -> List[Tuple[int, torch.Tensor]]:
    """``[(first frame, text embeddings), ...]`` checked (frames from 0, increasing; finite float tensors
    ``[L, text_dim]`` or ``[B, L, text_dim]``), each as ``[B, L, text_dim]``; ValueError naming the entry."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError("text_schedule must be a non-empty list of (start_frame, text_embeds) pairs")
    out: List[Tuple[int, torch.Tensor]] = []
    for i, item in enumerate(schedule):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"text_schedule[{i}] must be a (start_frame, text_embeds) pair")
        f, t = item
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"text_schedule[{i}] starts at {f!r}: frames are non-negative ints")
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            raise ValueError(f"text_schedule[{i}]'s text_embeds must be a tensor [L, text_dim] or "
                             "[B, L, text_dim]")
        if t.shape[-1] != text_dim:
            raise ValueError(f"text_embeds has width {t.shape[-1]}, the model takes {text_dim}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"text_schedule[{i}]'s text_embeds hold NaN or inf (or are not floating point)")
        if i == 0 and f != 0:
            raise ValueError(f"text_schedule must start at frame 0, got {f}")
        if i and f <= out[-1][0]:
            raise ValueError(f"text_schedule must be in increasing frame order, got {out[-1][0]} then {f}")
        out.append((f, t[None] if t.dim() == 2 else t))
    return out


def denoise_block(flow: Flow, noise: Callable[[], torch.Tensor], timesteps: Sequence[float], *,
                  batch_size: int, block_frames: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Run the denoising passes of one block; returns the clean ``x0`` (``dtype``).

    ``noise()`` draws float32 noise of the block's shape (called once per step: the first draw is the initial
    ``x``, each later one re-noises)."""
    x = noise().to(dtype)
    x0 = x
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        ts = torch.full((batch_size, block_frames), t, dtype=torch.float32, device=device)
        f = flow(x, ts)
        sigma = t / 1000.0
        x0 = (x.double() - sigma * f.double()).to(dtype)
        if i < last:
            s_next = timesteps[i + 1] / 1000.0
            x = ((1.0 - s_next) * x0.float() + s_next * noise()).to(dtype)
    return x0


def clean_pass(flow: Flow, x0: torch.Tensor) -> None:
    """The context pass at ``t = 0``: rewrites the block's K/V from the clean latents (output unused)."""
    zeros = torch.zeros(x0.shape[:2], dtype=torch.float32, device=x0.device)
    flow(x0, zeros)
