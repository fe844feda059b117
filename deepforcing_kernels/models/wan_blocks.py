"""The pieces of the Wan2.1 causal DiT, with the original parameter names: time sinusoid, norms, self- and
cross-attention, the attention block, the head and unpatchify (see :mod:`.wan` for what follows the release)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rope import RopeSpec
from ..rotation import apply_rope
from .wan_config import WanConfig

__all__ = ["sinusoidal_embedding", "WanRMSNorm", "WanLayerNorm", "WanSelfAttention", "WanCrossAttention",
           "WanTextContext", "WanAttentionBlock", "WanHead", "unpatchify"]


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep sinusoid: float64 ``[N, dim]``, **cos first** then sin, frequencies
    ``10000 ** (-k / (dim / 2))`` for ``k < dim / 2``. ``position`` is any float tensor ``[N]``."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    pos = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanRMSNorm(nn.Module):
    """``x.float() * rsqrt(mean(x^2) + eps)``, cast back to ``x``'s dtype, times a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (affine only for ``norm3``, as in Wan)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class _WanAttention(nn.Module):
    """The projections both attentions share, under Wan's parameter names: q, k, v, o and the q/k RMSNorms
    (over the whole dim, before the head split)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)


class WanSelfAttention(_WanAttention):
    """Causal self-attention: q/k RMSNorm over the whole dim, 3-D RoPE at absolute frames, attention through
    one layer of the streaming cache."""

    def forward(self, x: torch.Tensor, *, grid: Tuple[int, int, int], start_frame: int, rope: RopeSpec,
                layer_cache: Any, attn_dtype: torch.dtype, seq_parallel: Any = None) -> torch.Tensor:
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        if seq_parallel is not None:  # Ulysses: [tokens/P, all heads] -> [all tokens, heads/P], after the norms
            q, k, v = seq_parallel.tokens_to_heads((q, k, v), grid[0])
        # The release rotates in float64 and then casts to the storage dtype; do the same (the cache keeps keys
        # exactly as written, so this rounding happens once per key, never again).
        q = apply_rope(q.double(), rope, frame_offset=start_frame, grid=grid)
        k = apply_rope(k.double(), rope, frame_offset=start_frame, grid=grid)
        out = layer_cache.attend(q.to(attn_dtype), k.to(attn_dtype), v.to(attn_dtype), start_frame=start_frame)
        if seq_parallel is not None:
            out = seq_parallel.heads_to_tokens(out, grid[0])
        return self.o(out.to(x.dtype).flatten(2))


class WanCrossAttention(_WanAttention):
    """Text cross-attention (T2V): q/k RMSNorm, no mask, no RoPE."""

    def text_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the embedded text ``[B, L, dim]``: ``[B, heads, L, head_dim]`` each."""
        b, n, d = context.shape[0], self.num_heads, self.head_dim
        k = self.norm_k(self.k(context)).view(b, -1, n, d).transpose(1, 2)
        v = self.v(context).view(b, -1, n, d).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, text: Any) -> torch.Tensor:
        """``text``: the embedded text ``[B, L, dim]``, or its precomputed ``(k, v)`` (:meth:`text_kv`)."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d).transpose(1, 2)
        k, v = text if isinstance(text, tuple) else self.text_kv(text)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class WanTextContext(NamedTuple):
    """A prompt prepared once (:meth:`CausalWanModel.prepare_text`): the cross-attention keys and values of
    every block, ``[B, heads, L, head_dim]`` each, reused by every pass and block of the stream (Self-Forcing's
    cross-attention cache)."""

    kv: Tuple[Tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]


class WanAttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (docs/spec.md section 1)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, **attn_kw: Any) -> torch.Tensor:
        # e0 [B, F, 6, dim]; each chunk [B, F, 1, dim] broadcasts over the S tokens of its frame
        nf = e0.shape[1]
        fs = x.shape[1] // nf
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.unsqueeze(1) + e0).chunk(6, 2)

        h = (self.norm1(x).unflatten(1, (nf, fs)) * (1 + scale_sa) + shift_sa).flatten(1, 2)
        y = self.self_attn(h, **attn_kw)
        x = x + (y.unflatten(1, (nf, fs)) * gate_sa).flatten(1, 2)

        x = x + self.cross_attn(self.norm3(x), context)

        h = (self.norm2(x).unflatten(1, (nf, fs)) * (1 + scale_ffn) + shift_ffn).flatten(1, 2)
        y = self.ffn(h)
        return x + (y.unflatten(1, (nf, fs)) * gate_ffn).flatten(1, 2)


class WanHead(nn.Module):
    """Output head: ``head(LayerNorm(x) * (1 + scale) + shift)`` with ``shift, scale`` from ``modulation + e``
    (``e`` as is, no SiLU)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # e [B, F, dim] -> [B, F, 1, dim]; returns [B, F, S, prod(patch) * out_dim]
        nf = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (nf, x.shape[1] // nf)) * (1 + scale) + shift)


def unpatchify(x: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], out_dim: int) -> torch.Tensor:
    """Head output ``[B, F', S, prod(patch) * out_dim]`` (or ``[B, L, ...]``) to latents ``[B, F, C, H, W]``.

    Channel ``((p * ph + q) * pw + r) * out_dim + c`` of token ``(f, h, w)`` is frame ``f * pt + p``, channel ``c``,
    row ``h * ph + q``, column ``w * pw + r`` (Wan's ``einsum('fhwpqrc->cfphqwr')``).
    """
    f, h, w = (int(v) for v in grid)
    pt, ph, pw = (int(v) for v in patch_size)
    b = x.shape[0]
    u = x.reshape(b, f, h, w, pt, ph, pw, out_dim)
    u = torch.einsum("bfhwpqrc->bfpchqwr", u)
    return u.reshape(b, f * pt, out_dim, h * ph, w * pw)
