"""A compact, faithful Wan2.1 causal DiT (the network Self-Forcing distils), driving a :class:`StreamingKVCache`.

The maths follows the public Wan2.1 ``wan/modules/model.py`` and Self-Forcing ``wan/modules/causal_model.py``
(docs/spec.md section 1), with the original parameter names so released checkpoints load unchanged:

* patch embedding ``Conv3d(in_dim, dim, kernel = stride = patch_size)``; tokens frame-major, then row, column;
* per-frame time embedding: float64 sinusoid (cos first), ``time_embedding`` Linear-SiLU-Linear and
  ``time_projection`` SiLU-Linear(dim, 6*dim);
* ``num_layers`` blocks: modulated self-attention (q/k RMSNorm over the whole dim, 3-D RoPE at absolute frames,
  attention through the cache), unmodulated cross-attention to the zero-padded text, modulated tanh-GELU FFN;
* a modulated head and the Wan unpatchify channel order.

What differs from the release, on purpose: self-attention goes through ``cache.layers[i].attend`` (the cache owns
append / overwrite / roll / compress and the re-phasing of sink keys), RoPE angles come from positions (no
1024-frame table, so no length cap), and the model runs in whatever dtype its parameters have (no autocast).

The sizes live in :mod:`.wan_config`, the layers in :mod:`.wan_blocks`; this module holds the model.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .base import CacheSpec
from .wan_blocks import (  # noqa: F401
    WanAttentionBlock,
    WanHead,
    WanLayerNorm,
    WanRMSNorm,
    WanTextContext,
    sinusoidal_embedding,
    unpatchify,
)
from .wan_config import WanConfig

__all__ = [
    "WanConfig", "CausalWanModel", "unpatchify", "sinusoidal_embedding", "WanRMSNorm", "WanLayerNorm",
    "WanTextContext",
]


# ---------------------------------------------------------------------------------------------------- model
class CausalWanModel(nn.Module):
    """Wan2.1 T2V DiT run block by block over a streaming KV cache (Self-Forcing inference).

    Args:
        config: the sizes (:class:`WanConfig`).

    Parameters are initialised as Wan does (Xavier linears, zero biases, zero output head), so a fresh model
    predicts zero flow; :meth:`init_weights` with ``zero_head=False`` gives a random model whose outputs depend on
    its inputs (what the tests and the demo use).
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        if not isinstance(config, WanConfig):
            raise TypeError(f"config must be a WanConfig, got {type(config).__name__}")
        # the sizes are kept as ``wan_config`` (read by every method here) and exposed as ``config``; a subclass that
        # also derives from diffusers' ConfigMixin (pipeline/hub_models.py) gets ConfigMixin's ``config`` instead
        self.wan_config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(c) for _ in range(c.num_layers)])
        self.head = WanHead(c)
        self.rope = c.rope()
        self.init_weights()

    @property
    def config(self) -> WanConfig:
        """The model's sizes (:class:`WanConfig`)."""
        return self.wan_config

    #: self-attention rotates queries and keys with the cache's RoPE spec (:meth:`attention_rope`), so a policy's
    #: head jitter reaches the model and the cache alike (:func:`~deepforcing_kernels.models.build_cache` checks it)
    rotates_with_cache_rope = True

    def attention_rope(self, cache: Any) -> Any:
        """The RoPE spec self-attention rotates queries and keys with for ``cache``: the cache's when it carries
        per-head scales (a policy's ``head_jitter``: the cache re-phases its keys with the same per-head angles),
        else the model's own. ValueError when the cache's spec is not the model's layout."""
        rope = getattr(cache, "rope", None)
        if rope is None or getattr(rope, "head_scale", None) is None:
            return self.rope
        if rope.with_head_scale(None) != self.rope:
            raise ValueError(f"the cache's RoPE {rope.with_head_scale(None)} is not the model's {self.rope}: build "
                             "the cache from model.cache_spec() (deepforcing_kernels.models.build_cache)")
        return rope

    # ------------------------------------------------------------ the CausalVideoModel protocol
    @property
    def latent_channels(self) -> int:
        """Latent channels in (``in_dim``)."""
        return self.wan_config.in_dim

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings (4096 for umT5-XXL)."""
        return self.wan_config.text_dim

    @property
    def default_latent_size(self) -> Tuple[int, int]:
        """Latent ``(H, W)`` generated when none is given (60 x 104 is 480 x 832 pixels)."""
        return tuple(self.wan_config.latent_size)

    def cache_spec(self, latent_size: Sequence[int]) -> CacheSpec:
        """Cache geometry at ``latent_size``: one layer per block, all heads, Wan's 3-D RoPE."""
        c = self.wan_config
        rows, cols = c.token_grid(latent_size)
        return CacheSpec(c.num_layers, c.num_heads, c.num_heads, c.head_dim, rows * cols, self.rope, (rows, cols))

    @torch.no_grad()
    def init_weights(self, *, generator: Optional[torch.Generator] = None, zero_head: bool = True) -> None:
        """Wan's initialisation, optionally drawn from ``generator`` (deterministic whatever the global RNG).

        Xavier-uniform linears and patch embedding, zero biases, N(0, 0.02) text / time embeddings, modulations
        ``randn / sqrt(dim)``; the output head is zero unless ``zero_head=False`` (then N(0, 0.02) weights and a
        small random bias), which gives a non-trivial random model.
        """
        g = generator
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        flat = torch.empty(w.shape[0], w[0].numel(), dtype=w.dtype)
        nn.init.xavier_uniform_(flat, generator=g)  # in place (a loader that turns nn.init off leaves it as is)
        w.copy_(flat.view_as(w))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
        dim = self.wan_config.dim
        for mod in [b.modulation for b in self.blocks] + [self.head.modulation]:
            mod.copy_(torch.randn(mod.shape, generator=g, dtype=mod.dtype) / dim ** 0.5)
        if zero_head:
            nn.init.zeros_(self.head.head.weight)
        else:
            nn.init.normal_(self.head.head.weight, std=0.02, generator=g)
            nn.init.normal_(self.head.head.bias, std=0.02, generator=g)

    # ------------------------------------------------------------ pieces of forward
    def embed_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``text_embeds`` [B, L, text_dim] to ``text_len`` rows and apply ``text_embedding``."""
        tl = self.wan_config.text_len
        if tl is not None:
            if text_embeds.shape[1] > tl:
                raise ValueError(f"text_embeds has {text_embeds.shape[1]} rows but the model's text_len is {tl}")
            if text_embeds.shape[1] < tl:
                pad = text_embeds.new_zeros(text_embeds.shape[0], tl - text_embeds.shape[1], text_embeds.shape[2])
                text_embeds = torch.cat([text_embeds, pad], dim=1)
        return self.text_embedding(text_embeds)

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``timestep`` [B, F] -> ``e`` [B, F, dim] and ``e0`` [B, F, 6, dim]."""
        b, nf = timestep.shape
        sin = sinusoidal_embedding(self.wan_config.freq_dim, timestep.flatten()).to(dtype)
        e = self.time_embedding(sin)
        e0 = self.time_projection(e).unflatten(1, (6, self.wan_config.dim))
        return e.unflatten(0, (b, nf)), e0.unflatten(0, (b, nf))

    @torch.no_grad()
    def prepare_text(self, text_embeds: torch.Tensor) -> WanTextContext:
        """Embed ``text_embeds [B, L, text_dim]`` (zero-padded to ``text_len``) and project it to every block's
        cross-attention keys and values, once per prompt; pass the result to :meth:`forward` as the text."""
        if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() != 3 or \
                text_embeds.shape[2] != self.wan_config.text_dim:
            raise ValueError(f"text_embeds must be [B, L, {self.wan_config.text_dim}]")
        dtype = self.patch_embedding.weight.dtype
        context = self.embed_text(text_embeds.to(dtype))
        return WanTextContext(tuple(blk.cross_attn.text_kv(context) for blk in self.blocks))

    def _check_inputs(self, latents: Any, timestep: Any, text_embeds: Any, cache: Any, start_frame: Any) -> None:
        c = self.wan_config
        if isinstance(text_embeds, WanTextContext):
            if len(text_embeds.kv) != c.num_layers:
                raise ValueError(f"the text context has {len(text_embeds.kv)} blocks, the model {c.num_layers}")
            if isinstance(latents, torch.Tensor) and latents.dim() == 5 and \
                    text_embeds.batch not in (1, latents.shape[0]):
                raise ValueError(f"the text context has batch {text_embeds.batch}, the latents {latents.shape[0]}")
            text_embeds = torch.zeros(1, 1, c.text_dim)  # the tensor checks below then pass for the text
        for name, t, nd in (("latents", latents, 5), ("timestep", timestep, 2), ("text_embeds", text_embeds, 3)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != nd:
                raise ValueError(f"{name} must be {nd}-D, got shape {list(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        b, nf, ch, h, w = latents.shape
        if ch != c.in_dim:
            raise ValueError(f"latents have {ch} channels but the model takes in_dim={c.in_dim}")
        if h % c.patch_size[1] or w % c.patch_size[2]:
            raise ValueError(f"latent size {(h, w)} is not divisible by the patch {c.patch_size[1:]}")
        if tuple(timestep.shape) != (b, nf):
            raise ValueError(f"timestep must have shape [{b}, {nf}] (one per frame), got {list(timestep.shape)}")
        if text_embeds.shape[0] not in (1, b) or text_embeds.shape[2] != c.text_dim:
            raise ValueError(f"text_embeds must be [{b} or 1, L, {c.text_dim}], got {list(text_embeds.shape)}")
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise TypeError(f"start_frame must be a non-negative int, got {start_frame!r}")
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(f"cache must have .layers (a StreamingKVCache), got {type(cache).__name__}")
        if len(layers) != c.num_layers:
            raise ValueError(f"cache has {len(layers)} layers but the model has {c.num_layers} blocks")

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, *, cache: Any,
                start_frame: int, seq_parallel: Any = None) -> torch.Tensor:
        """Flow prediction for one block of latent frames.

        Args:
            latents: ``[B, F, C, H, W]`` noisy latents of the block (``F`` frames starting at ``start_frame``).
            timestep: ``[B, F]`` float timesteps in ``[0, 1000]`` (floats: 833.33 is not 833).
            text_embeds: ``[B or 1, L_text, text_dim]`` text-encoder output (zero-padded to ``text_len`` rows), or
                the :class:`WanTextContext` of :meth:`prepare_text` (the same text, projected once).
            cache: a :class:`~deepforcing_kernels.cache.StreamingKVCache` (or anything with ``.layers[i].attend(q,
                k, v, start_frame=)``) with one layer per block; q, k, v are cast to its ``dtype`` (when it has
                one) and the result cast back.
            start_frame: absolute index of the block's first frame (RoPE position and cache schedule).
            seq_parallel: the sequence-parallel hook (a :class:`~deepforcing_kernels.distributed.comm.SequenceComm`,
                passed by :class:`~deepforcing_kernels.distributed.ulysses.SequenceParallelWan`): the blocks run on
                this rank's slice of every frame's tokens and self-attention on its heads. None (default): all here.

        Returns:
            the flow ``[B, F, out_dim, H, W]`` in the model's dtype.
        """
        self._check_inputs(latents, timestep, text_embeds, cache, start_frame)
        c = self.wan_config
        dtype = self.patch_embedding.weight.dtype
        b = latents.shape[0]
        x = self.patch_embedding(latents.to(dtype).transpose(1, 2))  # [B, dim, F, H/ph, W/pw]
        grid = tuple(int(v) for v in x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # tokens frame-major, then row, column
        e, e0 = self.embed_time(timestep, dtype)
        if isinstance(text_embeds, WanTextContext):
            texts = text_embeds.kv  # precomputed once per prompt
        else:
            context = self.embed_text(text_embeds.to(dtype))
            if context.shape[0] != b:
                context = context.expand(b, -1, -1)
            texts = (context,) * len(self.blocks)
        attn_dtype = getattr(cache, "dtype", None) or dtype
        rope = self.attention_rope(cache)
        if getattr(cache, "wants_pass_marks", False):  # TetherCache admits at the clean pass (t = 0)
            cache.mark_pass(clean=bool((timestep == 0).all()))
        if seq_parallel is not None:
            x = seq_parallel.shard(x, grid[0])  # this rank's slice of every frame
        for i, block in enumerate(self.blocks):
            x = block(x, e0, texts[i], grid=grid, start_frame=start_frame, rope=rope,
                      layer_cache=cache.layers[i], attn_dtype=attn_dtype, seq_parallel=seq_parallel)
        x = self.head(x, e)
        if seq_parallel is not None:
            x = seq_parallel.gather(x, grid[0])
        return unpatchify(x, grid, c.patch_size, c.out_dim)
