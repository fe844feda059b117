"""Reliability: hypothesis drives StreamingKVCache with random policies and call sequences against a brute-force
model of the schedule written from docs/spec.md sections 1-4 (not from deepforcing_kernels.schedule).

The model keeps every token by identity (frame, token-in-frame), re-derives from scratch what each pass must
attend to (which tokens, at which temporal positions), and checks after every pass: the slots' frames, kinds,
values and positions, the effective keys, the output (docs/spec.md section 7 budget against the float64 oracle over the
model's keys), Top-C picks (a valid top-C of the model's own scores: logits or attention mass, with the reuse cap
and fillers), reuse counters, and that the cache never holds more than the window. Bad calls in the sequence
(start_frame backwards or inside the block) must raise ValueError and leave state_dict() unchanged.

``BruteForceCache`` is reused by the other reliability modules (long streams, resume, threads).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import policies, state_equal  # noqa: F401  (shared with the resume and bad-input tests)

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache, sink_attention
from deepforcing_kernels.reference.attention import release_logit_score
from deepforcing_kernels.reference.rope import rephase
from deepforcing_kernels.testing import assert_within_budget

Ident = Tuple[int, int]  # (frame, token index inside the frame)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only spins


class BruteForceCache:
    """The docs/spec.md model of one cache layer. Call :meth:`step` with the same q, k, v and start_frame as the layer; it
    returns the model's view of the pass and checks the layer against it."""

    def __init__(self, policy: CachePolicy, *, batch_size: int, tokens_per_frame: int, rope: Optional[RopeSpec]):
        self.p, self.B, self.n, self.rope = policy, batch_size, tokens_per_frame, rope
        self.slots: List[List[Ident]] = [[] for _ in range(batch_size)]  # per batch element, slot order
        self.k: Dict[Ident, torch.Tensor] = {}  # ident -> [B, Hkv, D]
        self.v: Dict[Ident, torch.Tensor] = {}
        self.block_start: Optional[int] = None
        self.stream_start: Optional[int] = None
        self.sink_start: Optional[int] = None  # None: sink at its own positions
        self.compressed = False
        self.reuse: List[Dict[Ident, int]] = [dict() for _ in range(batch_size)]
        self.carried: List[Dict[Ident, float]] = [dict() for _ in range(batch_size)]  # previous pass's tail mass
        self.qframes: List[torch.Tensor] = []  # every pass's queries, per frame [B, n, Hq, D]

    # ------------------------------------------------------------------ layout
    @property
    def frames_in_cache(self) -> int:
        return len(self.slots[0]) // self.n

    def positions(self, slots: List[Ident], sink_start: Optional[int], compressed: bool) -> List[int]:
        p, n = self.p, self.n
        S_tok, C_tok = p.sink_frames * n, (p.topc_frames * n if compressed else 0)
        out = []
        for s, (f, _) in enumerate(slots):
            if s < S_tok and p.rephase_sink and sink_start is not None:
                out.append(f + sink_start - self.stream_start)  # sink: moved by the total shift
            elif S_tok <= s < S_tok + C_tok and p.unify_topc_rope and sink_start is not None:
                out.append(sink_start + p.sink_frames + (s - S_tok) // n)  # docs/spec.md section 3, item 5: unification
            else:
                out.append(f)
        return out

    def kinds(self, frames: int, compressed: bool) -> Tuple[str, ...]:
        p, n = self.p, self.n
        S = min(p.sink_frames, frames)
        C = p.topc_frames if compressed else 0
        return ("sink",) * (S * n) + ("topc",) * (C * n) + ("recent",) * ((frames - S - C) * n)

    def tensors(self, slots_b: List[List[Ident]]):
        k = torch.stack([torch.stack([self.k[i][b] for i in sl]) for b, sl in enumerate(slots_b)])
        v = torch.stack([torch.stack([self.v[i][b] for i in sl]) for b, sl in enumerate(slots_b)])
        return k, v  # [B, L, Hkv, D]

    def shifts(self, slots_b, sink_start, compressed) -> torch.Tensor:
        return torch.tensor([[pos - f for pos, (f, _) in zip(self.positions(sl, sink_start, compressed), sl)]
                             for sl in slots_b], dtype=torch.int64)

    # ------------------------------------------------------------------ one pass
    def plan(self, f0: int) -> str:
        p, F = self.p, self.p.block_frames
        if self.block_start is not None and f0 == self.block_start:
            return "overwrite"
        if f0 < 0 or (self.block_start is not None and f0 < self.block_start + F):
            return "invalid"
        L = self.frames_in_cache
        if p.kind == "full" or L + F <= p.window_frames:
            return "append"
        return "compress" if p.compresses else "roll"

    def _attend(self, q, slots_b, sink_start, compressed):
        k, v = self.tensors(slots_b)
        ks = self.shifts(slots_b, sink_start, compressed)
        kw = dict(rope=self.rope, key_shift=ks) if self.rope is not None and bool((ks != 0).any()) else {}
        return k, v, kw

    def _mass(self, q, slots_b, sink_start, compressed) -> List[Dict[Ident, float]]:
        """Per batch element: attention mass of the queries ``q`` over the given cache, summed over heads."""
        out = [dict() for _ in range(self.B)]
        if q.shape[1] == 0:
            return out
        k, v, kw = self._attend(q, slots_b, sink_start, compressed)
        res = sink_attention(q.float(), k.float(), v.float(), return_mass=True, backend="reference", **kw)
        m = res.mass.double().sum(dim=1)  # [B, L]
        for b, sl in enumerate(slots_b):
            for j, ident in enumerate(sl):
                out[b][ident] = float(m[b, j])
        return out

    def step(self, layer, q, k, v, f0: int, out: torch.Tensor) -> str:
        """Advance the model by the pass the layer just ran (which returned ``out``) and check the layer."""
        p, n, F = self.p, self.n, self.p.block_frames
        action = self.plan(f0)
        assert action != "invalid"
        L0 = self.frames_in_cache
        new_ids = [(f0 + i, t) for i in range(F) for t in range(n)]
        for j, ident in enumerate(new_ids):
            self.k[ident], self.v[ident] = k[:, j].clone(), v[:, j].clone()
        if action != "overwrite":
            if self.stream_start is None:
                self.stream_start = f0
            self.block_start = f0
            for b in range(self.B):
                for ident in new_ids:
                    self.reuse[b][ident] = 0
        self.qframes += list(q.view(self.B, F, n, q.shape[2], q.shape[3]).unbind(1))
        g = p.gap_frames
        S_tok, R_tok = p.sink_frames * n, (p.recent_frames or 0) * n
        picked_check = None
        if action == "roll":
            # FIFO: keep the sink, drop the oldest frames after it so that exactly W frames remain
            keep = p.window_frames * n - F * n
            for b in range(self.B):
                sl = self.slots[b]
                self.slots[b] = sl[:S_tok] + sl[len(sl) - (keep - S_tok):] + new_ids if keep > S_tok else \
                    sl[:S_tok] + new_ids
            if p.rephase_sink:
                self.sink_start = f0 + F - p.window_frames - g
            att = (self.slots, self.sink_start, False)
        elif action in ("append", "overwrite"):
            if action == "append":
                for b in range(self.B):
                    self.slots[b] = self.slots[b] + new_ids
            att = (self.slots, self.sink_start, self.compressed)
        else:  # compress
            aug = [sl + new_ids for sl in self.slots]
            T = len(aug[0])
            if p.score == "logits":
                buf = torch.stack([qf.float().sum(1) for qf in self.qframes[-p.recent_frames:]], dim=1)
                ka, _ = self.tensors(aug)
                score = release_logit_score(buf, ka).double()
                scores = [{ident: float(score[b, j]) for j, ident in enumerate(aug[b])} for b in range(self.B)]
                picked_check = (aug, scores)
                self.sink_start = f0 + F - p.budget_frames - g
                self.compressed = True
                att = None  # decided after reading the cache's pick
            else:
                sink_att = f0 + F - (L0 + F) - g
                cur = self._mass(q, aug, sink_att, self.compressed)
                scores = [{i: self.carried[b].get(i, 0.0) + cur[b][i] for i in aug[b]} for b in range(self.B)]
                picked_check = (aug, scores)
                att = (aug, sink_att, self.compressed)
        # ---- attention output of the pass (except logits compress: after the pick)
        if att is not None:
            self._check_out(q, out, *att)
            self._carry(q, *att)
        if picked_check is not None:
            aug, scores = picked_check
            got = layer.frames()
            vals = layer.values()
            for b in range(self.B):
                chosen = self._idents_from_values(vals[b, S_tok:S_tok + p.topc_frames * n], aug[b], b)
                self._check_pick(aug[b], scores[b], chosen, b)
                for i in chosen:
                    self.reuse[b][i] += 1
                self.slots[b] = aug[b][:S_tok] + chosen + aug[b][T - R_tok:]
                assert got[b].tolist() == [f for f, _ in self.slots[b]]
            if p.score == "logits":
                self._check_out(q, out, self.slots, self.sink_start, True)
                self._carry(q, self.slots, self.sink_start, True)
            else:
                self.sink_start = f0 + F - p.budget_frames - g
                self.compressed = True
        self.check_layer(layer)
        return action

    def _carry(self, q, slots_b, sink_start, compressed):
        if self.p.compresses and self.p.score == "mass":
            tail = (self.p.recent_frames - self.p.block_frames) * self.n
            self.carried = self._mass(q[:, q.shape[1] - tail:], slots_b, sink_start, compressed)

    def _check_out(self, q, out, slots_b, sink_start, compressed):
        k, v, kw = self._attend(q, slots_b, sink_start, compressed)
        assert_within_budget(out, q, k, v, **kw)

    def _idents_from_values(self, vals: torch.Tensor, candidates: List[Ident], b: int) -> List[Ident]:
        """Which tokens the cache kept for batch element ``b``, found by their value rows (random, so distinct)."""
        found = []
        for row in vals:
            match = [i for i in candidates if torch.equal(self.v[i][b], row)]
            assert len(match) == 1, f"a Top-C slot holds a value that is not exactly one candidate's ({len(match)})"
            found.append(match[0])
        return found

    def _check_pick(self, aug: List[Ident], score: Dict[Ident, float], chosen: List[Ident], b: int):
        p, n = self.p, self.n
        S_tok, C_tok, R_tok = p.sink_frames * n, p.topc_frames * n, p.recent_frames * n
        cands = aug[S_tok:len(aug) - R_tok]
        assert len(chosen) == C_tok and len(set(chosen)) == C_tok
        assert all(c in cands for c in chosen), "Top-C picked a token outside [S_tok, T - R_tok)"
        assert chosen == sorted(chosen, key=cands.index), "Top-C slots are not in slot (time) order"
        cap = p.topc_max_reuse
        elig = [c for c in cands if cap is None or self.reuse[b][c] < cap]
        inelig = [c for c in cands if c not in elig]
        tol = 1e-4 * max(1.0, max(abs(s) for s in score.values()))
        if len(elig) >= C_tok:
            assert set(chosen) <= set(elig), "an ineligible (reused) token was picked while eligible ones remained"
            rest = [score[c] for c in elig if c not in chosen]
            if rest:
                assert min(score[c] for c in chosen) >= max(rest) - tol, "Top-C did not pick the best scores"
        else:
            assert set(elig) <= set(chosen), "fillers were used while eligible tokens were left out"
            fill = [c for c in chosen if c not in elig]
            rest = [score[c] for c in inelig if c not in chosen]
            if rest and fill:
                assert min(score[c] for c in fill) >= max(rest) - tol, "fillers are not the best-scoring ones"

    # ------------------------------------------------------------------ full comparison with the layer
    def check_layer(self, layer):
        p, n = self.p, self.n
        frames = self.frames_in_cache
        if p.kind != "full":
            assert frames <= p.window_frames, "the cache holds more than the window"
        assert len(layer) == frames * n
        assert layer.kinds() == self.kinds(frames, self.compressed)
        assert layer.frames().tolist() == [[f for f, _ in sl] for sl in self.slots]
        want_pos = [self.positions(sl, self.sink_start, self.compressed) for sl in self.slots]
        assert layer.positions().tolist() == want_pos
        k, v = self.tensors(self.slots)
        assert torch.equal(layer.values(), v) and torch.equal(layer.keys(), k)
        if self.rope is not None:
            want = rephase(k.float(), self.rope, self.shifts(self.slots, self.sink_start, self.compressed))
            torch.testing.assert_close(layer.effective_keys(), want, atol=1e-5, rtol=1e-5)
        if p.compresses:
            assert layer.reuse_counts().tolist() == [[self.reuse[b][i] for i in sl]
                                                     for b, sl in enumerate(self.slots)]


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def scenarios(draw, kinds=("full", "sliding", "frame_sink", "deep_sink", "deep_forcing"), bad=True):
    policy = draw(policies(kinds))
    n = draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2]))
    rope = draw(st.sampled_from([RopeSpec.wan(16), RopeSpec.gptj(16), RopeSpec.llama(16)]))
    first = draw(st.sampled_from([0, 0, 5, 10**6 + 1]))
    # each step: ("new", gap) a new block `gap` frames after the current one ends; ("over",) the current block's
    # next pass; ("bad", delta) a start_frame inside or before the current block (must raise)
    step = [st.tuples(st.just("new"), st.sampled_from([0, 0, 0, 0, 1, 4])), st.tuples(st.just("over"), st.just(0))]
    if bad:
        step.append(st.tuples(st.just("bad"), st.sampled_from([-1, 1, 2, -7])))
    steps = draw(st.lists(st.one_of(*step), min_size=4, max_size=26))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return policy, n, B, Hkv, rope, first, steps, draw(st.integers(0, 2**31 - 1)), dtype


