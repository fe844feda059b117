"""The sizes of a Wan2.1 T2V DiT (:class:`WanConfig`) and its named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from ..rope import RopeSpec

__all__ = ["WanConfig"]


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
