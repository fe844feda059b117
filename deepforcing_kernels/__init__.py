"""deepforcing_kernels: fast, exact kernels and a streaming KV cache for Deep Forcing.

Deep Forcing (arXiv 2512.05081) turns a Self-Forcing-style autoregressive video diffusion model into a
minute-long generator without training: a *Deep Sink* of early frames whose RoPE is re-phased to sit just behind
the live context, and *Participative Compression* that keeps the most-attended tokens of the middle.
"""
from . import ops as _ops  # noqa: F401  (defines torch.ops.deepforcing.sink_attention)
from .attention import SinkAttentionOutput, available_backends, sink_attention
from .cache import CachePolicy, StreamingKVCache, release_logit_score
from .rope import RopeSpec
from .rotation import apply_rope, rephase

__version__ = "0.1.0"

__all__ = [
    "RopeSpec", "apply_rope", "rephase", "sink_attention", "SinkAttentionOutput", "available_backends",
    "release_logit_score", "CachePolicy", "StreamingKVCache", "__version__",
]
