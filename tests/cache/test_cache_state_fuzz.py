"""StreamingKVCache.load_state_dict rejects corrupted values inside a valid structure and loads all layers or none.

hypothesis draws a policy, a geometry and a stream (with jumps), takes the state dict, corrupts ONE value in one
layer (the schedule's numbers, the compressed flag, the sink placement, NaN / inf / negative tensor values, slot
frames that do not match the schedule, reuse counts) and loads it into a cache busy with its own stream: it must
raise ValueError and leave that cache's state exactly as it was. Every uncorrupted state must load (no false
rejections), so the checks cannot simply refuse everything.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support import policies, state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def make_cache(policy, n, B):
    return StreamingKVCache(policy, num_layers=2, batch_size=B, num_heads=2, head_dim=D, tokens_per_frame=n,
                            rope=RopeSpec.wan(D), dtype=torch.float32)


def play(cache, blocks, seed, first=0, gaps=()):
    g = torch.Generator().manual_seed(seed)
    F, n, B = cache.policy.block_frames, cache.tokens_per_frame, cache.batch_size
    f0 = first
    for i in range(blocks):
        for _ in range(2):  # a new block, then a pass over it
            for layer in cache.layers:
                q, k, v = torch.randn(3, B, F * n, 2, D, generator=g).unbind(0)
                layer.attend(q, k, v, start_frame=f0)
        f0 += F + (gaps[i] if i < len(gaps) else 0)


def _layer_sched(sd, li):
    return sd["layers"][li]["schedule"]


def _kinds(policy, sched, n):
    S = min(policy.sink_frames, sched["frames"]) * n
    C = policy.topc_frames * n if sched["compressed"] else 0
    return S, C


# each corruption: (name, applies(policy, layer_state, n) -> bool, apply(layer_state, policy, n) -> None)
def _set(key, value):
    def f(d, p, n):
        d["schedule"][key] = value
    return f


def _tensor(name, fn):
    def f(d, p, n):
        t = d[name].clone()
        fn(t, d, p, n)
        d[name] = t
    return f


def _has(name):
    return lambda p, d, n: d[name] is not None and d[name].numel() > 0


def _started(p, d, n):
    return d["schedule"]["stream_start"] is not None


def _swap_frames(t, d, p, n):
    row = t[0]
    i = int(torch.nonzero(row != row[0])[0]) if bool((row != row[0]).any()) else 0
    row[0], row[i] = row[i].clone(), row[0].clone()


def _sink_reuse(t, d, p, n):
    t[0, 0] = 3


def _topc_reuse_zero(t, d, p, n):
    S, C = _kinds(p, d["schedule"], n)
    t[0, S] = 0


def _shift_sink_frames(t, d, p, n):
    t[:, 0] += 1


CORRUPTIONS = [
    ("stream_start 10**30", _started, _set("stream_start", 10 ** 30)),
    ("stream_start -1", _started, _set("stream_start", -1)),
    ("block_start -100", _started, _set("block_start", -100)),
    ("block_start +1000", _started, lambda d, p, n: d["schedule"].update(block_start=d["schedule"]["block_start"]
                                                                            + 1000)),
    ("compressed flipped", lambda p, d, n: _started(p, d, n) and p.compresses,
     lambda d, p, n: d["schedule"].update(compressed=not d["schedule"]["compressed"])),
    ("sink_start None where required", lambda p, d, n: p.compresses and d["schedule"]["compressed"],
     _set("sink_start", None)),
    ("sink_start set without a roll", lambda p, d, n: _started(p, d, n) and p.rephase_sink
     and d["schedule"]["sink_start"] is None and not (not p.compresses and d["schedule"]["frames"] ==
                                                      p.window_frames), _set("sink_start", 0)),
    ("sink_start far off", lambda p, d, n: d["schedule"]["sink_start"] is not None,
     lambda d, p, n: d["schedule"].update(sink_start=d["schedule"]["sink_start"] + 1000)),
    ("NaN key", _has("k"), _tensor("k", lambda t, d, p, n: t.view(-1).__setitem__(-1, float("nan")))),
    ("inf value", _has("v"), _tensor("v", lambda t, d, p, n: t.view(-1).__setitem__(0, float("inf")))),
    ("NaN mass", _has("mass"), _tensor("mass", lambda t, d, p, n: t.view(-1).__setitem__(0, float("nan")))),
    ("negative mass", _has("mass"), _tensor("mass", lambda t, d, p, n: t.view(-1).__setitem__(-1, -1.0))),
    ("NaN query sums", _has("qbuf"), _tensor("qbuf", lambda t, d, p, n: t.view(-1).__setitem__(0, float("nan")))),
    ("negative frame", _has("frames"), _tensor("frames", lambda t, d, p, n: t.view(-1).__setitem__(0, -1))),
    ("frame beyond the stream", _has("frames"),
     _tensor("frames", lambda t, d, p, n: t.view(-1).__setitem__(-1, d["schedule"]["block_start"] + 50))),
    ("frames out of order", lambda p, d, n: _has("frames")(p, d, n) and bool((d["frames"][0] != d["frames"][0, 0])
                                                                               .any()),
     _tensor("frames", _swap_frames)),
    ("frames shifted by one", _has("frames"), _tensor("frames", lambda t, d, p, n: t.add_(1))),
    ("sink frame split", lambda p, d, n: _has("frames")(p, d, n) and n > 1 and p.sink_frames > 0,
     _tensor("frames", _shift_sink_frames)),
    ("negative reuse", _has("reuse"), _tensor("reuse", lambda t, d, p, n: t.view(-1).__setitem__(0, -1))),
    ("reuse on a sink slot", lambda p, d, n: _has("reuse")(p, d, n) and p.sink_frames > 0, _tensor("reuse", _sink_reuse)),
    ("Top-C pick never reused", lambda p, d, n: _has("reuse")(p, d, n) and d["schedule"]["compressed"],
     _tensor("reuse", _topc_reuse_zero)),
    ("a meta tensor", _has("k"), lambda d, p, n: d.update(k=torch.empty_like(d["k"], device="meta"))),
]


@st.composite
def cases(draw):
    policy = draw(policies())
    n = draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    blocks = draw(st.integers(1, 14))
    gaps = draw(st.lists(st.sampled_from([0, 0, 0, 2]), max_size=blocks))
    first = draw(st.sampled_from([0, 0, 4]))
    which = draw(st.sampled_from(range(len(CORRUPTIONS))))
    layer = draw(st.sampled_from([0, 1]))
    return policy, n, B, blocks, gaps, first, which, layer, draw(st.integers(0, 2 ** 31 - 1))


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=cases())
def test_one_corrupted_value_is_rejected_and_nothing_changes(case):
    policy, n, B, blocks, gaps, first, which, li, seed = case
    src = make_cache(policy, n, B)
    play(src, blocks, seed, first, gaps)
    sd = src.state_dict()

    fresh = make_cache(policy, n, B)
    fresh.load_state_dict(sd)  # the real state always loads
    assert state_equal(fresh.state_dict(), sd)

    name, applies, corrupt = CORRUPTIONS[which]
    bad = copy.deepcopy(sd)
    assume(applies(policy, bad["layers"][li], n))
    corrupt(bad["layers"][li], policy, n)
    assume(name == "a meta tensor" or not state_equal(bad, sd))

    dst = make_cache(policy, n, B)
    play(dst, 2, seed + 1)
    before = dst.state_dict()
    with pytest.raises(ValueError):
        dst.load_state_dict(bad)
    assert state_equal(dst.state_dict(), before), f"{name}: a rejected state changed the cache"


# ---------------------------------------------------------------------------------------------- the issue's list
POLICY = CachePolicy.deep_forcing(score="mass")


@pytest.fixture(scope="module")
def compressed_state():
    src = make_cache(POLICY, 2, 2)
    play(src, 9, 0)  # 27 frames: compressed at 21, sink re-phased, Top-C picked
    sd = src.state_dict()
    assert sd["layers"][1]["schedule"]["compressed"] and sd["layers"][1]["schedule"]["sink_start"] is not None
    return sd


ISSUE_CASES = ["stream_start 10**30", "block_start -100", "compressed flipped", "sink_start None where required",
               "NaN key", "NaN mass", "negative frame", "negative reuse", "frames shifted by one", "a meta tensor"]


@pytest.mark.parametrize("name", ISSUE_CASES)
def test_the_issue_list_is_rejected_in_the_last_layer(name, compressed_state):
    _, applies, corrupt = next(c for c in CORRUPTIONS if c[0] == name)
    bad = copy.deepcopy(compressed_state)
    assert applies(POLICY, bad["layers"][1], 2)
    corrupt(bad["layers"][1], POLICY, 2)  # the LAST layer: the first must not be loaded before it is checked
    dst = make_cache(POLICY, 2, 2)
    play(dst, 3, 5)
    before = dst.state_dict()
    with pytest.raises(ValueError, match="layer 1"):
        dst.load_state_dict(bad)
    assert state_equal(dst.state_dict(), before)
    dst.load_state_dict(compressed_state)  # and the good one still loads afterwards
    assert state_equal(dst.state_dict(), compressed_state)
