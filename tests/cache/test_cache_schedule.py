"""The schedule: the release traces of docs/spec.md section 2, and the engine against an independent brute-force model of
the release over random configurations (hypothesis), 100+ blocks each."""
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.schedule import ScheduleState, plan_pass, simulate

warnings.filterwarnings("ignore", message=".*C\\+\\+ CPU kernel is not built.*")


pytestmark = pytest.mark.usefixtures("one_thread")


def _fp(frames, positions, n=1):
    """``frame@position`` of the first token of each frame."""
    return [f"{f}@{p}" for f, p in zip(frames[::n], positions[::n])]


def _run(policy, n=1, passes=1, blocks=15, B=1, H=2, D=16, backend="auto", start=0):
    """Drive a one-layer cache; yield (f0, layer) after the first pass of each block (then run the other passes)."""
    cache = StreamingKVCache(policy, num_layers=1, batch_size=B, num_heads=H, head_dim=D, tokens_per_frame=n,
                             rope=RopeSpec.wan(D), dtype=torch.float32, backend=backend)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)
    Lb = policy.block_frames * n
    for bi in range(blocks):
        f0 = start + bi * policy.block_frames
        for p in range(passes):
            q, k, v = torch.randn(3, B, Lb, H, D, generator=g).unbind(0)
            layer.attend(q, k, v, start_frame=f0)
            if p == 0:
                yield f0, layer


# ---------------------------------------------------------------------------------------------- docs/spec.md traces
def test_release_trace_deep_sink_s14():
    want = {21: ["0@0", "13@13", "17@17", "23@23"], 24: ["0@3", "13@16", "20@20", "26@26"],
            27: ["0@6", "13@19", "23@23", "29@29"]}
    seen = 0
    for f0, layer in _run(CachePolicy.deep_sink(sink_frames=14), n=2, passes=2, blocks=10):
        fp = _fp(layer.frames()[0].tolist(), layer.positions()[0].tolist(), n=2)
        if f0 in want:
            seen += 1
            assert len(fp) == 21
            sink, rest = fp[:14], fp[14:]
            assert [sink[0], sink[-1], rest[0], rest[-1]] == want[f0]
            # every frame in between, contiguous: 0@s..13@s+13 | f0-4@f0-4 .. f0+2@f0+2
            s = int(want[f0][0].split("@")[1])
            assert sink == [f"{i}@{s + i}" for i in range(14)]
            assert rest == [f"{f}@{f}" for f in range(f0 - 4, f0 + 3)]
        elif f0 < 21:
            assert fp == [f"{f}@{f}" for f in range(f0 + 3)]  # no re-phasing before the first overflow
    assert seen == 3


@pytest.mark.parametrize("score", ["logits", "mass"])
def test_release_trace_deep_forcing_s10_n16_r4(score):
    policy = CachePolicy.deep_forcing(sink_frames=10, budget_frames=16, recent_frames=4, score=score)
    sinks = {21: 5, 24: 5, 27: 11, 30: 11, 33: 17, 36: 17, 39: 23}
    sizes = []
    for f0, layer in _run(policy, n=2, passes=2, blocks=14):
        frames, pos = layer.frames()[0].tolist(), layer.positions()[0].tolist()
        fp = _fp(frames, pos, n=2)
        sizes.append(len(fp))
        kinds = layer.kinds()[::2]
        if f0 < 21:
            assert fp == [f"{f}@{f}" for f in range(f0 + 3)]
            continue
        assert fp[:10] == [f"{i}@{sinks[f0] + i}" for i in range(10)]
        compress = (f0 - 21) % 6 == 0
        assert layer.state.compressed and kinds[:12] == ("sink",) * 10 + ("topc",) * 2
        if compress:
            # recent after a compression: frames f0-1 .. f0+2 at their own positions
            assert fp[12:] == [f"{f}@{f}" for f in range(f0 - 1, f0 + 3)]
            assert len(fp) == 16
        else:
            assert fp[12:] == [f"{f}@{f}" for f in range(f0 - 4, f0 + 3)]
            assert len(fp) == 19
        topc = frames[20:24]  # 2 frames' worth of tokens, chosen from the candidate frames, in slot order
        assert topc == sorted(topc) and all(10 <= f < f0 - 1 for f in topc)
    # steady state: the cache after each block's first pass alternates 16 / 19 frames (Self-Forcing: 21)
    assert sizes[7:] == [16, 19] * 3 + [16]


