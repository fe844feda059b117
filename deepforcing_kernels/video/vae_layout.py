"""The original ``Wan2.1_VAE.pth`` layout: its key names mapped to diffusers' ``AutoencoderKLWan``, its names and
shapes for a configuration (derived from ``wan/modules/vae.py``), and random state dicts in it for tests."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["original_to_diffusers_key", "original_state_dict_shapes", "random_original_state_dict"]


_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_TOP = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
        "encoder.conv1.weight": "encoder.conv_in.weight", "encoder.conv1.bias": "encoder.conv_in.bias",
        "decoder.conv1.weight": "decoder.conv_in.weight", "decoder.conv1.bias": "decoder.conv_in.bias",
        "encoder.head.0.gamma": "encoder.norm_out.gamma", "encoder.head.2.weight": "encoder.conv_out.weight",
        "encoder.head.2.bias": "encoder.conv_out.bias", "decoder.head.0.gamma": "decoder.norm_out.gamma",
        "decoder.head.2.weight": "decoder.conv_out.weight", "decoder.head.2.bias": "decoder.conv_out.bias"}


def _check_config(dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int, attn_scales: Sequence[float],
                  temperal_downsample: Sequence[bool]) -> None:
    for name, v in (("dim", dim), ("z_dim", z_dim), ("num_res_blocks", num_res_blocks)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"WanVAE config {name} must be a positive int, got {v!r}")
    if len(dim_mult) != 4 or any(not isinstance(u, int) or u <= 0 for u in dim_mult):
        raise ValueError(f"WanVAE config dim_mult must be 4 positive ints (Wan2.1's 8x spatial layout), "
                         f"got {tuple(dim_mult)!r}")
    if len(temperal_downsample) != 3:
        raise ValueError(f"WanVAE config temperal_downsample must have 3 entries, got {tuple(temperal_downsample)!r}")
    if tuple(attn_scales):
        raise ValueError(f"WanVAE config attn_scales must be () as in Wan2.1, got {tuple(attn_scales)!r} "
                         "(diffusers' WanDecoder3d has no attention in its upsampling blocks)")


def original_to_diffusers_key(key: str, *, num_res_blocks: int = 2, levels: int = 4) -> Optional[str]:
    """Diffusers' name for one key of Wan2.1's original VAE state dict, or None if it is not a VAE key.

    The encoder's ``downsamples`` and diffusers' ``down_blocks`` are the same flat list; the decoder's flat
    ``upsamples`` list holds, per level, ``num_res_blocks + 1`` residual blocks then (except at the last level) one
    resampler, which diffusers groups as ``up_blocks.L.resnets.R`` and ``up_blocks.L.upsamplers.0``.
    """
    if key in _TOP:
        return _TOP[key]
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d+)\.(.+)", key)
    if m:
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if idx == 1:
            return f"{part}.mid_block.attentions.0.{rest}" if rest in (
                "norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias") else None
        if idx in (0, 2) and rest in _RESIDUAL:
            return f"{part}.mid_block.resnets.{idx // 2}.{_RESIDUAL[rest]}"
        return None
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:
        rest = m.group(2)
        rest = _RESIDUAL.get(rest, rest)
        return f"encoder.down_blocks.{m.group(1)}.{rest}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        per = num_res_blocks + 2  # residual blocks + one resampler per level (none at the last)
        level, r = divmod(j, per)
        if level >= levels or (level == levels - 1 and r > num_res_blocks):
            return None
        if r <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{r}.{_RESIDUAL[rest]}" if rest in _RESIDUAL else None
        return f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
    return None


def original_state_dict_shapes(*, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                               num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                               temperal_downsample: Sequence[bool] = (False, True, True)) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of Wan2.1's original VAE state dict for a configuration (derived from
    ``wan/modules/vae.py``: ``WanVAE_`` = ``encoder`` / ``conv1`` / ``conv2`` / ``decoder``)."""
    _check_config(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample)
    s: Dict[str, Tuple[int, ...]] = {}

    def conv3(name, cin, cout, k):
        s[name + ".weight"] = (cout, cin) + k
        s[name + ".bias"] = (cout,)

    def res(name, cin, cout):
        s[name + ".residual.0.gamma"] = (cin, 1, 1, 1)
        conv3(name + ".residual.2", cin, cout, (3, 3, 3))
        s[name + ".residual.3.gamma"] = (cout, 1, 1, 1)
        conv3(name + ".residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv3(name + ".shortcut", cin, cout, (1, 1, 1))

    def attn(name, c):
        s[name + ".norm.gamma"] = (c, 1, 1)
        conv3(name + ".to_qkv", c, 3 * c, (1, 1))
        conv3(name + ".proj", c, c, (1, 1))

    # encoder (z_dim * 2 outputs)
    dims = [dim * u for u in (1,) + tuple(dim_mult)]
    conv3("encoder.conv1", 3, dims[0], (3, 3, 3))
    j = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            res(f"encoder.downsamples.{j}", cin, cout)
            j += 1
            cin = cout
        if i != len(dim_mult) - 1:
            conv3(f"encoder.downsamples.{j}.resample.1", cout, cout, (3, 3))
            if temperal_downsample[i]:
                conv3(f"encoder.downsamples.{j}.time_conv", cout, cout, (3, 1, 1))
            j += 1
    c = dims[-1]
    res("encoder.middle.0", c, c)
    attn("encoder.middle.1", c)
    res("encoder.middle.2", c, c)
    s["encoder.head.0.gamma"] = (c, 1, 1, 1)
    conv3("encoder.head.2", c, 2 * z_dim, (3, 3, 3))
    conv3("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv3("conv2", z_dim, z_dim, (1, 1, 1))
    # decoder
    up = tuple(temperal_downsample)[::-1]
    dims = [dim * u for u in (dim_mult[-1],) + tuple(dim_mult)[::-1]]
    conv3("decoder.conv1", z_dim, dims[0], (3, 3, 3))
    res("decoder.middle.0", dims[0], dims[0])
    attn("decoder.middle.1", dims[0])
    res("decoder.middle.2", dims[0], dims[0])
    j = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            cin = cin // 2
        for _ in range(num_res_blocks + 1):
            res(f"decoder.upsamples.{j}", cin, cout)
            j += 1
            cin = cout
        if i != len(dim_mult) - 1:
            conv3(f"decoder.upsamples.{j}.resample.1", cout, cout // 2, (3, 3))
            if up[i]:
                conv3(f"decoder.upsamples.{j}.time_conv", cout, cout * 2, (3, 1, 1))
            j += 1
    s["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3("decoder.head.2", dims[-1], 3, (3, 3, 3))
    return s


def random_original_state_dict(seed: int = 0, gain: float = 1.0, **config: Any) -> Dict[str, torch.Tensor]:
    """A random state dict in Wan2.1's original VAE layout (:func:`original_state_dict_shapes`): weights
    ~ N(0, gain^2 / fan_in), biases ~ N(0, 0.05^2), RMS-norm gammas 1 + N(0, 0.1^2); seeded, float32."""
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for k, shape in original_state_dict_shapes(**config).items():
        if k.endswith(".gamma"):
            out[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            out[k] = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[k] = (gain / fan_in ** 0.5) * torch.randn(shape, generator=g)
    return out
