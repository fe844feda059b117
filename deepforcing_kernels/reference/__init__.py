"""The pure-PyTorch reference: the single source of truth for what every backend computes."""
from .attention import effective_keys, key_shifts, release_logit_score, sink_attention_reference
from .rope import apply_rope, rephase, rotate_pairs

__all__ = ["apply_rope", "rephase", "rotate_pairs", "sink_attention_reference", "release_logit_score",
           "effective_keys", "key_shifts"]
