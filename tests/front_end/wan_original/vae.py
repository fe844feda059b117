"""A compact re-derivation of Wan2.1's original causal video VAE forward (``wan/modules/vae.py`` of
Wan-Video/Wan2.1), working directly on an original-format state dict. Test oracle only: it shares no code with
diffusers or with ``deepforcing_kernels.video``.

It follows the published source step by step: ``CausalConv3d`` (causal time padding ``2 * p``, the cached frames
replacing that much padding), ``RMS_norm`` (``F.normalize`` over channels times sqrt(C) times gamma), the
feature cache of ``ResidualBlock`` / ``Resample`` / the heads (``CACHE_T = 2`` frames; the ``"Rep"`` marker of
``upsample3d``; ``downsample3d`` keeping one frame), ``WanVAE_.encode`` (frame 0 then chunks of 4) and
``WanVAE_.decode`` (one latent frame at a time), and the ``WanVAE`` wrapper's scale ``[mean, 1 / std]`` and clamp.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

CACHE_T = 2


class OriginalWanVAE:
    """Wan2.1's ``WanVAE_`` forward over a state dict ``sd`` with the original key names."""

    def __init__(self, sd: Dict[str, torch.Tensor], dim: int, z_dim: int, dim_mult: Sequence[int],
                 num_res_blocks: int, temperal_downsample: Sequence[bool]):
        self.sd, self.dim, self.z_dim = sd, dim, z_dim
        self.dim_mult, self.nrb = list(dim_mult), num_res_blocks
        self.tdown = list(temperal_downsample)
        self.tup = self.tdown[::-1]

    # -- primitives --------------------------------------------------------------------------------------------
    def conv3d(self, name: str, x: torch.Tensor, pad: int, cache_x: Optional[torch.Tensor] = None,
               stride=(1, 1, 1)) -> torch.Tensor:
        """``CausalConv3d``: zero-pad time by 2*pad in front (less what the cache supplies), space by pad."""
        padding = [pad, pad, pad, pad, 2 * pad, 0]
        if cache_x is not None and 2 * pad > 0:
            x = torch.cat([cache_x, x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = F.pad(x, padding)
        return F.conv3d(x, self.sd[name + ".weight"], self.sd[name + ".bias"], stride=stride)

    def time_conv(self, name: str, x: torch.Tensor, pad_t: int, cache_x=None, stride_t: int = 1) -> torch.Tensor:
        """``CausalConv3d`` with kernel (3, 1, 1): time padding only."""
        padding = [0, 0, 0, 0, 2 * pad_t, 0]
        if cache_x is not None and 2 * pad_t > 0:
            x = torch.cat([cache_x, x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = F.pad(x, padding)
        return F.conv3d(x, self.sd[name + ".weight"], self.sd[name + ".bias"], stride=(stride_t, 1, 1))

    def rms(self, name: str, x: torch.Tensor) -> torch.Tensor:
        g = self.sd[name + ".gamma"]
        return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * g

    def cached(self, name: str, x: torch.Tensor, cache: List, idx: List[int]) -> torch.Tensor:
        """The cache pattern around every 3x3x3 causal conv (ResidualBlock, conv1, head)."""
        i = idx[0]
        cache_x = x[:, :, -CACHE_T:].clone()
        if cache_x.shape[2] < 2 and cache[i] is not None:
            cache_x = torch.cat([cache[i][:, :, -1].unsqueeze(2), cache_x], dim=2)
        x = self.conv3d(name, x, 1, cache[i])
        cache[i] = cache_x
        idx[0] += 1
        return x

    def residual(self, name: str, x: torch.Tensor, cache: List, idx: List[int]) -> torch.Tensor:
        sc = name + ".shortcut"
        h = self.conv3d(sc, x, 0) if sc + ".weight" in self.sd else x
        x = F.silu(self.rms(name + ".residual.0", x))
        x = self.cached(name + ".residual.2", x, cache, idx)
        x = F.silu(self.rms(name + ".residual.3", x))
        x = self.cached(name + ".residual.6", x, cache, idx)
        return x + h

    def attention(self, name: str, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.rms(name + ".norm", x)
        qkv = F.conv2d(x, self.sd[name + ".to_qkv.weight"], self.sd[name + ".to_qkv.bias"])
        q, k, v = qkv.reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = F.conv2d(x, self.sd[name + ".proj.weight"], self.sd[name + ".proj.bias"])
        return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity

    def resample(self, name: str, x: torch.Tensor, mode: str, cache: List, idx: List[int]) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if mode == "upsample3d":
            i = idx[0]
            if cache[i] is None:
                cache[i] = "Rep"
                idx[0] += 1
            else:
                cache_x = x[:, :, -CACHE_T:].clone()
                if cache_x.shape[2] < 2 and cache[i] != "Rep":
                    cache_x = torch.cat([cache[i][:, :, -1].unsqueeze(2), cache_x], dim=2)
                if cache_x.shape[2] < 2 and cache[i] == "Rep":
                    cache_x = torch.cat([torch.zeros_like(cache_x), cache_x], dim=2)
                if cache[i] == "Rep":
                    x = self.time_conv(name + ".time_conv", x, 1)
                else:
                    x = self.time_conv(name + ".time_conv", x, 1, cache[i])
                cache[i] = cache_x
                idx[0] += 1
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3)
                x = x.reshape(b, c, t * 2, h, w)
        t = x.shape[2]
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        wgt, bias = self.sd[name + ".resample.1.weight"], self.sd[name + ".resample.1.bias"]
        if mode.startswith("upsample"):
            y = F.interpolate(y.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(y)
            y = F.conv2d(y, wgt, bias, padding=1)
        else:
            y = F.conv2d(F.pad(y, (0, 1, 0, 1)), wgt, bias, stride=2)
        x = y.reshape(b, t, y.shape[1], y.shape[2], y.shape[3]).permute(0, 2, 1, 3, 4)
        if mode == "downsample3d":
            i = idx[0]
            if cache[i] is None:
                cache[i] = x.clone()
                idx[0] += 1
            else:
                cache_x = x[:, :, -1:].clone()
                x = self.time_conv(name + ".time_conv", torch.cat([cache[i][:, :, -1:], x], 2), 0, stride_t=2)
                cache[i] = cache_x
                idx[0] += 1
        return x

    # -- networks ----------------------------------------------------------------------------------------------
    def encoder(self, x: torch.Tensor, cache: List, idx: List[int]) -> torch.Tensor:
        x = self.cached("encoder.conv1", x, cache, idx)
        j = 0
        for i in range(len(self.dim_mult)):
            for _ in range(self.nrb):
                x = self.residual(f"encoder.downsamples.{j}", x, cache, idx)
                j += 1
            if i != len(self.dim_mult) - 1:
                mode = "downsample3d" if self.tdown[i] else "downsample2d"
                x = self.resample(f"encoder.downsamples.{j}", x, mode, cache, idx)
                j += 1
        x = self.residual("encoder.middle.0", x, cache, idx)
        x = self.attention("encoder.middle.1", x)
        x = self.residual("encoder.middle.2", x, cache, idx)
        x = F.silu(self.rms("encoder.head.0", x))
        return self.cached("encoder.head.2", x, cache, idx)

    def decoder(self, x: torch.Tensor, cache: List, idx: List[int]) -> torch.Tensor:
        x = self.cached("decoder.conv1", x, cache, idx)
        x = self.residual("decoder.middle.0", x, cache, idx)
        x = self.attention("decoder.middle.1", x)
        x = self.residual("decoder.middle.2", x, cache, idx)
        j = 0
        for i in range(len(self.dim_mult)):
            for _ in range(self.nrb + 1):
                x = self.residual(f"decoder.upsamples.{j}", x, cache, idx)
                j += 1
            if i != len(self.dim_mult) - 1:
                mode = "upsample3d" if self.tup[i] else "upsample2d"
                x = self.resample(f"decoder.upsamples.{j}", x, mode, cache, idx)
                j += 1
        x = F.silu(self.rms("decoder.head.0", x))
        return self.cached("decoder.head.2", x, cache, idx)

    def _num_convs(self, prefix: str) -> int:
        # count_conv3d: every CausalConv3d of the encoder / decoder (3-D weights), shortcuts and time convs included
        return sum(1 for k, v in self.sd.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 5)

    # -- WanVAE_.encode / decode with the WanVAE wrapper's scale ---------------------------------------------------
    def encode(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """x [B, 3, T, H, W] -> normalised posterior mean [B, z, 1 + (T-1)//4, H/8, W/8]."""
        cache: List = [None] * self._num_convs("encoder.")
        t = x.shape[2]
        outs = []
        for i in range(1 + (t - 1) // 4):
            idx = [0]
            chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1):1 + 4 * i]
            outs.append(self.encoder(chunk, cache, idx))
        out = torch.cat(outs, 2)
        mu, _ = F.conv3d(out, self.sd["conv1.weight"], self.sd["conv1.bias"]).chunk(2, dim=1)
        scale = [mean, 1.0 / std]
        return (mu - scale[0].view(1, -1, 1, 1, 1)) * scale[1].view(1, -1, 1, 1, 1)

    def decode(self, z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """z [B, z, F, h, w] normalised -> video [B, 3, 1 + 4 (F - 1), 8h, 8w], clamped to [-1, 1]."""
        scale = [mean, 1.0 / std]
        z = z / scale[1].view(1, -1, 1, 1, 1) + scale[0].view(1, -1, 1, 1, 1)
        cache: List = [None] * self._num_convs("decoder.")
        x = F.conv3d(z, self.sd["conv2.weight"], self.sd["conv2.bias"])
        outs = []
        for i in range(z.shape[2]):
            idx = [0]
            outs.append(self.decoder(x[:, :, i:i + 1], cache, idx))
        return torch.cat(outs, 2).float().clamp_(-1, 1)
