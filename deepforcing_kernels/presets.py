"""The one home of the package's name tables: cache policies, models, sampling recipes, attention backends and
dtypes.

Everything that lists or parses one of these names (the command line, the benchmarks, the demo, the pipeline, the
cache, the backend registry, the Triton tools) reads it here; no other module spells a table out.

Names are spelled with underscores (``deep_forcing``); the hyphenated spelling (``deep-forcing``) is accepted
everywhere as an alias. ``deep_forcing`` scores Top-C by attention mass (this package's default) and
``deep_forcing_logits`` is the release's logit score.

Importing this module imports nothing (no torch, no package module), so ``deepforcing --help`` can list every
table. :func:`make_policy` and :func:`torch_dtype` import what they build on demand.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["POLICY_NAMES", "COMMIT_RULE_SUFFIX", "split_commit_rule", "BENCH_BASELINE_NAMES", "MODEL_NAMES", "RECIPE_NAMES", "canonical_recipe_name", "recipe",
           "recipe_help", "BACKEND_NAMES", "BACKEND_PRIORITY", "DTYPE_NAMES", "canonical_policy_name",
           "make_policy", "policy_help", "canonical_model_name", "model_constructor", "model_help",
           "canonical_dtype_name", "torch_dtype", "dtype_name"]

# ---------------------------------------------------------------------------------------------- policies
#: policy name -> (CachePolicy constructor name, fixed keywords, one-line description)
_POLICIES: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "full": ("full", {}, "keep every frame (grows without bound)"),
    "sliding": ("sliding", {}, "last 21 frames (Self-Forcing)"),
    "frame_sink": ("frame_sink", {}, "first 3 frames + FIFO, absolute RoPE (LongLive / StreamingLLM)"),
    "deep_sink": ("deep_sink", {}, "first 14 frames re-phased + FIFO (Deep Sink)"),
    "deep_forcing": ("deep_forcing", {"score": "mass"}, "sink 10 + Top-C by attention mass + recent 4"),
    "deep_forcing_logits": ("deep_forcing", {"score": "logits"},
                            "sink 10 + Top-C by the release's logit score + recent 4"),
    # the field's other training-free methods, as their authors run them (docs/methods.md)
    "rolling_sink": ("rolling_sink", {}, "FIFO 21 frames of 1560 tokens; a tape of frames 0..17 replayed at the "
                     "older slots' positions (Rolling Sink)"),
    "memrope": ("memrope", {}, "window 12: sink 3 + EMA memories of the evicted frames (alpha 0.01, 0.1) + recent "
                "4, at contiguous positions (MemRoPE)"),
    "infinity_rope": ("infinity_rope", {}, "sink 1 + newest 5 frames, block-relativistic RoPE; a prompt switch keeps "
                      "sink + 2 (kv_flush), a scene cut moves the block to position 45 (Infinity-RoPE)"),
    "tethercache": ("tethercache", {}, "window 21: sink 3 + memory 14 admitted at the clean pass by GRAB (mean logit "
                    "+ 0.35 x diversity), AdaIN-edited by TAME (tau 0.35) + recent 4, contiguous positions (TetherCache)"),
    "recency_forcing": ("recency_forcing", {}, "sink 3 re-phased right behind the newest 18 frames; the denoising "
                        "passes add a temporal recency bias -4 dt^gamma(step) to history chunks' logits, fused in the "
                        "attention call (Recency Forcing, training-free)"),
}
POLICY_NAMES: Tuple[str, ...] = tuple(_POLICIES)
#: a benchmark row ``NAME+commit`` is the policy NAME with the commit rule on (``commit_rule=True``, docs/methods.md)
COMMIT_RULE_SUFFIX = "+commit"
#: benchmark rows that are not cache policies: ``release`` is the authors' data movement on the
#: ``deep_forcing_logits`` schedule (:class:`deepforcing_kernels.bench.rollout.ReleaseCache`), cache rollout only
BENCH_BASELINE_NAMES: Tuple[str, ...] = ("release",)


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


def split_commit_rule(name: str) -> Tuple[str, bool]:
    """``"rolling_sink+commit"`` -> ``("rolling_sink", True)``; a name without :data:`COMMIT_RULE_SUFFIX` -> ``(name,
    False)`` (a benchmark row's name: the policy, and whether the commit rule is on)."""
    if isinstance(name, str) and name.endswith(COMMIT_RULE_SUFFIX):
        return name[:-len(COMMIT_RULE_SUFFIX)], True
    return name, False


def make_policy(name: str, *, score: Optional[str] = None, head_jitter: float = 0.0, head_jitter_seed: int = 0,
                **overrides: Any):
    """The :class:`~deepforcing_kernels.CachePolicy` called ``name`` (defaults of docs/spec.md sections 2-4).

    ``score`` ("mass" / "logits") may be given for ``deep_forcing``; ``deep_forcing_logits`` takes only
    "logits" (its own score); any other policy takes none. ``head_jitter`` (strength in ``[0, 2)``, 0 = off) and
    ``head_jitter_seed``: LoL's multi-head RoPE jitter, on any policy (the cache built for it carries the jittered
    RoPE, which the model rotates its queries and keys with; docs/methods.md, "Head jitter"). ``overrides`` go to
    the constructor (``window_frames=...``, ``block_frames=...``; ``full`` has no window and ignores
    ``window_frames``). ValueError starting with ``score`` / ``head_jitter`` for a value the policy cannot take
    (the CLI prefixes ``--``).
    """
    from .policy import CachePolicy

    key = canonical_policy_name(name)
    ctor, fixed, _ = _POLICIES[key]
    kw = dict(fixed)
    if score is not None:
        if "score" not in fixed:
            raise ValueError(f"score applies to the deep_forcing policy only, not {key!r}")
        if score != fixed["score"] and key != "deep_forcing":
            raise ValueError(f"score {score!r} does not apply to {key!r}, which scores by {fixed['score']}; use "
                             "deep_forcing")
        kw["score"] = score
    if ctor == "full":
        overrides.pop("window_frames", None)
    kw.update(overrides)
    policy = getattr(CachePolicy, ctor)(**kw)
    return policy.with_head_jitter(head_jitter, head_jitter_seed) if head_jitter or head_jitter_seed else policy


def policy_help() -> str:
    """``name: description`` lines for --help texts."""
    return "; ".join(f"{n}: {d}" for n, (_, _, d) in _POLICIES.items())


# ---------------------------------------------------------------------------------------------- models
#: model name -> (WanConfig constructor name, one-line description)
_MODELS: Dict[str, Tuple[str, str]] = {
    "tiny": ("tiny", "a CPU-test-sized random Wan DiT (2 layers, dim 96)"),
    "wan_1_3b": ("wan_1_3b", "Wan2.1-T2V-1.3B (Self-Forcing, Deep Forcing, LongLive, Causal / Rolling Forcing)"),
    "wan_14b": ("wan_14b", "Wan2.1-T2V-14B sizes (Krea Realtime 14B)"),
}
MODEL_NAMES: Tuple[str, ...] = tuple(_MODELS)
_MODEL_ALIASES = {"wan-1.3b": "wan_1_3b", "wan_1.3b": "wan_1_3b", "wan2.1-1.3b": "wan_1_3b", "wan-1-3b": "wan_1_3b",
                  "wan-14b": "wan_14b", "wan2.1-14b": "wan_14b"}


def canonical_model_name(name: str) -> str:
    """``"wan-1.3b"`` -> ``"wan_1_3b"``; ValueError listing the names for an unknown one."""
    key = _key(name, "model")
    key = _MODEL_ALIASES.get(name.strip().lower(), _MODEL_ALIASES.get(key, key))
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return key


def model_constructor(name: str) -> str:
    """The :class:`~deepforcing_kernels.models.WanConfig` classmethod that builds the model called ``name``
    (:meth:`WanConfig.from_name <deepforcing_kernels.models.WanConfig.from_name>` calls it)."""
    return _MODELS[canonical_model_name(name)][0]


def model_help() -> str:
    """``name: description`` lines for --help texts."""
    return "; ".join(f"{n}: {d}" for n, (_, d) in _MODELS.items())


# ---------------------------------------------------------------------------------------------- recipes
#: how a base model's checkpoint is sampled: recipe name -> (latent frames per block, denoising steps before the
#: warp, the first generated block's own steps or None, which weights of a training checkpoint (True:
#: ``generator_ema``, False: ``generator``, None: ``generator`` when present), one-line description). Values are
#: the authors' inference configs (docs/methods.md, "Causal Forcing").
_RECIPES: Dict[str, Tuple[int, Tuple[float, ...], Optional[Tuple[float, ...]], Optional[bool], str]] = {
    "self_forcing": (3, (1000.0, 750.0, 500.0, 250.0), None, None,
                     "chunk-wise, 3 latent frames a block, 4 steps (Self-Forcing and the models built on it)"),
    "causal_forcing_chunkwise": (3, (1000.0, 750.0, 500.0, 250.0), None, False,
                                 "Causal Forcing chunk-wise: 3 frames a block, 4 steps, the generator (no EMA)"),
    "causal_forcing_framewise": (1, (1000.0, 750.0, 500.0, 250.0), None, True,
                                 "Causal Forcing frame-wise: 1 frame a block, 4 steps, EMA weights"),
    "causal_forcing_pp_2step": (1, (1000.0, 500.0), (1000.0, 750.0, 500.0, 250.0), True,
                                "Causal Forcing++ frame-wise 2-step (the first block 4 steps), EMA weights"),
    "causal_forcing_pp_1step": (1, (1000.0,), (1000.0, 750.0, 500.0, 250.0), True,
                                "Causal Forcing++ frame-wise 1-step (the first block 4 steps), EMA weights"),
}
RECIPE_NAMES: Tuple[str, ...] = tuple(_RECIPES)


def canonical_recipe_name(name: str) -> str:
    """``"causal-forcing-pp-2step"`` / ``"causal_forcing++_2step"`` -> ``"causal_forcing_pp_2step"``; ValueError
    listing the names for an unknown one."""
    key = _key(name, "recipe").replace("++", "_pp")
    if key not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPE_NAMES)}")
    return key


