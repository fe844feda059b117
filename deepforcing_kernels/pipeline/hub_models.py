"""The two components of a Hub folder that are this package's own, in diffusers' saved form.

* :class:`CausalWanTransformer` -- the causal Wan DiT (:class:`~deepforcing_kernels.models.CausalWanModel`, the
  very same class: this one only adds diffusers' ``ModelMixin`` / ``ConfigMixin``), so ``transformer/`` holds
  ``config.json`` (the :class:`~deepforcing_kernels.models.WanConfig` fields) and
  ``diffusion_pytorch_model.safetensors`` with the **original Wan2.1 parameter names** (``patch_embedding.weight``,
  ``blocks.0.self_attn.q.weight``, ...): the file is also a checkpoint that
  :func:`~deepforcing_kernels.models.checkpoints.load_checkpoint` and Self-Forcing-style loaders read as is.
* :class:`SelfForcingScheduler` -- the few-step sampler's settings (``scheduler/scheduler_config.json``):
  the denoising steps before the warp and the warp's shift. The sampler itself is
  :mod:`deepforcing_kernels.sampler`; this object only carries its settings, as a diffusers scheduler would.

Importing this module imports diffusers (the ``video`` extra); ``import deepforcing_kernels`` does not.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from ..models import CausalWanModel, WanConfig
from ..sampler import DENOISING_STEPS, SHIFT, warp_timesteps
from ..video._deps import require

_diffusers = require("diffusers", "DeepForcingPipeline")
# diffusers' loader resolves a component's loading method from these names in the component's own module
ConfigMixin = _diffusers.ConfigMixin
ModelMixin = _diffusers.ModelMixin
SchedulerMixin = _diffusers.SchedulerMixin
register_to_config = _diffusers.configuration_utils.register_to_config

__all__ = ["CausalWanTransformer", "SelfForcingScheduler"]


class CausalWanTransformer(ModelMixin, CausalWanModel, ConfigMixin):
    """The causal Wan DiT as a diffusers model: ``from_pretrained`` / ``save_pretrained`` of ``transformer/``.

    The arguments are :class:`~deepforcing_kernels.models.WanConfig`'s fields. ``self.config`` is diffusers'
    config dict; ``self.wan_config`` the :class:`WanConfig` every method of the model reads. Everything else
    (forward, ``prepare_text``, ``cache_spec``, ...) is :class:`CausalWanModel`'s.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False
    # the MRO runs ModelMixin -> CausalWanModel -> nn.Module -> ConfigMixin (so attribute lookups reach
    # nn.Module before ConfigMixin's __getattr__); ``config`` must still be diffusers' dict
    config = ConfigMixin.config

    @register_to_config
    def __init__(self, dim: int = 1536, ffn_dim: int = 8960, num_heads: int = 12, num_layers: int = 30,
                 text_dim: int = 4096, in_dim: int = 16, out_dim: int = 16, freq_dim: int = 256,
                 patch_size: Sequence[int] = (1, 2, 2), eps: float = 1e-6, text_len: Optional[int] = 512,
                 latent_size: Sequence[int] = (60, 104), rope_theta: float = 10000.0) -> None:
        # CausalWanModel.__init__ runs nn.Module.__init__ (next in this class's MRO); ModelMixin.__init__ would
        # call it without the config, so its one attribute is set here instead
        CausalWanModel.__init__(self, WanConfig(
            dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, text_dim=text_dim, in_dim=in_dim,
            out_dim=out_dim, freq_dim=freq_dim, patch_size=tuple(patch_size), eps=float(eps), text_len=text_len,
            latent_size=tuple(latent_size), rope_theta=float(rope_theta)))
        self._gradient_checkpointing_func = None

    @classmethod
    def from_wan(cls, model: CausalWanModel) -> "CausalWanTransformer":
        """A copy of ``model`` (same sizes, weights, dtype and device) as this class."""
        if not isinstance(model, CausalWanModel):
            raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
        if isinstance(model, cls):
            return model
        p = next(model.parameters())
        with torch.device("meta"):  # no second random initialisation; the weights are assigned below
            out = cls(**model.wan_config.to_dict())
        out.load_state_dict(model.state_dict(), strict=True, assign=True)
        out.rope = model.rope
        # nn.Module.to: ModelMixin.to warns about float32-kept modules even when (as here) there are none
        return torch.nn.Module.to(out, device=p.device, dtype=p.dtype).eval()


class SelfForcingScheduler(SchedulerMixin, ConfigMixin):
    """The Self-Forcing few-step sampler's settings, saved as ``scheduler/scheduler_config.json``.

    Args:
        denoising_steps: timesteps before the warp (Self-Forcing: ``[1000, 750, 500, 250]``).
        shift: the flow-matching warp's shift (5.0).
        first_block_steps: the first generated block's own timesteps (Causal Forcing++: ``[1000, 750, 500,
            250]`` before 1- or 2-step blocks), or None.

    ``timesteps`` are the warped steps each block is denoised at (:func:`~deepforcing_kernels.sampler.
    warp_timesteps`); a clean pass at ``t = 0`` follows them. The per-block loop is
    :func:`~deepforcing_kernels.sampler.denoise_block`, run by the driver.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, denoising_steps: Sequence[float] = DENOISING_STEPS, shift: float = SHIFT,
                 first_block_steps: Optional[Sequence[float]] = None) -> None:
        steps = [float(t) for t in denoising_steps]
        self.timesteps: List[float] = warp_timesteps(steps, float(shift))  # validates both
        if first_block_steps is not None:
            warp_timesteps([float(t) for t in first_block_steps], float(shift))

    @property
    def sampler_kwargs(self) -> dict:
        """``denoising_steps``, ``shift`` and ``first_block_steps`` as :func:`~deepforcing_kernels.driver.generate`
        takes them (a config saved before ``first_block_steps`` existed reads as None)."""
        first = getattr(self.config, "first_block_steps", None)
        return {"denoising_steps": tuple(float(t) for t in self.config.denoising_steps),
                "shift": float(self.config.shift),
                "first_block_steps": None if first is None else tuple(float(t) for t in first)}


def wan_config_of(transformer: Any) -> WanConfig:
    """The :class:`WanConfig` of a DiT component."""
    cfg = getattr(transformer, "wan_config", None)
    if not isinstance(cfg, WanConfig):
        raise TypeError(f"the transformer must be a CausalWanModel, got {type(transformer).__name__}")
    return cfg
