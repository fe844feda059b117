"""Ulysses sequence parallelism for :class:`~deepforcing_kernels.models.CausalWanModel`.

:class:`SequenceParallelWan` wraps a model that every rank holds whole. Its ``forward`` takes and returns the
same full-block tensors as the model's (so the driver runs unchanged over it), but inside, each rank runs the
blocks on its slice of every frame's tokens and self-attention on its ``H/P`` heads, through the two hooks of
``models/wan.py`` (see :mod:`deepforcing_kernels.distributed.comm` for the layout). Its :meth:`cache_spec`
reports ``H/P`` heads, so the cache the driver builds holds only this rank's heads (K/V bytes per rank = 1/P),
and :attr:`reduce_over_heads` is the deterministic Top-C reduction the cache must be given.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .comm import SequenceComm
from .launch import ParallelError, check_divisible
from .reduce import HeadReducer

__all__ = ["SequenceParallelWan", "check_same_weights"]


class SequenceParallelWan(nn.Module):
    """A :class:`CausalWanModel` run sequence-parallel over the ranks of ``comm``.

    Args:
        model: the full model (identical weights on every rank: :func:`check_same_weights` checks it).
        comm: the ranks' :class:`SequenceComm` (default: the whole initialised world).
        record_topc: keep every Top-C total in ``reduce_over_heads.history`` (tests).

    Raises:
        ParallelError: the world size does not divide the heads.
    """

    def __init__(self, model: nn.Module, comm: Optional[SequenceComm] = None, *, record_topc: bool = False) -> None:
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "num_heads"):
            raise TypeError(f"model must be a CausalWanModel (with .config), got {type(model).__name__}")
        self.model = model
        self._cfg = getattr(model, "wan_config", cfg)  # the sizes (a diffusers-wrapped model's config is a dict)
        self.comm = comm if comm is not None else SequenceComm()
        self.world, self.rank = self.comm.world, self.comm.rank
        kv = getattr(cfg, "num_kv_heads", None)
        if cfg.num_heads % self.world or (kv is not None and kv % self.world):
            check_divisible(num_heads=cfg.num_heads, num_kv_heads=kv, tokens_per_frame=self.world, world=self.world)
        self.reduce_over_heads = HeadReducer(self.comm, record=record_topc)

    # ---------------------------------------------------------------- the model protocol
    @property
    def config(self) -> Any:
        return self._cfg

    @property
    def latent_channels(self) -> int:
        return int(getattr(self.model, "latent_channels", self._cfg.in_dim))

    @property
    def text_dim(self) -> int:
        return int(getattr(self.model, "text_dim", self._cfg.text_dim))

    @property
    def default_latent_size(self) -> Any:
        return tuple(getattr(self.model, "default_latent_size", self._cfg.latent_size))

    @property
    def rotates_with_cache_rope(self) -> bool:
        """Whether a policy's head jitter can run: the wrapped model rotates with the cache's RoPE."""
        return bool(getattr(self.model, "rotates_with_cache_rope", False))

    @property
    def head_shard(self) -> tuple:
        """``(rank, world)``: this rank's cache holds the rank's contiguous group of heads (a policy's head jitter
        gives them their one-process scales)."""
        return (self.rank, self.world)

    @property
    def local_heads(self) -> int:
        """Heads of this rank's cache and attention."""
        return self._cfg.num_heads // self.world

    def check_tokens(self, latent_size: Optional[Sequence[int]] = None) -> int:
        """Tokens per frame at ``latent_size``; raises :class:`ParallelError` unless divisible by the world."""
        n = self._cfg.tokens_per_frame(latent_size)
        if n % self.world:
            check_divisible(num_heads=self.world, num_kv_heads=None, tokens_per_frame=n, world=self.world)
        return n

    def cache_spec(self, latent_size: Optional[Sequence[int]] = None) -> Any:
        """The model's cache spec with this rank's heads (``num_heads / P``, ``num_kv_heads / P``)."""
        latent_size = tuple(latent_size) if latent_size is not None else self.default_latent_size
        self.check_tokens(latent_size)
        spec = self.model.cache_spec(latent_size)
        kv = getattr(spec, "num_kv_heads", None)
        return spec._replace(num_heads=spec.num_heads // self.world,
                             **({"num_kv_heads": kv // self.world} if kv is not None else {}))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, *, cache: Any,
                start_frame: int) -> torch.Tensor:
        """The model's flow for the whole block, computed sequence-parallel; identical on every rank."""
        if latents.dim() == 5:
            self.check_tokens(tuple(latents.shape[-2:]))
        heads = getattr(cache, "num_heads", None)
        if heads is not None and heads != self.local_heads:
            raise ValueError(f"the cache holds {heads} heads but this rank attends with {self.local_heads} "
                             f"({self._cfg.num_heads} heads over {self.world} ranks): build it from "
                             "cache_spec()")
        red = getattr(cache, "reduce_over_heads", self.reduce_over_heads)
        pol = getattr(cache, "policy", None)
        if red is not self.reduce_over_heads and (getattr(pol, "compresses", False) or
                                                  getattr(pol, "tether_frames", 0)):
            raise ValueError("this cache would choose Top-C / admit frames from this rank's heads alone: build it with "
                             "reduce_over_heads=model.reduce_over_heads (deepforcing_kernels.models.build_cache, "
                             "which the driver uses, does)")
        return self.model(latents, timestep, text_embeds, cache=cache, start_frame=start_frame,
                          seq_parallel=self.comm)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world={self.world}, local_heads={self.local_heads}"


def check_same_weights(model: nn.Module, comm: SequenceComm) -> None:
    """Raise :class:`ParallelError` unless every rank holds bit-identical parameters: per tensor, the sum of its
    bits and the sum of its bits weighted by position (int64, exact; wrapping is the same on every rank), all
    gathered and compared."""
    sums = []
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for p in model.state_dict().values():
        if isinstance(p, torch.Tensor) and p.numel():
            b = p.detach().reshape(-1).contiguous()
            bits = b.view(ints[b.element_size()]).to(torch.int64)
            w = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device) % 65521
            sums.append(torch.stack([bits.sum(), (bits * w).sum()]))
    device = next(model.parameters()).device
    digest = torch.cat(sums) if sums else torch.zeros(2, dtype=torch.int64, device=device)
    g = comm.all_gather(digest.to(device), "weights_check").cpu()
    for r in range(1, comm.world):
        if not torch.equal(g[r], g[0]):
            raise ParallelError(f"the model weights differ between rank 0 and rank {r}: every rank must load the "
                                "same checkpoint (or the same --seed)")

