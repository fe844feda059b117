"""A compact, faithful Wan2.1 causal DiT (the network Self-Forcing distils), driving a :class:`StreamingKVCache`.

The maths follows the public Wan2.1 ``wan/modules/model.py`` and Self-Forcing ``wan/modules/causal_model.py``
(SPEC.md section 1), with the original parameter names so released checkpoints load unchanged:

* patch embedding ``Conv3d(in_dim, dim, kernel = stride = patch_size)``; tokens frame-major, then row, column;
* per-frame time embedding: float64 sinusoid (cos first), ``time_embedding`` Linear-SiLU-Linear and
  ``time_projection`` SiLU-Linear(dim, 6*dim);
* ``num_layers`` blocks: modulated self-attention (q/k RMSNorm over the whole dim, 3-D RoPE at absolute frames,
  attention through the cache), unmodulated cross-attention to the zero-padded text, modulated tanh-GELU FFN;
* a modulated head and the Wan unpatchify channel order.

What differs from the release, on purpose: self-attention goes through ``cache.layers[i].attend`` (the cache owns
append / overwrite / roll / compress and the re-phasing of sink keys), RoPE angles come from positions (no
1024-frame table, so no length cap), and the model runs in whatever dtype its parameters have (no autocast).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rotation import apply_rope
from ..rope import RopeSpec
from .base import CacheSpec

__all__ = [
    "WanConfig", "CausalWanModel", "unpatchify", "sinusoidal_embedding", "WanRMSNorm", "WanLayerNorm",
    "WanTextContext",
]


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WanConfig:
    """Sizes of a Wan2.1 T2V DiT.

    Attributes:
        dim, ffn_dim, num_heads, num_layers: transformer sizes (``head_dim = dim // num_heads``, even).
        text_dim: width of the text encoder's embeddings (4096 for umT5-XXL).
        in_dim, out_dim: latent channels in and out (16 for the Wan VAE).
        freq_dim: size of the sinusoidal timestep embedding (even).
        patch_size: ``(pt, ph, pw)``; the causal model needs ``pt == 1`` (one timestep per latent frame).
        eps: epsilon of every LayerNorm and RMSNorm.
        text_len: text embeddings are zero-padded to this many rows (padding rows are attended, unmasked, as in
            the release); ``None`` uses the embeddings as given.
        latent_size: default latent ``(H, W)`` the driver generates at (60 x 104 is 480 x 832 pixels).
        rope_theta: RoPE base.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    in_dim: int
    out_dim: int
    freq_dim: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: Optional[int] = 512
    latent_size: Tuple[int, int] = (60, 104)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_dim", "out_dim", "freq_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        hd = self.dim // self.num_heads
        if hd % 2 or hd // 6 == 0:
            # head_dim // 6 == 0 would leave the height and width RoPE bands empty
            raise ValueError(f"head_dim = dim // num_heads must be even and >= 6, got {hd}")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        ps = tuple(self.patch_size)
        if len(ps) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in ps):
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size!r}")
        if ps[0] != 1:
            raise ValueError("the causal model needs patch_size[0] == 1 (one timestep per latent frame)")
        object.__setattr__(self, "patch_size", ps)
        ls = tuple(self.latent_size)
        if len(ls) != 2 or any(not isinstance(v, int) or v <= 0 for v in ls) \
                or ls[0] % ps[1] or ls[1] % ps[2]:
            raise ValueError(f"WanConfig.latent_size must be 2 positive ints divisible by the patch, got {ls}")
        object.__setattr__(self, "latent_size", ls)
        if self.text_len is not None and (not isinstance(self.text_len, int) or self.text_len <= 0):
            raise ValueError(f"WanConfig.text_len must be a positive int or None, got {self.text_len!r}")
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"WanConfig.eps must be a positive float, got {self.eps!r}")

    # ------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> "WanConfig":
        """A CPU-test-sized model: dim 96, 2 heads of 48 (RoPE bands 16/16/16), 2 layers, 4 latent channels,
        8 x 8 latents (16 tokens per frame), text_dim 32, text_len 16."""
        kw: Dict[str, Any] = dict(dim=96, ffn_dim=192, num_heads=2, num_layers=2, text_dim=32, in_dim=4, out_dim=4,
                                  freq_dim=64, text_len=16, latent_size=(8, 8))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def wan_1_3b(cls, **overrides: Any) -> "WanConfig":
        """Published Wan2.1-T2V-1.3B sizes (the Self-Forcing / Deep Forcing base model)."""
        kw: Dict[str, Any] = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, in_dim=16,
                                  out_dim=16, freq_dim=256, text_len=512, eps=1e-6, latent_size=(60, 104))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def wan_14b(cls, **overrides: Any) -> "WanConfig":
        """Published Wan2.1-T2V-14B sizes (the base of Krea Realtime 14B): dim 5120, FFN 13824, 40 heads of 128,
        40 layers."""
        kw: Dict[str, Any] = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, in_dim=16,
                                  out_dim=16, freq_dim=256, text_len=512, eps=1e-6, latent_size=(60, 104))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "WanConfig":
        """The model called ``name`` in :mod:`deepforcing_kernels.presets` (``tiny``, ``wan_1_3b`` / ``wan-1.3b``,
        ``wan_14b``); ValueError listing the names for an unknown one."""
        from ..presets import model_constructor

        return getattr(cls, model_constructor(name))(**overrides)

    # ------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def rope(self) -> RopeSpec:
        """The Wan 3-D RoPE layout of this model's heads."""
        return RopeSpec.wan(self.head_dim, self.rope_theta)

    def token_grid(self, latent_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
        """Tokens per frame as ``(rows, cols)`` for a latent ``(H, W)`` (default :attr:`latent_size`)."""
        h, w = tuple(latent_size) if latent_size is not None else self.latent_size
        ph, pw = self.patch_size[1], self.patch_size[2]
        if h % ph or w % pw:
            raise ValueError(f"latent size {(h, w)} is not divisible by the patch {(ph, pw)}")
        return h // ph, w // pw

    def tokens_per_frame(self, latent_size: Optional[Sequence[int]] = None) -> int:
        r, c = self.token_grid(latent_size)
        return r * c

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (lists for tuples), safe for ``torch.save`` / ``weights_only`` loading."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["latent_size"] = list(self.latent_size)
        return d


# ---------------------------------------------------------------------------------------------------- pieces
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
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (SPEC section 1)."""

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
        self.config = config
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

    # ------------------------------------------------------------ the CausalVideoModel protocol
    @property
    def latent_channels(self) -> int:
        """Latent channels in (``in_dim``)."""
        return self.config.in_dim

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings (4096 for umT5-XXL)."""
        return self.config.text_dim

    @property
    def default_latent_size(self) -> Tuple[int, int]:
        """Latent ``(H, W)`` generated when none is given (60 x 104 is 480 x 832 pixels)."""
        return tuple(self.config.latent_size)

    def cache_spec(self, latent_size: Sequence[int]) -> CacheSpec:
        """Cache geometry at ``latent_size``: one layer per block, all heads, Wan's 3-D RoPE."""
        c = self.config
        rows, cols = c.token_grid(latent_size)
        return CacheSpec(c.num_layers, c.num_heads, c.num_heads, c.head_dim, rows * cols, self.rope)

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
        w.copy_(nn.init.xavier_uniform_(torch.empty(w.shape[0], w[0].numel(), dtype=w.dtype), generator=g)
                .view_as(w))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
        dim = self.config.dim
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
        tl = self.config.text_len
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
        sin = sinusoidal_embedding(self.config.freq_dim, timestep.flatten()).to(dtype)
        e = self.time_embedding(sin)
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim))
        return e.unflatten(0, (b, nf)), e0.unflatten(0, (b, nf))

    @torch.no_grad()
    def prepare_text(self, text_embeds: torch.Tensor) -> WanTextContext:
        """Embed ``text_embeds [B, L, text_dim]`` (zero-padded to ``text_len``) and project it to every block's
        cross-attention keys and values, once per prompt; pass the result to :meth:`forward` as the text."""
        if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() != 3 or \
                text_embeds.shape[2] != self.config.text_dim:
            raise ValueError(f"text_embeds must be [B, L, {self.config.text_dim}]")
        dtype = self.patch_embedding.weight.dtype
        context = self.embed_text(text_embeds.to(dtype))
        return WanTextContext(tuple(blk.cross_attn.text_kv(context) for blk in self.blocks))

    def _check_inputs(self, latents: Any, timestep: Any, text_embeds: Any, cache: Any, start_frame: Any) -> None:
        c = self.config
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
        c = self.config
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
        if seq_parallel is not None:
            x = seq_parallel.shard(x, grid[0])  # this rank's slice of every frame
        for i, block in enumerate(self.blocks):
            x = block(x, e0, texts[i], grid=grid, start_frame=start_frame, rope=self.rope,
                      layer_cache=cache.layers[i], attn_dtype=attn_dtype, seq_parallel=seq_parallel)
        x = self.head(x, e)
        if seq_parallel is not None:
            x = seq_parallel.gather(x, grid[0])
        return unpatchify(x, grid, c.patch_size, c.out_dim)
