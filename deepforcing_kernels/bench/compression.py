"""The "compression" section of ``deepforcing bench``: one Participative Compression step against one block's attention.

A compression step (SPEC section 3) at one layer is: score every candidate token, pick the Top-C among the
eligible ones (reuse cap), and gather K, V (and the per-token bookkeeping) into the compressed cache. It runs
once per layer on the first pass of every other block. The number that matters is its cost relative to the
attention the same layer does on that pass: the target is <= 5 %.

The step is timed at the real head geometry (12 heads, D 128) for several tokens-per-frame values, because the
two costs scale differently: the step is linear in the cache length, attention is quadratic (block x cache). A
ratio measured at 16 tokens per frame therefore overstates what production (1560 tokens per frame) pays.

Two scorers, matching ``CachePolicy.deep_forcing(score=...)``:

* ``"logits"`` (the release; :func:`logit_score`): ``q_sum = sum of the recent-query buffer``, ``score[j] = sum_h q_sum[h] . K[j, h]``;
* ``"mass"`` (this package): the fused kernel already returned the attention mass of every key, so the score is
  the carried previous-pass mass plus this pass's mass: one add. The attention it is compared with then
  includes ``return_mass=True``, which is where mass mode pays.

When the cache engine exposes its own compression routine, :func:`engine_compress_fn` times that instead of the
stand-in below, so the figure is the shipped code's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import sink_attention
from ..rope import RopeSpec
from .timing import interleaved, median

HEADS, HEAD_DIM = 12, 128


@dataclass(frozen=True)
class CompressionGeometry:
    """Deep Forcing defaults (SPEC section 3): W 21, block 3, sink 10, budget 16, recent 4, reuse cap 7."""

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


def compress_step(k_aug: torch.Tensor, v_aug: torch.Tensor, score: torch.Tensor, reuse: torch.Tensor, *,
                  sink_tok: int, recent_tok: int, topc_tok: int, max_reuse: Optional[int]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-C selection and compaction, as SPEC section 3 describes it (per batch element, slot order kept), done
    the cheap way: in place, moving only what changes.

    The sink stays where it is; the ``topc_tok`` chosen tokens are copied out with ``index_select`` (one per batch
    element: ``torch.gather`` with an expanded 4-D index is one to two orders of magnitude slower on CPU) and
    written right after the sink; the last ``recent_tok`` slots move down behind them. So the step copies
    C + R tokens of K and V, not the whole cache.

    Args:
        k_aug, v_aug: ``[B, T, H, D]`` augmented cache, compacted in place into its first
            ``sink_tok + topc_tok + recent_tok`` slots. score: float32 ``[B, T]``. reuse: int ``[B, T]`` counters,
            compacted in place too.
    Returns:
        ``(k, v, reuse)``: views of the compacted prefix.
    """
    B, T = score.shape
    S, C, R = sink_tok, topc_tok, recent_tok
    cand = score[:, S:T - R]
    if max_reuse is not None:
        # ineligible tokens go below every eligible one but keep their order, so "fill with the best-scoring
        # ineligible candidates" falls out of one top-k
        penalty = (reuse[:, S:T - R] >= max_reuse).to(cand.dtype)
        cand = cand - penalty * (cand.abs().max() * 4 + 1)
    top = torch.topk(cand, C, dim=1, sorted=False).indices
    keep = torch.sort(top, dim=1).values + S  # [B, C], slot order
    for b in range(B):
        idx = keep[b]
        for t in (k_aug, v_aug, reuse):
            picked = t[b].index_select(0, idx)  # copy out first: the recent move may overwrite candidates
            t[b, S + C:S + C + R].copy_(t[b, T - R:T].clone() if T - R < S + C + R else t[b, T - R:T])
            t[b, S:S + C].copy_(picked)
    reuse[:, S:S + C] += 1
    N = S + C + R
    return k_aug[:, :N], v_aug[:, :N], reuse[:, :N]


