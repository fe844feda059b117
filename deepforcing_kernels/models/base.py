"""The seam between the generation driver and a model: what a causal video model must offer.

The driver (:mod:`deepforcing_kernels.driver`) reads nothing model-specific: it asks the model for its cache
geometry at a latent size (:meth:`CausalVideoModel.cache_spec`), its latent channels and text width, and calls
it block by block. Any ``nn.Module`` with these members runs through ``generate`` (the tests add a few-line
second family); :class:`~deepforcing_kernels.models.CausalWanModel` is the production one.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from ..rope import RopeSpec

__all__ = ["CacheSpec", "CausalVideoModel", "check_model", "build_cache"]


class CacheSpec(NamedTuple):
    """Geometry of the streaming KV cache a model needs (per rank for a head-sharded model)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens_per_frame: int
    rope: Optional[RopeSpec]
    #: ``(rows, cols)`` of a frame's tokens for a 3-D ``rope`` (policies that un-rotate keys need it)
    frame_grid: Optional[Tuple[int, ...]] = None


@runtime_checkable
class CausalVideoModel(Protocol):
    """A block-causal video model the driver can roll out.

    Attributes:
        latent_channels: channels of the latents it denoises (16 for the Wan VAE).
        text_dim: width of the text embeddings it cross-attends to.
        default_latent_size: latent ``(H, W)`` used when the caller gives none.
    """

    latent_channels: int
    text_dim: int
    default_latent_size: Tuple[int, int]

    def cache_spec(self, latent_size: Sequence[int]) -> CacheSpec:
        """The cache geometry for latents of ``latent_size`` (raise ValueError for a size it cannot take)."""
        ...

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *, cache: Any,
                 start_frame: int) -> torch.Tensor:
        """Flow prediction ``[B, F, C, H, W]`` for a block of latents ``[B, F, C, H, W]`` at timesteps
        ``[B, F]``, attending through ``cache`` (one layer per transformer block) at absolute ``start_frame``."""
        ...


def check_model(model: Any) -> None:
    """TypeError naming what is missing when ``model`` does not implement :class:`CausalVideoModel`."""
    missing = [n for n in ("latent_channels", "text_dim", "default_latent_size", "cache_spec")
               if not hasattr(model, n)]
    if missing or not callable(model):
        raise TypeError(f"model must implement deepforcing_kernels.models.CausalVideoModel (missing: "
                        f"{', '.join(missing) or '__call__'}), got {type(model).__name__}")


def build_cache(model: Any, policy: Any, *, latent_size: Sequence[int], batch_size: int, dtype: torch.dtype,
                device: torch.device, **cache_kw: Any):
    """The :class:`~deepforcing_kernels.StreamingKVCache` ``model`` needs for ``policy`` at ``latent_size``.

    A policy with ``head_jitter`` needs a model that rotates its queries and keys with the cache's RoPE
    (``model.rotates_with_cache_rope``, as :class:`~deepforcing_kernels.models.CausalWanModel` does): ValueError
    naming ``head_jitter`` for any other, which would attend with angles its own rotation never gave."""
    from ..cache import StreamingKVCache

    spec = model.cache_spec(tuple(latent_size))
    if getattr(model, "reduce_over_heads", None) is not None:  # head-sharded (sequence parallel): one Top-C
        cache_kw.setdefault("reduce_over_heads", model.reduce_over_heads)
    if getattr(policy, "head_jitter", 0):
        if not getattr(model, "rotates_with_cache_rope", False):
            raise ValueError(f"head_jitter: {type(model).__name__} rotates its queries and keys with its own RoPE, "
                             "not the cache's per-head one, so it cannot take a policy with head jitter")
        if getattr(model, "head_shard", None) is not None:  # this rank's heads get their one-process scales
            cache_kw.setdefault("head_shard", model.head_shard)
    return StreamingKVCache(policy, num_layers=spec.num_layers, batch_size=batch_size, num_heads=spec.num_heads,
                            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                            tokens_per_frame=spec.tokens_per_frame, rope=spec.rope, dtype=dtype, device=device,
                            frame_grid=getattr(spec, "frame_grid", None), **cache_kw)