def test_simulate_reproduces_the_release_traces():
    ds = {b.start_frame: b for b in simulate(CachePolicy.deep_sink(), 30)}
    assert ds[21].attended.describe() == "0@0..13@13 | 17@17..23@23"
    assert ds[24].attended.describe() == "0@3..13@16 | 20@20..26@26"
    assert ds[27].attended.describe() == "0@6..13@19 | 23@23..29@29"
    pc = {b.start_frame: b for b in simulate(CachePolicy.deep_forcing(score="logits"), 36)}
    assert [pc[f].action for f in (21, 24, 27, 30, 33)] == ["compress", "append", "compress", "append", "compress"]
    assert pc[21].attended.describe() == "0@5..9@14 | topc x2 | 20@20..23@23"
    assert pc[27].attended.describe().startswith("0@11..9@20 |")
    assert pc[33].attended.describe().startswith("0@17..9@26 |")
    assert [len(pc[f].attended) for f in range(21, 36, 3)] == [16, 19, 16, 19, 16]
    # mass mode attends to the augmented cache on the compressing pass (placement rule of section 2 applied to
    # it), then the block's other passes see the compressed cache at the release placement
    m = {b.start_frame: b for b in simulate(CachePolicy.deep_forcing(), 36)}
    assert len(m[21].attended) == 24 and m[21].attended.describe().startswith("0@-3..9@6 | 10@10..23@23")
    assert m[21].after.describe() == pc[21].attended.describe()
    assert len(m[27].attended) == 22 and m[27].attended.describe().startswith("0@5..9@14 | topc x2 |")
    assert m[27].after.describe() == pc[27].attended.describe()


def test_plan_pass_rejects_bad_start_frames_and_is_pure():
    p = CachePolicy.deep_sink()
    s0 = ScheduleState()
    plan = plan_pass(p, s0, 0)
    assert s0 == ScheduleState() and plan.action == "append" and plan.state.frames == 3
    assert plan_pass(p, plan.state, 0).action == "overwrite"
    for bad in (1, 2):
        with pytest.raises(ValueError, match="neither the current block's start"):
            plan_pass(p, plan.state, bad)
    with pytest.raises(ValueError, match="start_frame"):
        plan_pass(p, s0, -3)
    with pytest.raises(ValueError):
        plan_pass(p, s0, 1.0)
    assert plan_pass(p, plan.state, 9).action == "append"  # a jump forward is a new block