def logit_score(q_buffer: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The release's logit score (same maths as ``release_logit_score``) as one GEMV in the cache dtype.

    ``q_buffer`` may be the recent queries ``[B, L, Hq, D]`` or, as the engine keeps them, per-frame query sums
    ``[B, R, Hq, D]`` (the score only needs their total). ``release_logit_score`` (what the engine calls) keeps the
    summed query in float32 and upcasts the keys chunk by chunk; this stand-in shows the floor: the summed query
    is rounded to the cache dtype and one ``[T, H*D] x [H*D]`` GEMV in that dtype does the rest (float32
    accumulation inside). ``[B, T]`` float32.
    """
    B, T, Hkv, D = k.shape
    q_sum = q_buffer.float().sum(dim=1)  # [B, Hq, D]
    q_sum = q_sum.view(B, Hkv, -1, D).sum(dim=2).reshape(B, Hkv * D, 1).to(k.dtype)
    return torch.bmm(k.reshape(B, T, Hkv * D), q_sum).squeeze(-1).float()


def _engine():
    """The cache engine's compression pieces (``select_topc``, ``_compact``, ``release_logit_score`` as the
    engine calls them), or None while the engine does not provide them."""
    try:
        from .. import cache as _cache
    except Exception:  # noqa: BLE001 - the engine may not be importable yet
        return None
    if not all(callable(getattr(_cache, n, None)) for n in ("select_topc", "_compact")):
        return None
    return _cache


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
    frames = torch.arange(T)[None] // tpf
    rope = RopeSpec.wan(HEAD_DIM)
    kw = dict(sink_tok=S_tok, recent_tok=R_tok, topc_tok=C_tok, max_reuse=geo.topc_max_reuse)

    def score() -> torch.Tensor:
        if mode == "logits":
            return logit_score(qsums, mk)
        # mass of this pass summed over KV heads (the kernel gives [B, Hkv, T]) plus the carried vector
        return prev_mass + cur_mass.sum(dim=1)

    # the stand-in compacts in place too: own copies, so repeated calls keep shapes and cost
    mk, mv, mre = k.clone(), v.clone(), reuse.clone()
    fns: Dict[str, Callable[[], object]] = {"minimal": lambda: compress_step(mk, mv, score(), mre, **kw)}

    eng = _engine()
    if eng is not None:
        # exactly CacheLayer._compress (plus the logits scorer the engine calls), on buffers of our own: the
        # compaction is in place, so repeated calls keep the shapes and the cost
        ek, ev, efr, ere = k.clone(), v.clone(), frames.clone(), reuse.clone()
        scratch = torch.empty(1, C_tok, HEADS, HEAD_DIM, dtype=dtype)
        emass = prev_mass.clone()

        def engine_step():
            if mode == "logits":
                sc = eng.release_logit_score(qsums, ek[:, :T])
            else:
                sc = emass[:, :T] + cur_mass.sum(dim=1)
            idx = eng.select_topc(sc[:, S_tok:T - R_tok], ere[:, S_tok:T - R_tok], C_tok, geo.topc_max_reuse)
            idx = idx + S_tok
            for t in (ek, ev, efr, ere) + ((emass,) if mode == "mass" else ()):
                eng._compact(t, idx, S_tok, T - R_tok, S_tok + C_tok, R_tok,
                             scratch if (t is ek or t is ev) else None)
            ere[:, S_tok:S_tok + C_tok] += 1
        fns["engine"] = engine_step

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
            case = {"mode": mode, "tokens_per_frame": tpf, "aug_tokens": geo.aug_frames * tpf, "attention_s": a,
                    "minimal_s": median(s["minimal"]), "minimal_ratio": median(s["minimal"]) / a}
            # the figure judged against the target: the engine's own step when it exists
            c = median(s["engine"]) if "engine" in s else case["minimal_s"]
            case.update(compress_s=c, ratio=c / a, source="engine" if "engine" in s else "minimal")
            cases.append(case)
            if log:
                log(f"  compression {mode:<6} T={tpf:<4}: step {c * 1e3:8.3f} ms ({case['source']}), minimal "
                    f"{case['minimal_s'] * 1e3:7.3f} ms, attention {a * 1e3:8.2f} ms, ratio {100 * c / a:6.2f} %")
    largest = max(tokens_per_frame)
    return {
        "geometry": {**geo.__dict__, "heads": HEADS, "head_dim": HEAD_DIM, "aug_frames": geo.aug_frames},
        "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "implementation": "engine (cache.select_topc + cache._compact + its scorer)" if _engine() else
        "minimal stand-in (logit GEMV / mass add, top-k, index_select)",
        "cases": cases,
        "worst_ratio": max(c["ratio"] for c in cases),
        "ratio_at_largest_T": {c["mode"]: c["ratio"] for c in cases if c["tokens_per_frame"] == largest},
        "target_ratio": 0.05,
    }
