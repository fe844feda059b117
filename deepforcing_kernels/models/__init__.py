"""Models that drive the streaming cache: the :class:`CausalVideoModel` seam (:mod:`.base`) and a compact,
faithful Wan2.1 causal DiT (:mod:`.wan`), and :func:`build_model` (:mod:`.build`) for a named one."""
from .base import CacheSpec, CausalVideoModel, build_cache, check_model
from .build import build_model, random_text_embeds
from .checkpoints import load_wan_state_dict
from .wan import CausalWanModel, WanConfig, unpatchify

__all__ = ["CausalVideoModel", "CacheSpec", "build_cache", "check_model", "WanConfig", "CausalWanModel",
           "load_wan_state_dict", "unpatchify", "build_model", "random_text_embeds"]