def recipe(name: str) -> Dict[str, Any]:
    """The sampling recipe called ``name``: ``{"block_frames", "denoising_steps", "first_block_steps",
    "use_ema"}`` (keywords of :func:`make_policy`, :func:`deepforcing_kernels.generate` and
    :func:`deepforcing_kernels.models.load_checkpoint`)."""
    frames, steps, first, ema, _ = _RECIPES[canonical_recipe_name(name)]
    return {"block_frames": frames, "denoising_steps": list(steps),
            "first_block_steps": None if first is None else list(first), "use_ema": ema}


def recipe_help() -> str:
    """``name: description`` lines for --help texts."""
    return "; ".join(f"{n}: {d}" for n, (*_, d) in _RECIPES.items())


# ---------------------------------------------------------------------------------------------- backends
#: the fused op's backends, ``"auto"`` first; :data:`BACKEND_PRIORITY` is the order ``"auto"`` tries them in
BACKEND_NAMES: Tuple[str, ...] = ("auto", "triton", "cpp", "reference")
BACKEND_PRIORITY: Tuple[str, ...] = ("triton", "cpp", "reference")

# ---------------------------------------------------------------------------------------------- dtypes
#: the floating dtypes the op, the cache and the models take, by torch's attribute name
DTYPE_NAMES: Tuple[str, ...] = ("float32", "bfloat16", "float16")
#: short spellings (the Triton tools' and kernel tables' ``fp32`` / ``bf16`` / ``fp16``)
_DTYPE_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DTYPE_ALIASES = {"float": "float32", "half": "float16", **_DTYPE_SHORT}


def canonical_dtype_name(name: str) -> str:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``"bfloat16"``; ValueError for another dtype."""
    key = _key(name, "dtype").replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return key


def torch_dtype(name: str):
    """The ``torch.dtype`` called ``name`` (any spelling :func:`canonical_dtype_name` takes)."""
    import torch

    return getattr(torch, canonical_dtype_name(name))


def dtype_name(dtype: Any, *, short: bool = False) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (``"bf16"`` with ``short``); ValueError for a dtype not in the table."""
    name = canonical_dtype_name(str(dtype))
    if short:
        return next(s for s, full in _DTYPE_SHORT.items() if full == name)
    return name
