"""CachePolicy: the API constructors, defaults, validation (every bad configuration names its reason)."""
import pickle

import pytest

from deepforcing_kernels import CachePolicy
from deepforcing_kernels.policy import ArgumentTypeError


def test_defaults_match_the_api():
    assert CachePolicy.full().block_frames == 3
    assert CachePolicy.sliding().window_frames == 21
    fs = CachePolicy.frame_sink()
    assert (fs.window_frames, fs.sink_frames, fs.rephase_sink) == (21, 3, False)
    ds = CachePolicy.deep_sink()
    assert (ds.window_frames, ds.sink_frames, ds.sink_gap, ds.rephase_sink) == (21, 14, None, True)
    df = CachePolicy.deep_forcing()
    assert (df.window_frames, df.sink_frames, df.budget_frames, df.recent_frames) == (21, 10, 16, 4)
    assert (df.score, df.topc_max_reuse, df.unify_topc_rope, df.sink_gap) == ("mass", 7, False, None)
    assert df.topc_frames == 2 and df.gap_frames == 3 and df.compresses
    assert CachePolicy.deep_sink(sink_gap=0).gap_frames == 0


def test_policies_are_frozen_plain_data():
    p = CachePolicy.deep_forcing(score="logits")
    with pytest.raises(Exception):
        p.sink_frames = 3  # frozen dataclass
    assert CachePolicy.from_dict(p.to_dict()) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert all(isinstance(v, (int, str, bool, type(None))) for v in p.to_dict().values())
    assert hash(p) == hash(CachePolicy.deep_forcing(score="logits"))


@pytest.mark.parametrize("block_frames", [1, 2, 3, 5])
def test_every_constructor_takes_block_frames(block_frames):
    for make in (CachePolicy.full, CachePolicy.sliding, CachePolicy.frame_sink):
        assert make(block_frames=block_frames).block_frames == block_frames
    assert CachePolicy.deep_sink(window_frames=21, sink_frames=10, block_frames=block_frames).block_frames \
        == block_frames
    p = CachePolicy.deep_forcing(recent_frames=max(4, block_frames), budget_frames=16, score="logits",
                                 block_frames=block_frames)
    assert p.block_frames == block_frames


# (constructor, kwargs, words the message must contain)
BAD = [
    (CachePolicy.sliding, dict(window_frames=0), "window_frames"),
    (CachePolicy.sliding, dict(window_frames=2, block_frames=3), "at least one block"),
    (CachePolicy.full, dict(block_frames=0), "block_frames"),
    (CachePolicy.frame_sink, dict(window_frames=21, sink_frames=21), "sink_frames"),
    (CachePolicy.frame_sink, dict(window_frames=21, sink_frames=0), "sink_frames"),
    (CachePolicy.deep_sink, dict(window_frames=21, sink_frames=22), "must be < window_frames"),
    (CachePolicy.deep_sink, dict(window_frames=21, sink_frames=19), "sink_frames + block_frames"),
    (CachePolicy.deep_sink, dict(sink_gap=-1), "sink_gap"),
    (CachePolicy.deep_forcing, dict(sink_frames=21), "sink_frames"),
    (CachePolicy.deep_forcing, dict(budget_frames=13), "sink_frames + recent_frames"),
    (CachePolicy.deep_forcing, dict(budget_frames=22), "budget_frames (22) must be <= window_frames"),
    (CachePolicy.deep_forcing, dict(recent_frames=2), "recent_frames (2) must be >= block_frames"),
    (CachePolicy.deep_forcing, dict(score="softmax"), "score"),
    (CachePolicy.deep_forcing, dict(topc_max_reuse=0), "topc_max_reuse"),
    (CachePolicy.deep_forcing, dict(recent_frames=7, budget_frames=17), "or a multiple of it"),
    (CachePolicy.deep_forcing, dict(sink_gap=-2), "sink_gap"),
]


@pytest.mark.parametrize("make, kwargs, words", BAD)
def test_bad_configurations_raise_value_error_with_reason(make, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
                       .replace("*", r"\*")):
        make(**kwargs)


@pytest.mark.parametrize("make, kwargs", [
    (CachePolicy.sliding, dict(window_frames=21.0)),
    (CachePolicy.sliding, dict(window_frames="21")),
    (CachePolicy.deep_sink, dict(sink_frames=True)),
    (CachePolicy.deep_forcing, dict(budget_frames=None)),
    (CachePolicy.deep_forcing, dict(topc_max_reuse=2.5)),
    (CachePolicy.deep_forcing, dict(unify_topc_rope=1)),
    (CachePolicy.full, dict(block_frames=None)),
])
def test_bad_types_raise_value_error(make, kwargs):
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    # a wrong kind of thing is also a TypeError, as elsewhere in the package
    assert isinstance(info.value, (TypeError, ValueError))


def test_wrong_kind_is_both_type_and_value_error():
    with pytest.raises(TypeError):
        CachePolicy.sliding(window_frames=1.5)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


def test_fields_that_do_not_apply_are_rejected():
    with pytest.raises(ValueError, match="does not apply"):
        CachePolicy("sliding", window_frames=21, sink_frames=3)
    with pytest.raises(ValueError, match="does not apply"):
        CachePolicy("frame_sink", window_frames=21, sink_frames=3, rephase_sink=True)
    with pytest.raises(ValueError, match="does not apply"):
        CachePolicy("deep_sink", window_frames=21, sink_frames=3, rephase_sink=True, budget_frames=10)
    with pytest.raises(ValueError, match="kind"):
        CachePolicy("rolling", window_frames=21)
    with pytest.raises(ValueError, match="unknown policy fields"):
        CachePolicy.from_dict({**CachePolicy.sliding().to_dict(), "extra": 1})


def test_edge_configurations_are_allowed():
    # no Top-C room at all (budget == sink + recent), budget == window (compress every block), no reuse cap
    assert CachePolicy.deep_forcing(budget_frames=14, score="logits").topc_frames == 0
    assert CachePolicy.deep_forcing(budget_frames=21).budget_frames == 21
    assert CachePolicy.deep_forcing(topc_max_reuse=None).topc_max_reuse is None
    assert CachePolicy.deep_sink(window_frames=21, sink_frames=18).sink_frames == 18
    assert CachePolicy.deep_forcing(recent_frames=8, budget_frames=18, score="logits").recent_frames == 8
