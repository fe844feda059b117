"""The "rollout" section of ``deepforcing bench``: whole streams, one per cache policy, block by block.

Two rollouts per policy:

* **cache + attention path** at the real layer geometry (30 layers, 12 heads, head_dim 128, 5 passes per block),
  with fewer tokens per frame so it fits a CPU. For each block, each pass, each layer:
  ``cache.layers[l].attend(q, k, v, start_frame=f0)`` with random q, k, v made once up front (RNG is not timed).
  The policies are **interleaved layer by layer** (layer l of every policy's cache, then layer l + 1, ...), each
  with its own cache, and the order rotates every block, so a burst of outside load lands on all of them alike
  and the ratios between them stay honest (the order is shuffled every block, see :func:`_order`);
* **the tiny full model** (``WanConfig.tiny()``) through :func:`deepforcing_kernels.driver.generate`, also
  round-robin per block.

Per policy: per-block time (median, p90), mean attended frames, KV-cache bytes (allocated K/V storage, measured by
walking the cache's tensors) at the moment the stream reaches the window and at its maximum, the same for all the
cache's state (K/V plus bookkeeping), plus the per-block series the plot draws.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

# the benchmark rows are the preset policies; ``release`` is a baseline that is not a policy (:class:`ReleaseCache`),
# accepted by :func:`run_cache_rollout` only
from ..presets import BENCH_BASELINE_NAMES as BASELINE_NAMES  # noqa: F401
from ..presets import POLICY_NAMES, make_policy, split_commit_rule
from .timing import percentile, summarize


# ---------------------------------------------------------------------------------------------- measuring a cache
def _walk_tensors(obj: Any, seen_objs: set, out: Dict[int, int], depth: int = 0,
                  keep: Optional[Callable[[torch.Tensor], bool]] = None) -> None:
    if depth > 4 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if keep is not None and not keep(obj):
            return
        st = obj.untyped_storage()
        out[st.data_ptr()] = max(out.get(st.data_ptr(), 0), st.nbytes())
        return
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith(
            "deepforcing_kernels"):
        items = vars(obj).values()
    else:
        return
    for v in items:
        _walk_tensors(v, seen_objs, out, depth + 1, keep)


def cache_bytes(cache: Any) -> int:
    """Bytes of all tensor storage a cache holds (allocated, not just used), each storage counted once: K, V,
    per-slot metadata (frame table, reuse counters, carried mass), query sums, scratch buffers.

    Uses ``cache.nbytes()`` when the cache offers it; otherwise walks the cache object and its layers.
    """
    nb = getattr(cache, "nbytes", None)
    if callable(nb):
        return int(nb())
    out: Dict[int, int] = {}
    _walk_tensors(cache, set(), out)
    return int(sum(out.values()))


def kv_storage_bytes(cache: Any) -> int:
    """Bytes of allocated K/V storage: the tensors of the cache's dtype shaped ``[..., num_kv_heads, head_dim]``
    (the K and V buffers of every layer and the Top-C gather scratch), each storage counted once.

    This is "the KV cache" of the 1.15x target; :func:`cache_bytes` adds the bookkeeping. (With a float32
    cache the logits-mode query sums, also float32 ``[.., heads, head_dim]``, are counted here too.)
    """
    want = (cache.num_kv_heads, cache.head_dim)

    def is_kv(t: torch.Tensor) -> bool:
        return t.dtype == cache.dtype and t.dim() >= 2 and tuple(t.shape[-2:]) == want

    out: Dict[int, int] = {}
    _walk_tensors(cache, set(), out, keep=is_kv)
    return int(sum(out.values()))


def kv_bytes_in_use(cache: Any) -> int:
    """Bytes of K and V that hold live tokens right now (slots in use x heads x head_dim x 2 x itemsize)."""
    per_tok = 2 * cache.batch_size * cache.num_kv_heads * cache.head_dim * torch.empty(0, dtype=cache.dtype
                                                                                        ).element_size()
    return int(sum(len(layer) for layer in cache.layers) * per_tok)


def window_kv_bytes(cache: Any, window_frames: int = 21) -> int:
    """Nominal K + V bytes of a ``window_frames`` cache over all layers: the yardstick of the 1.15x target."""
    per_tok = 2 * cache.batch_size * cache.num_kv_heads * cache.head_dim * torch.empty(0, dtype=cache.dtype
                                                                                        ).element_size()
    return int(cache.num_layers * window_frames * cache.tokens_per_frame * per_tok)


def _order(names: Sequence[str], rng: "random.Random") -> List[str]:
    """A fresh random order of the policies for one block (seeded, so runs repeat).

    A fixed rotation is not enough: the policy that runs right after ``full`` (whose cache outgrows the CPU's
    caches) starts every layer cold, and with a rotation that is nearly always the same neighbour. Measured: with
    a rotation, ``frame_sink`` (same work as ``sliding``) came out 12 % faster than ``sliding``, which followed
    ``full`` 5 blocks in 6. A random order spreads that penalty evenly.
    """
    order = list(names)
    rng.shuffle(order)
    return order


def _attend_frames(layer: Any, start_frame: int, clean: bool = False) -> Optional[int]:
    """Frames the next pass of ``layer`` will attend to, from the schedule engine (pure, cheap); a clean pass
    under the commit rule reads the committed frames instead (its block joining them)."""
    from ..schedule import plan_pass

    plan, p, sh = plan_pass(layer.policy, layer.state, start_frame), layer.policy, getattr(layer, "shadow", None)
    F, st = plan.state.current_block_frames(p), plan.state
    if clean and sh is not None and start_frame + F - st.stream_start >= p.commit_from_frames:
        return min(p.commit_frames, sum(f < st.block_start for f in sh.frames()[0, ::sh.n].tolist()) + F)
    return int(plan.attend_frames)


# ---------------------------------------------------------------------------------------------- the release, measured
class ReleaseCache:
    """The authors' release as a measured peer: its data movement per pass, on this package's schedule.

    A benchmark baseline, not a user policy. Same schedule as ``CachePolicy.deep_forcing(score="logits")`` (the
    actions, sink placement and Top-C rule of :func:`deepforcing_kernels.schedule.plan_pass` and
    :func:`deepforcing_kernels.cache.select_topc`), executed the way the release moves data (docs/spec.md sections 2-3):

    * the recent-query buffer holds the raw queries of the last ``recent_frames`` frames (bf16 / the cache dtype),
      rebuilt by concatenation every pass;
    * Top-C score: ``q_sum = sum(buffer)`` and ``score = K_cand . q_sum`` (summed over heads) in the cache dtype,
      then the compacted cache is rebuilt by concatenating sink, the gathered picks and the recent frames;
    * the sink keys are **rotated in place** in the cache dtype whenever the schedule moves the sink (float32
      maths on float64 angles, rounded back to bf16 each time, so rounding accumulates as in the release);
    * before every attention call the cache prefix is **copied** into a contiguous window, and attention is
      ``torch.nn.functional.scaled_dot_product_attention`` on that window.

    Interface as much of :class:`~deepforcing_kernels.StreamingKVCache` as the rollout bench reads: ``layers``
    (each with ``attend``, ``policy``, ``state``, ``frames()``, ``len``) and the geometry attributes.
    """

    def __init__(self, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                 rope: Any, dtype: torch.dtype = torch.bfloat16, device: Any = "cpu", window_frames: int = 21,
                 num_kv_heads: Optional[int] = None) -> None:
        from ..cache import CachePolicy

        self.policy = CachePolicy.deep_forcing(window_frames=window_frames, score="logits")
        self.num_layers, self.batch_size, self.num_heads = num_layers, batch_size, num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim, self.tokens_per_frame, self.rope = head_dim, tokens_per_frame, rope
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = tuple(ReleaseLayer(self) for _ in range(num_layers))


class ReleaseLayer:
    """One layer of :class:`ReleaseCache`."""

    def __init__(self, cache: ReleaseCache) -> None:
        from ..schedule import ScheduleState

        c, p = cache, cache.policy
        self.cache, self.policy = c, p
        n = c.tokens_per_frame
        cap = (p.window_frames + p.block_frames) * n
        shape = (c.batch_size, cap, c.num_kv_heads, c.head_dim)
        self._k = torch.zeros(shape, dtype=c.dtype, device=c.device)
        self._v = torch.zeros(shape, dtype=c.dtype, device=c.device)
        self._frames = torch.zeros(c.batch_size, cap, dtype=torch.int64, device=c.device)
        self._reuse = torch.zeros(c.batch_size, cap, dtype=torch.int32, device=c.device)
        self._qbuf = torch.zeros(c.batch_size, 0, c.num_heads, c.head_dim, dtype=c.dtype, device=c.device)
        self._sink_at: Optional[int] = None  # position the stored sink keys encode for sink frame 0 (None: own)
        self.state = ScheduleState()

    def __len__(self) -> int:
        return self.state.frames * self.cache.tokens_per_frame

    def frames(self) -> torch.Tensor:
        """``[B, L]`` int64: the frame each slot's token came from."""
        return self._frames[:, :len(self)].clone()

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_frame: int) -> torch.Tensor:
        """Write the pass's K/V, run the schedule the release's way, attend with SDPA; returns
        ``[B, block_tokens, num_heads, head_dim]``."""
        from ..cache import select_topc
        from ..schedule import plan_pass

        c, p = self.cache, self.policy
        n, F = c.tokens_per_frame, p.block_frames
        plan = plan_pass(p, self.state, start_frame)
        Lb, L0 = F * n, plan.frames_before * n
        if plan.action == "overwrite":
            off = L0 - Lb
        else:  # append or compress (this schedule never rolls)
            off = L0
            self._frames[:, off:off + Lb] = (plan.start_frame + torch.arange(F, device=c.device)).repeat_interleave(n)
            self._reuse[:, off:off + Lb] = 0
        self._k[:, off:off + Lb] = k
        self._v[:, off:off + Lb] = v
        self._qbuf = torch.cat([self._qbuf, q], dim=1)[:, -p.recent_frames * n:]  # the release's query buffer
        T = off + Lb
        if plan.action == "compress":
            self._compress(T, select_topc)
        if plan.attend_sink_start is not None and plan.attend_sink_start != self._sink_at:
            self._rotate_sink(plan.attend_sink_start, plan.state.stream_start,
                              min(p.sink_frames, plan.attend_frames) * n)
        L = plan.attend_frames * n
        kw, vw = self._k[:, :L].clone(), self._v[:, :L].clone()  # the contiguous window of every call
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2),
            enable_gqa=c.num_heads != c.num_kv_heads)
        self.state = plan.state
        return out.transpose(1, 2)

    def _compress(self, T: int, select_topc) -> None:
        c, p, n = self.cache, self.policy, self.cache.tokens_per_frame
        S_tok, C_tok, R_tok = p.sink_frames * n, p.topc_frames * n, p.recent_frames * n
        B, Hq, Hkv, D = c.batch_size, c.num_heads, c.num_kv_heads, c.head_dim
        q_sum = self._qbuf.sum(dim=1)  # [B, Hq, D] in the cache dtype
        q_sum = q_sum.view(B, Hkv, Hq // Hkv, D).sum(dim=2)
        cand = self._k[:, S_tok:T - R_tok]
        score = torch.bmm(cand.reshape(B, -1, Hkv * D), q_sum.reshape(B, Hkv * D, 1)).squeeze(-1)  # cache dtype
        idx = select_topc(score.float(), self._reuse[:, S_tok:T - R_tok], C_tok, p.topc_max_reuse) + S_tok
        for t in (self._k, self._v, self._frames, self._reuse):
            picked = torch.stack([t[b].index_select(0, idx[b]) for b in range(B)])
            t[:, :S_tok + C_tok + R_tok] = torch.cat([t[:, :S_tok], picked, t[:, T - R_tok:T]], dim=1)
        self._reuse[:, S_tok:S_tok + C_tok] += 1

    def _rotate_sink(self, target: int, stream_start: int, sink_tokens: int) -> None:
        """Rotate the stored sink keys in place from where they sit now (their own positions, starting at
        ``stream_start``, until the first move) to ``target``, rounding back to the cache dtype."""
        from ..rotation import rephase

        current = self._sink_at if self._sink_at is not None else stream_start
        sink = self._k[:, :sink_tokens]
        sink.copy_(rephase(sink, self.cache.rope, int(target - current)))
        self._sink_at = target


def bench_policy(name: str, window_frames: int) -> Any:
    """The policy ``name`` with a window of ``window_frames`` frames of the bench's size (a window written in the
    authors' 1560-token frames, Rolling Sink's ``frame_tokens``, is taken in frames, so every row keeps 21). The
    bench's window replaces the preset's Self-Forcing window of 21 frames; a method whose authors run another
    window (MemRoPE's 12) keeps its own."""
    name, rule = split_commit_rule(name)  # a row "NAME+commit": the policy with the commit rule
    kw = {"commit_rule": True} if rule else {}
    p = make_policy(name, **kw)
    if p.window_frames == 21:
        p = make_policy(name, window_frames=window_frames, **kw)
    return dataclasses.replace(p, frame_tokens=None) if getattr(p, "frame_tokens", None) is not None else p


def _make_cache(name: str, cfg: "RolloutConfig", rope: Any, extra: Dict[str, Any]):
    from ..cache import StreamingKVCache

    if name == "release":
        return ReleaseCache(num_layers=cfg.num_layers, batch_size=1, num_heads=cfg.num_heads,
                            head_dim=cfg.head_dim, tokens_per_frame=cfg.tokens_per_frame, rope=rope,
                            dtype=cfg.dtype, window_frames=cfg.window_frames)
    return StreamingKVCache(bench_policy(name, cfg.window_frames), num_layers=cfg.num_layers, batch_size=1,
                            num_heads=cfg.num_heads, head_dim=cfg.head_dim, tokens_per_frame=cfg.tokens_per_frame,
                            rope=rope, dtype=cfg.dtype, backend=cfg.backend, frame_grid=(1, cfg.tokens_per_frame),
                            **extra)


# ---------------------------------------------------------------------------------------------- cache rollout
@dataclass
class RolloutConfig:
    """Geometry of the cache + attention rollout. Defaults: the real layer geometry, 240 latent frames."""

    num_frames: int = 240
    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 128
    tokens_per_frame: int = 16
    passes: int = 5
    block_frames: int = 3
    window_frames: int = 21
    dtype: torch.dtype = torch.bfloat16
    backend: str = "auto"
    seed: int = 0
    pool: int = 4  # distinct (q, k, v) triples, cycled over passes, so Top-C sees varied keys
    policies: Sequence[str] = POLICY_NAMES
    check_finite: Optional[bool] = None  # None: the cache's default (it rejects NaN/inf inputs, one sync a pass)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["policies"] = list(self.policies)
        return d


@dataclass
class _Series:
    block_s: List[float] = field(default_factory=list)
    pass_s: List[List[float]] = field(default_factory=list)
    attended_frames: List[float] = field(default_factory=list)
    cache_frames: List[float] = field(default_factory=list)
    bytes_alloc: List[int] = field(default_factory=list)
    state_bytes: List[int] = field(default_factory=list)
    bytes_in_use: List[int] = field(default_factory=list)


def _summary(name: str, s: _Series, frames_end: List[int], window_frames: int, window_bytes: int,
             bounded: bool) -> Dict[str, Any]:
    # "at the window": the first block after which the stream has produced >= W frames
    at = next((i for i, f in enumerate(frames_end) if f >= window_frames), len(frames_end) - 1)
    steady = s.block_s[at + 1:] or s.block_s  # after the window fills: the regime a long video lives in
    st = summarize(s.block_s)
    return {
        "per_block_s_median": st["median"], "per_block_s_p90": st["p90"], "per_block_s_mean": st["mean"],
        "per_block_s_median_steady": summarize(steady)["median"],
        "attended_frames_mean": sum(s.attended_frames) / max(1, len(s.attended_frames)),
        "kv_cache_bytes_at_window": s.bytes_alloc[at], "kv_cache_bytes_max": max(s.bytes_alloc),
        "kv_bytes_in_use_max": max(s.bytes_in_use), "window_kv_bytes": window_bytes,
        "bytes_ratio_max_to_window": max(s.bytes_alloc) / window_bytes,
        "cache_state_bytes_at_window": s.state_bytes[at], "cache_state_bytes_max": max(s.state_bytes),
        "state_ratio_max_to_window": max(s.state_bytes) / window_bytes,
        "bounded": bounded, "blocks": len(s.block_s),
        "series": {"frame_end": frames_end, "block_s": s.block_s, "attended_frames": s.attended_frames,
                   "cache_frames": s.cache_frames, "bytes_alloc": s.bytes_alloc, "bytes_in_use": s.bytes_in_use,
                   "state_bytes": s.state_bytes},
    }


def run_cache_rollout(cfg: RolloutConfig = RolloutConfig(), *, log: Optional[Callable[[str], None]] = None,
                      on_block: Optional[Callable[[int], None]] = None,
                      profilers: Optional[Mapping[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Run the cache + attention rollout for every policy of ``cfg``, round-robin per block.

    ``profilers``: optional ``{policy: cProfile.Profile}``, each enabled only while its policy's blocks run, so
    per-policy profiles share the same outside load too (see :mod:`deepforcing_kernels.bench.hotspots`).

    ``cfg.policies`` may include the baseline ``"release"`` (:class:`ReleaseCache`).

    Returns ``{policy: summary}`` (see :func:`_summary` keys; ``series`` holds the per-block values).
    """
    from ..rope import RopeSpec

    F, n = cfg.block_frames, cfg.tokens_per_frame
    if cfg.num_frames % F:
        raise ValueError(f"num_frames {cfg.num_frames} is not a multiple of block_frames {F}")
    rope = RopeSpec.wan(cfg.head_dim)
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (1, F * n, cfg.num_heads, cfg.head_dim)
    # made once; RoPE'd-looking random data is as good as real for timing (the kernels do not look at values)
    qkv = [tuple(torch.randn(shape, generator=g).to(cfg.dtype) for _ in range(3)) for _ in range(cfg.pool)]
    extra = {} if cfg.check_finite is None else {"check_finite": cfg.check_finite}
    caches = {name: _make_cache(name, cfg, rope, extra) for name in cfg.policies}
    series = {name: _Series() for name in cfg.policies}
    names = list(cfg.policies)
    frames_end: List[int] = []
    nblocks = cfg.num_frames // F
    order_rng = random.Random(cfg.seed)
    t_start = time.perf_counter()
    for b in range(nblocks):
        f0 = b * F
        order = _order(names, order_rng)
        pass_times = {name: [] for name in names}
        attended = {name: [] for name in names}
        for p in range(cfg.passes):
            q, k, v = qkv[(b * cfg.passes + p) % cfg.pool]
            for name in order:  # outside the timed region
                af = _attend_frames(caches[name].layers[0], f0, p == cfg.passes - 1)
                attended[name].append(af if af is not None else float("nan"))
            acc = dict.fromkeys(names, 0.0)
            for name in names:  # the block's last pass is its clean pass (TetherCache admits there)
                if getattr(caches[name], "wants_pass_marks", False):
                    caches[name].mark_pass(clean=p == cfg.passes - 1)
            # interleaved per layer: each policy's layer l runs right after the others' layer l, so outside
            # load (bursts of a few ms to seconds) lands on every policy alike and the ratios stay clean
            for li in range(cfg.num_layers):
                for name in order:
                    layer = caches[name].layers[li]
                    prof = profilers.get(name) if profilers else None
                    if prof is not None:
                        prof.enable()
                    t0 = time.perf_counter()
                    layer.attend(q, k, v, start_frame=f0)
                    acc[name] += time.perf_counter() - t0
                    if prof is not None:
                        prof.disable()
            for name in names:
                pass_times[name].append(acc[name])
        for name in names:
            cache, s = caches[name], series[name]
            att = [a if a == a else len(cache.layers[0]) / n for a in attended[name]]  # nan: engine w/o plan
            s.pass_s.append(pass_times[name])
            s.block_s.append(sum(pass_times[name]))
            s.attended_frames.append(sum(att) / len(att))
            s.cache_frames.append(len(cache.layers[0]) / n)
            s.bytes_alloc.append(kv_storage_bytes(cache))
            s.state_bytes.append(cache_bytes(cache))
            s.bytes_in_use.append(kv_bytes_in_use(cache))
        frames_end.append(f0 + F)
        if on_block:
            on_block(b)
        if log and (b + 1) % max(1, nblocks // 8) == 0:
            log(f"  rollout block {b + 1}/{nblocks} ({time.perf_counter() - t_start:.0f} s)")
    wb = window_kv_bytes(next(iter(caches.values())), cfg.window_frames)
    # "bounded" rows are held to the KV-bytes target; the release baseline is a peer to time, not a policy of ours
    return {name: _summary(name, series[name], frames_end, cfg.window_frames, wb,
                           name != "full" and name not in BASELINE_NAMES)
            for name in names}


# ---------------------------------------------------------------------------------------------- tiny model rollout
@dataclass
class ModelRolloutConfig:
    """The tiny full model (``WanConfig.tiny()``: 2 layers, 16 tokens per frame) through ``generate``."""

    num_frames: int = 240
    seed: int = 0
    backend: str = "auto"
    cache_dtype: Optional[torch.dtype] = None  # None: the model's dtype (float32)
    policies: Sequence[str] = POLICY_NAMES
    window_frames: int = 21

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["cache_dtype"] = None if self.cache_dtype is None else str(self.cache_dtype).replace("torch.", "")
        d["policies"] = list(self.policies)
        return d


def run_model_rollout(cfg: ModelRolloutConfig = ModelRolloutConfig(), *,
                      log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Generate ``cfg.num_frames`` latent frames with the tiny model per policy, one block per policy in turn."""
    from ..driver import generate
    from ..models import CausalWanModel, WanConfig

    torch.manual_seed(cfg.seed)
    mcfg = WanConfig.tiny()
    model = CausalWanModel(mcfg).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    if hasattr(model, "init_weights"):
        model.init_weights(generator=g, zero_head=False)  # a zero head would make every block trivially 0
    text = torch.randn(1, mcfg.text_len or 16, mcfg.text_dim, generator=g)
    kw: Dict[str, Any] = dict(seed=cfg.seed, progress=False, backend=cfg.backend)
    if cfg.cache_dtype is not None:
        kw["cache_dtype"] = cfg.cache_dtype
    names = [p for p in cfg.policies if p not in BASELINE_NAMES]  # the release baseline is a cache-path peer only
    rollouts = {name: generate(model, text, cfg.num_frames, bench_policy(name, cfg.window_frames), **kw)
                for name in names}
    series = {name: _Series() for name in names}
    frames_end: List[int] = []
    nblocks = cfg.num_frames // 3
    order_rng = random.Random(cfg.seed)
    for b in range(nblocks):
        order = _order(names, order_rng)
        for name in order:
            r, s = rollouts[name], series[name]
            t0 = time.perf_counter()
            next(r)
            s.block_s.append(time.perf_counter() - t0)
            fr = len(r.cache.layers[0]) / r.tokens_per_frame
            s.attended_frames.append(fr)  # frames held after the block (the driver does not expose per-pass)
            s.cache_frames.append(fr)
            s.bytes_alloc.append(kv_storage_bytes(r.cache))
            s.state_bytes.append(cache_bytes(r.cache))
            s.bytes_in_use.append(kv_bytes_in_use(r.cache))
        frames_end.append((b + 1) * 3)
        if log and (b + 1) % max(1, nblocks // 4) == 0:
            log(f"  model rollout block {b + 1}/{nblocks}")
    wb = window_kv_bytes(next(iter(rollouts.values())).cache, cfg.window_frames)
    return {name: _summary(name, series[name], frames_end, cfg.window_frames, wb, name != "full")
            for name in names}


def ratios_to(results: Mapping[str, Mapping[str, Any]], baseline: str = "sliding",
              key: str = "per_block_s_median") -> Dict[str, float]:
    """``results[p][key] / results[baseline][key]`` for every policy (same run, same noise)."""
    if baseline not in results:
        return {}
    base = results[baseline][key]
    return {p: r[key] / base for p, r in results.items()}


def paired_ratio(results: Mapping[str, Mapping[str, Any]], policy: str, baseline: str = "sliding",
                 steady_only: bool = True, window_frames: int = 21) -> float:
    """Median over blocks of (policy block time / baseline block time) for the same block index.

    Blocks of different policies with the same index ran back to back (round-robin), so this pairs samples
    that shared the same outside load: a steadier estimate than a ratio of medians.
    """
    a = results[policy]["series"]
    bs = results[baseline]["series"]
    pairs = [x / y for x, y, f in zip(a["block_s"], bs["block_s"], a["frame_end"])
             if y > 0 and (not steady_only or f > window_frames)]
    return percentile(pairs, 50)