# ---------------------------------------------------------------------------------------------- brute force
class ReleaseModel:
    """The release's rules written out plainly, one slot list per batch element: a slot is (frame, token).

    Independent of the engine: no plans, no tensors. ``value(b, frame, tok)`` is the Top-C score of a token
    (the test makes the engine's logit score proportional to it)."""

    def __init__(self, pol: CachePolicy, n: int, B: int, value):
        self.p, self.n, self.B, self.value = pol, n, B, value
        self.slots: List[List[Tuple[int, int]]] = [[] for _ in range(B)]
        self.reuse: List[Dict[Tuple[int, int], int]] = [{} for _ in range(B)]
        self.sink_start: Optional[int] = None
        self.compressed = False

    def new_block(self, f0: int) -> None:
        p, n = self.p, self.n
        F = p.block_frames
        new = [(f0 + i, t) for i in range(F) for t in range(n)]
        frames = len(self.slots[0]) // n
        g = F if p.sink_gap is None else p.sink_gap
        S = p.sink_frames * n
        if p.kind == "full" or frames + F <= p.window_frames:
            for b in range(self.B):
                self.slots[b] = self.slots[b] + new
        elif p.kind == "deep_forcing":
            R, C = p.recent_frames * n, p.topc_frames * n
            for b in range(self.B):
                aug = self.slots[b] + new
                cand = aug[S:len(aug) - R]
                best = sorted(cand, key=lambda s: -self.value(b, *s))
                cap = p.topc_max_reuse
                ok = [s for s in best if cap is None or self.reuse[b].get(s, 0) < cap]
                chosen = (ok + [s for s in best if s not in ok])[:C]
                for s in chosen:
                    self.reuse[b][s] = self.reuse[b].get(s, 0) + 1
                self.slots[b] = aug[:S] + [s for s in cand if s in chosen] + aug[len(aug) - R:]
            self.sink_start = f0 + F - p.budget_frames - g
            self.compressed = True
        else:
            evict = (frames + F - p.window_frames) * n
            for b in range(self.B):
                self.slots[b] = self.slots[b][:S] + self.slots[b][S + evict:] + new
            if p.rephase_sink:
                self.sink_start = f0 + F - p.window_frames - g

    def positions(self, b: int) -> List[int]:
        p, n = self.p, self.n
        S, C = p.sink_frames * n, (p.topc_frames * n if self.compressed else 0)
        out = []
        for i, (f, _) in enumerate(self.slots[b]):
            if i < S and self.sink_start is not None:
                out.append(self.sink_start + f)  # the stream starts at frame 0: sink frame i at sink_start + i
            elif S <= i < S + C and p.unify_topc_rope:
                out.append(self.sink_start + i // n)
            else:
                out.append(f)
        return out


@st.composite
def policies(draw):
    F = draw(st.integers(1, 4))
    W = draw(st.integers(F, F + 12))
    # deep_forcing (the intricate one) first and twice: hypothesis shrinks towards the first choice
    kind = draw(st.sampled_from(["deep_forcing", "deep_sink", "deep_forcing", "sliding", "frame_sink", "full"]))
    gap = draw(st.one_of(st.none(), st.integers(0, 4)))
    if kind == "full":
        return CachePolicy.full(block_frames=F)
    if kind == "sliding":
        return CachePolicy.sliding(W, block_frames=F)
    if kind == "deep_forcing":
        W = max(W, F + 1)
        S = draw(st.integers(1, W - F))
        R = draw(st.integers(F, W - S))
        N = draw(st.integers(S + R, W))
        score = draw(st.sampled_from(["logits", "logits", "mass"])) if R <= 2 * F else "logits"
        return CachePolicy.deep_forcing(W, S, N, R, score=score,
                                        topc_max_reuse=draw(st.one_of(st.integers(1, 3), st.none())),
                                        unify_topc_rope=draw(st.booleans()), sink_gap=gap, block_frames=F)
    if W - F < 1:
        W = F + 1
    S = draw(st.integers(1, W - F))
    if kind == "frame_sink":
        return CachePolicy.frame_sink(W, S, block_frames=F)
    return CachePolicy.deep_sink(W, S, sink_gap=gap, block_frames=F)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(policy=CachePolicy.deep_forcing(10, 2, 8, 4, score="logits", topc_max_reuse=1), n=1, passes=1, seed=3)
@example(policy=CachePolicy.deep_forcing(7, 1, 7, 2, score="mass", topc_max_reuse=1, unify_topc_rope=True,
                                         sink_gap=0, block_frames=1), n=2, passes=2, seed=0)
@given(policy=policies(), n=st.integers(1, 2), passes=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_engine_matches_brute_force_release_model(policy, n, passes, seed):
    B, H, Hkv, D = 2, 2, 1, 16
    blocks = 100 if policy.kind != "full" else 30
    F, Lb = policy.block_frames, policy.block_frames * n
    max_frame = blocks * F
    # distinct Top-C scores per (batch, frame, token): a permutation, so the model's order is unambiguous
    g = torch.Generator().manual_seed(seed)
    table = (torch.randperm(B * max_frame * n, generator=g).view(B, max_frame, n).float() + 1) / 1024

    def value(b, f, t):
        return float(table[b, f, t])

    model = ReleaseModel(policy, n, B, value)
    cache = StreamingKVCache(policy, num_layers=1, batch_size=B, num_heads=H, head_dim=D, tokens_per_frame=n,
                             rope=RopeSpec.wan(D), dtype=torch.float32, num_kv_heads=Hkv)
    layer = cache.layers[0]
    sim = simulate(policy, blocks * F, tokens_per_frame=n)
    # queries along channel 0 make the release logit score of token j proportional to k[j, :, 0]
    q = torch.zeros(B, Lb, H, D)
    q[..., 0] = 1.0
    tok = torch.arange(n).repeat(F)
    for bi in range(blocks):
        f0 = bi * F
        frame_ids = f0 + torch.arange(F).repeat_interleave(n)
        k = torch.zeros(B, Lb, Hkv, D)
        k[..., 0] = table[:, frame_ids, tok][..., None]
        v = torch.zeros(B, Lb, Hkv, D)
        v[..., 0] = (frame_ids * n + tok).float()[None, :, None]  # each token's identity travels in its value
        model.new_block(f0)
        for _ in range(passes):
            layer.attend(q, k, v, start_frame=f0)
        frames, pos = layer.frames(), layer.positions()
        ident = layer.values()[..., 0, 0].long()
        L = len(layer)
        if policy.kind != "full":
            assert L <= policy.window_frames * n  # the attended cache never exceeds the window
            assert layer.storage.k.shape[1] == (policy.window_frames + F) * n  # storage never reallocated
        # mass mode: the picks come from attention mass, which the model cannot know; all else must agree
        keep = [kd != "topc" or policy.score != "mass" for kd in layer.kinds()]
        for b in range(B):
            want = model.slots[b]
            assert len(want) == L
            sel = lambda xs: [x for x, k_ in zip(xs, keep) if k_]  # noqa: E731
            assert sel(ident[b].tolist()) == sel([f * n + t for f, t in want]), (bi, b)
            assert sel(frames[b].tolist()) == sel([f for f, _ in want])
            assert sel(pos[b].tolist()) == sel(model.positions(b)), (bi, b)
            if not all(keep):  # Top-C picks are distinct tokens of candidate frames, in slot order
                picks = [x for x, k_ in zip(ident[b].tolist(), keep) if not k_]
                assert picks == sorted(set(picks)) and all(policy.sink_frames * n <= x < (f0 + F) * n
                                                           for x in picks)
        # the pure schedule agrees on everything but the data-dependent Top-C picks
        after = sim[bi].after
        assert layer.kinds() == after.kinds
        assert [f for f, kd in zip(frames[0].tolist(), after.kinds) if kd != "topc"] == \
               [f for f, kd in zip(after.frames, after.kinds) if kd != "topc"]
        total = L // n
        S = policy.sink_frames
        if S and total >= S:  # the sink is always there, whole
            assert (frames[:, :S * n] == torch.arange(S).repeat_interleave(n)).all()
        recent = min(policy.recent_frames or total, total - S if total > S else total)
        # the newest frames are always there, in order, at their own positions
        newest = torch.arange(f0 + F - recent, f0 + F).repeat_interleave(n)
        assert (frames[:, L - recent * n:] == newest).all() and (pos[:, L - recent * n:] == newest).all()


def test_module_docstring_examples_run():
    """The two snippets of the schedule module's docstring (what `deepforcing trace` users copy) still work."""
    import re

    import deepforcing_kernels.schedule as schedule

    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", schedule.__doc__)
    assert len(blocks) == 2
    env = {"torch": torch, "StreamingKVCache": StreamingKVCache, "RopeSpec": RopeSpec,
           "policy": CachePolicy.deep_forcing(score="logits"), "print": lambda *a: None}
    for b in blocks:
        exec("\n".join(line[4:] for line in b.splitlines()), env)
    assert env["layer"].kinds().count("topc") == 2


def test_simulate_unified_topc_positions_and_token_counts():
    p = CachePolicy.deep_forcing(score="logits", unify_topc_rope=True, sink_gap=0)
    blk = {b.start_frame: b for b in simulate(p, 24, tokens_per_frame=2)}[21]
    # gap 0: sink 0@8..9@17, Top-C (2 frames = 4 tokens) at 18..19, recent 20..23: one contiguous run
    assert blk.attended.describe() == "0@8..9@17 | topc x4@18..19 | 20@20..23@23"
    assert blk.attended.kinds.count("topc") == 4 and len(blk.attended) == 32


# ------------------------------------------------------------------------------------------------ short first block
@pytest.mark.parametrize("name", ["full", "sliding", "frame_sink", "deep_sink", "deep_forcing", "deep_forcing_logits"])
def test_a_short_first_block_runs_through_every_policy(name):
    """An image prefix is its own 1-frame first block (Self-Forcing's independent_first_frame); then whole blocks."""
    from deepforcing_kernels.presets import make_policy

    policy = make_policy(name)
    st = ScheduleState()
    plan = plan_pass(policy, st, 0, frames=1)
    assert plan.action == "append" and plan.state.frames == 1 and plan.state.first_block_frames == 1
    assert plan_pass(policy, plan.state, 0, frames=1).action == "overwrite"
    with pytest.raises(ValueError, match="current block"):
        plan_pass(policy, plan.state, 0)  # a pass over the 1-frame block must repeat its length
    st, f0, held = plan.state, 1, []
    for _ in range(40):
        plan = plan_pass(policy, st, f0)
        st, f0 = plan.state, f0 + 3
        held.append(st.frames)
    assert max(held) <= (policy.window_frames if name != "full" else 10 ** 9)
    assert st.first_block_frames == 1 and ScheduleState.from_dict(st.to_dict()) == st
    with pytest.raises(ValueError, match="first block"):
        plan_pass(policy, st, f0, frames=2)


def test_a_short_first_block_on_tensors_keeps_the_image_as_sink():
    torch.manual_seed(0)
    policy = CachePolicy.deep_forcing()
    cache = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=2, head_dim=16, tokens_per_frame=2,
                             rope=RopeSpec.wan(16), dtype=torch.float32)
    layer = cache.layers[0]
    q, k, v = (torch.randn(1, 2, 2, 16) for _ in range(3))
    layer.attend(q, k, v, start_frame=0)
    image_key = layer.keys()[:, :2].clone()
    for f0 in range(1, 61, 3):
        q, k, v = (torch.randn(1, 6, 2, 16) for _ in range(3))
        layer.attend(q, k, v, start_frame=f0)
    assert layer.frames()[0, :2].tolist() == [0, 0] and torch.equal(layer.keys()[:, :2], image_key)
    assert layer.kinds()[:2] == ("sink", "sink") and layer.state.compressed