def block_inputs(gen, B, Lb, Hq, Hkv, D, dtype=torch.float32):
    q = torch.randn(B, Lb, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Lb, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Lb, Hkv, D, generator=gen).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------- the fuzz tests
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@settings(max_examples=200, **FUZZ)
@given(sc=scenarios())
def test_fuzz_cache_against_brute_force_model(sc):
    run_scenario(sc)


@settings(max_examples=120, **FUZZ)
@given(sc=scenarios(kinds=("deep_forcing",), bad=False))
def test_fuzz_deep_forcing_compression_against_brute_force_model(sc):
    """Participative Compression gets its own budget of examples: Top-C picks, reuse caps, fillers, both scores."""
    run_scenario(sc)


def run_scenario(sc):
    policy, n, B, Hkv, rope, first, steps, seed, dtype = sc
    Hq, D = 2, 16
    cache = StreamingKVCache(policy, num_layers=1, batch_size=B, num_heads=Hq, head_dim=D, tokens_per_frame=n,
                             rope=rope, dtype=dtype, num_kv_heads=Hkv)
    layer = cache.layers[0]
    model = BruteForceCache(policy, batch_size=B, tokens_per_frame=n, rope=rope)
    gen = torch.Generator().manual_seed(seed)
    F, Lb = policy.block_frames, policy.block_frames * n
    f0, actions = None, set()
    for kind, arg in [("new", None)] + steps:
        if kind == "new":
            f0 = first if f0 is None else f0 + F + arg
        elif kind == "over":
            pass
        else:  # bad start_frame
            if 0 < arg and arg >= F:
                continue  # not inside the block for this block length: it would be a valid new block
            bad = f0 + arg
            before = cache.state_dict()
            q, k, v = block_inputs(gen, B, Lb, Hq, Hkv, D, dtype)
            with pytest.raises(ValueError, match="start_frame"):
                layer.attend(q, k, v, start_frame=bad)
            assert state_equal(cache.state_dict(), before), "a rejected pass changed the cache"
            continue
        q, k, v = block_inputs(gen, B, Lb, Hq, Hkv, D, dtype)
        out = layer.attend(q, k, v, start_frame=f0)
        actions.add(model.step(layer, q, k, v, f0, out))
    event(f"{policy.kind}/{policy.score}: " + ",".join(sorted(actions)))
