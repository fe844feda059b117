"""Building a named model: what the command line, the demo and the benchmarks construct, in one place."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from .checkpoints import load_wan_state_dict
from .wan import CausalWanModel, WanConfig

__all__ = ["build_model", "random_text_embeds"]


def build_model(name: str, state_dict: Optional[Mapping[str, Any]] = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> CausalWanModel:
    """The :class:`CausalWanModel` called ``name`` (:mod:`deepforcing_kernels.presets`), in eval mode.

    Args:
        name: a model name (``tiny``, ``wan_1_3b``, ``wan_14b``; aliases such as ``wan-1.3b`` accepted).
        state_dict: weights for :func:`load_wan_state_dict` (a Self-Forcing checkpoint's prefixes and containers
            are stripped); None initialises the weights randomly from ``seed`` (a stand-in for tests and timing).
        seed: the random initialisation's seed (unused with ``state_dict``).
        dtype, device: where the model is put.

    Raises:
        ValueError for an unknown name or weights that do not fit the model.
    """
    model = CausalWanModel(WanConfig.from_name(name))
    if state_dict is not None:
        load_wan_state_dict(model, state_dict)
    else:
        model.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return model.to(device=device, dtype=dtype).eval()


def random_text_embeds(config: WanConfig, seed: int) -> torch.Tensor:
    """Stand-in text embeddings ``[1, text_len, text_dim]`` drawn from ``seed`` (16 rows when text_len is None),
    from a generator of their own (``seed + 1``), not the model's stream."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, config.text_len or 16, config.text_dim, generator=g)
