"""The "compression" section of ``deepforcing bench``: one Participative Compression step against one block's attention.

A compression step (docs/spec.md section 3) at one layer is: score every candidate token, pick the Top-C among the
eligible ones (reuse cap), and gather K, V (and the per-token bookkeeping) into the compressed cache. It runs
once per layer on the first pass of every other block. The number that matters is its cost relative to the
attention the same layer does on that pass: the target is <= 5 %.

The step is timed at the real head geometry (12 heads, D 128) for several tokens-per-frame values, because the
two costs scale differently: the step is linear in the cache length, attention is quadratic (block x cache). A
ratio measured at 16 tokens per frame therefore overstates what production (1560 tokens per frame) pays.

Two scorers, matching ``CachePolicy.deep_forcing(score=...)``:

* ``"logits"`` (the release; :func:`~deepforcing_kernels.cache.release_logit_score`): ``q_sum = sum of the
  recent-query buffer``, ``score[j] = sum_h q_sum[h] . K[j, h]``;
* ``"mass"`` (this package): the fused kernel already returned the attention mass of every key, so the score is
  the carried previous-pass mass plus this pass's mass: one add. The attention it is compared with then
  includes ``return_mass=True``, which is where mass mode pays.

The step timed is the engine's own: the scorer it uses and :func:`~deepforcing_kernels.cache.compress_step` on a
:class:`~deepforcing_kernels.cache.storage.LayerStorage`, so the figure is the shipped code's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..attention import sink_attention
from ..cache import compress_step, release_logit_score
from ..cache.storage import LayerStorage
from ..rope import RopeSpec
from .timing import interleaved, median

HEADS, HEAD_DIM = 12, 128


@dataclass(frozen=True)
class CompressionGeometry:
    """Deep Forcing defaults (docs/spec.md section 3): W 21, block 3, sink 10, budget 16, recent 4, reuse cap 7."""

    window_frames: int = 21
    block_frames: int = 3
    sink_frames: int = 10
    budget_frames: int = 16
    recent_frames: int = 4
    topc_max_reuse: int = 7

    @property
    def topc_frames(self) -> int:
        return self.budget_frames - self.sink_frames - self.recent_frames

    @property
    def aug_frames(self) -> int:
        """Frames in the augmented cache at a trigger: the compressed budget + one block + one more block
        appended in between (16 + 3 + 3 = 22 with the defaults: the first append past W)."""
        return self.budget_frames + 2 * self.block_frames


def _case_fns(tpf: int, dtype: torch.dtype, mode: str, geo: CompressionGeometry, backend: str, seed: int
              ) -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(seed)
    T = geo.aug_frames * tpf
    lq = geo.block_frames * tpf
    S_tok, R_tok, C_tok = geo.sink_frames * tpf, geo.recent_frames * tpf, geo.topc_frames * tpf
    k = torch.randn(1, T, HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(1, T, HEADS, HEAD_DIM, generator=g).to(dtype)
    q = torch.randn(1, lq, HEADS, HEAD_DIM, generator=g).to(dtype)
    qsums = torch.randn(1, geo.recent_frames, HEADS, HEAD_DIM, generator=g)  # the engine keeps per-frame sums
    prev_mass = torch.rand(1, T, generator=g)
    cur_mass = torch.rand(1, HEADS, T, generator=g)
    reuse = torch.randint(0, geo.topc_max_reuse + 2, (1, T), generator=g, dtype=torch.int32)
    rope = RopeSpec.wan(HEAD_DIM)
    extra = {"reuse": torch.int32, **({"mass": torch.float32} if mode == "mass" else {})}
    st = LayerStorage(batch=1, kv_heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=tpf,
                      capacity_frames=geo.aug_frames, dtype=dtype, device=torch.device("cpu"), extra=extra,
                      scratch=torch.empty(1, C_tok, HEADS, HEAD_DIM, dtype=dtype))

    def refill():
        # the compaction is in place: each repeat starts from the same augmented cache (timed on its own and
        # subtracted, so the figure is the step alone)
        st.k.copy_(k)
        st.v.copy_(v)
        st.extra["reuse"].copy_(reuse)
        if mode == "mass":
            st.extra["mass"].copy_(prev_mass)

    def engine_step():
        refill()
        if mode == "logits":
            sc = release_logit_score(qsums, st.k[:, :T])
        else:
            sc = st.extra["mass"][:, :T] + cur_mass.sum(dim=1)
        compress_step(st, sc[:, S_tok:T - R_tok], sink_tokens=S_tok, topc_tokens=C_tok, recent_tokens=R_tok,
                      end=T, max_reuse=geo.topc_max_reuse)

    fns: Dict[str, Callable[[], object]] = {"engine": engine_step, "refill": refill}

    # the attention of the pass that triggers the compression, at one layer: logits mode compresses first and
    # attends to the compressed cache; mass mode attends to the augmented cache, asking for the mass
    L = T if mode == "mass" else geo.budget_frames * tpf
    kk, vv = k[:, :L].clone(), v[:, :L].clone()
    attn_kw = dict(rope=rope, sink_len=S_tok, sink_shift=5, backend=backend, return_mass=(mode == "mass"))
    fns["attention"] = lambda: sink_attention(q, kk, vv, **attn_kw)
    return fns


def run_compression(tokens_per_frame: Sequence[int] = (16, 64, 256), *, dtype: torch.dtype = torch.bfloat16,
                    modes: Sequence[str] = ("logits", "mass"), repeats: int = 7, backend: str = "auto",
                    geo: CompressionGeometry = CompressionGeometry(), seed: int = 0,
                    log: Optional[Callable[[str], None]] = None) -> dict:
    """Time the compression step against the triggering pass's attention at one layer.

    Returns ``{"geometry": {...}, "dtype", "backend", "cases": [{"mode", "tokens_per_frame", "aug_tokens",
    "compress_s", "attention_s", "ratio"}...], "worst_ratio", "ratio_at_largest_T"}``; ``ratio`` is
    compress / attention (medians of interleaved samples), compared with the 5 % target.
    """
    cases: List[dict] = []
    for tpf in tokens_per_frame:
        for mode in modes:
            fns = _case_fns(tpf, dtype, mode, geo, backend, seed)
            s = interleaved(fns, repeats=repeats, warmup=1)
            a = median(s["attention"])
            c = max(0.0, median(s["engine"]) - median(s["refill"]))  # the step alone, the refill taken out
            case = {"mode": mode, "tokens_per_frame": tpf, "aug_tokens": geo.aug_frames * tpf, "attention_s": a,
                    "compress_s": c, "ratio": c / a}
            cases.append(case)
            if log:
                log(f"  compression {mode:<6} T={tpf:<4}: step {c * 1e3:8.3f} ms, attention {a * 1e3:8.2f} ms, "
                    f"ratio {100 * c / a:6.2f} %")
    largest = max(tokens_per_frame)
    return {
        "geometry": {**geo.__dict__, "heads": HEADS, "head_dim": HEAD_DIM, "aug_frames": geo.aug_frames},
        "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "implementation": "engine (its scorer + cache.compress_step)",
        "cases": cases,
        "worst_ratio": max(c["ratio"] for c in cases),
        "ratio_at_largest_T": {c["mode"]: c["ratio"] for c in cases if c["tokens_per_frame"] == largest},
        "target_ratio": 0.05,
    }
