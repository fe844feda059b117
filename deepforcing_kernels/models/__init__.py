"""Models that drive the streaming cache: a compact, faithful Wan2.1 causal DiT (:mod:`.wan`)."""
from .wan import CausalWanModel, WanConfig, load_wan_state_dict, unpatchify

__all__ = ["WanConfig", "CausalWanModel", "load_wan_state_dict", "unpatchify"]
