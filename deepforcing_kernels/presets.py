"""The one table of named policies and models, used by the command line, the benchmarks and the demo.

Names are spelled with underscores (``deep_forcing``); the hyphenated spelling (``deep-forcing``) is accepted
everywhere as an alias. ``deep_forcing`` scores Top-C by attention mass (this package's default) and
``deep_forcing_logits`` is the release's logit score.

Importing this module imports torch but no model code; :func:`model_config` imports the model on demand.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["POLICY_NAMES", "MODEL_NAMES", "canonical_policy_name", "make_policy", "canonical_model_name",
           "model_config", "policy_help"]

#: policy name -> (CachePolicy constructor name, fixed keywords, one-line description)
_POLICIES: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "full": ("full", {}, "keep every frame (grows without bound)"),
    "sliding": ("sliding", {}, "last 21 frames (Self-Forcing)"),
    "frame_sink": ("frame_sink", {}, "first 3 frames + FIFO, absolute RoPE (LongLive / StreamingLLM)"),
    "deep_sink": ("deep_sink", {}, "first 14 frames re-phased + FIFO (Deep Sink)"),
    "deep_forcing": ("deep_forcing", {"score": "mass"}, "sink 10 + Top-C by attention mass + recent 4"),
    "deep_forcing_logits": ("deep_forcing", {"score": "logits"},
                            "sink 10 + Top-C by the release's logit score + recent 4"),
}
POLICY_NAMES: Tuple[str, ...] = tuple(_POLICIES)

_MODELS: Dict[str, Tuple[str, str]] = {
    "tiny": ("tiny", "a CPU-test-sized random Wan DiT (2 layers, dim 96)"),
    "wan_1_3b": ("wan_1_3b", "Wan2.1-T2V-1.3B (Self-Forcing, Deep Forcing, LongLive, Causal / Rolling Forcing)"),
    "wan_14b": ("wan_14b", "Wan2.1-T2V-14B sizes (Krea Realtime 14B)"),
}
MODEL_NAMES: Tuple[str, ...] = tuple(_MODELS)
_MODEL_ALIASES = {"wan-1.3b": "wan_1_3b", "wan_1.3b": "wan_1_3b", "wan2.1-1.3b": "wan_1_3b", "wan-1-3b": "wan_1_3b",
                  "wan-14b": "wan_14b", "wan2.1-14b": "wan_14b"}


def _key(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


def canonical_policy_name(name: str) -> str:
    """``"deep-forcing"`` -> ``"deep_forcing"``; ValueError listing the names for an unknown one."""
    key = _key(name, "policy")
    if key not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    return key


def make_policy(name: str, *, score: Optional[str] = None, **overrides: Any):
    """The :class:`~deepforcing_kernels.CachePolicy` called ``name`` (defaults of SPEC sections 2-4).

    ``score`` ("mass" / "logits") may be given for ``deep_forcing`` (``deep_forcing_logits`` fixes it to
    "logits"); ``overrides`` go to the constructor (``window_frames=...``, ``block_frames=...``).
    """
    from .policy import CachePolicy

    key = canonical_policy_name(name)
    ctor, fixed, _ = _POLICIES[key]
    kw = dict(fixed)
    if score is not None:
        if ctor != "deep_forcing":
            raise ValueError(f"score applies to deep_forcing only, not to {key!r}")
        if "score" in fixed and key == "deep_forcing_logits" and score != "logits":
            raise ValueError(f"{key!r} scores by logits; use deep_forcing for score={score!r}")
        kw["score"] = score
    if ctor == "full":
        overrides.pop("window_frames", None)  # full has no window
    kw.update(overrides)
    return getattr(CachePolicy, ctor)(**kw)


def policy_help() -> str:
    """``name: description`` lines for --help texts."""
    return "; ".join(f"{n}: {d}" for n, (_, _, d) in _POLICIES.items())


def canonical_model_name(name: str) -> str:
    """``"wan-1.3b"`` -> ``"wan_1_3b"``; ValueError listing the names for an unknown one."""
    key = _key(name, "model")
    key = _MODEL_ALIASES.get(name.strip().lower(), _MODEL_ALIASES.get(key, key))
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return key


def model_config(name: str, **overrides: Any):
    """The :class:`~deepforcing_kernels.models.WanConfig` called ``name`` (``tiny``, ``wan_1_3b``, ``wan_14b``)."""
    from .models.wan import WanConfig

    ctor: Callable[..., Any] = getattr(WanConfig, _MODELS[canonical_model_name(name)][0])
    return ctor(**overrides)
