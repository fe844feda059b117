"""Models that drive the streaming cache: the :class:`CausalVideoModel` seam (:mod:`.base`) and a compact,
faithful Wan2.1 causal DiT (:mod:`.wan`)."""
from .base import CacheSpec, CausalVideoModel, build_cache, check_model
from .wan import CausalWanModel, WanConfig, load_wan_state_dict, unpatchify

__all__ = ["CausalVideoModel", "CacheSpec", "build_cache", "check_model", "WanConfig", "CausalWanModel",
           "load_wan_state_dict", "unpatchify"]
