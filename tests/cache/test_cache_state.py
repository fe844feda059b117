"""StreamingKVCache state and failure behaviour: state_dict round trips (torch.save / torch.load weights_only)
resume bit for bit; bad configurations, bad calls and foreign state dicts raise ValueError and change nothing;
storage is never reallocated."""
import io
import warnings

import pytest
import torch

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache

warnings.filterwarnings("ignore", message=".*C\\+\\+ CPU kernel is not built.*")


pytestmark = pytest.mark.usefixtures("one_thread")


POLICIES = {
    "full": CachePolicy.full(),
    "sliding": CachePolicy.sliding(window_frames=8),
    "frame_sink": CachePolicy.frame_sink(window_frames=8, sink_frames=2),
    "deep_sink": CachePolicy.deep_sink(window_frames=8, sink_frames=3),
    "pc_logits": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=7, recent_frames=4,
                                          score="logits", topc_max_reuse=1),
    "pc_mass": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=7, recent_frames=4,
                                        topc_max_reuse=1, unify_topc_rope=True),
}


def make(policy, layers=2, dtype=torch.bfloat16, **kw):
    args = dict(num_layers=layers, batch_size=2, num_heads=2, head_dim=16, tokens_per_frame=2,
                rope=RopeSpec.wan(16), dtype=dtype, num_kv_heads=1)
    args.update(kw)
    return StreamingKVCache(policy, **args)


def inputs(cache, blocks, passes=3, seed=0):
    """[(f0, q, k, v)] for every pass of every block, in the cache's dtype."""
    g = torch.Generator().manual_seed(seed)
    Lb = cache.block_tokens
    out = []
    for bi in range(blocks):
        for _ in range(passes):
            q = torch.randn(cache.batch_size, Lb, cache.num_heads, cache.head_dim, generator=g)
            k = torch.randn(cache.batch_size, Lb, cache.num_kv_heads, cache.head_dim, generator=g)
            v = torch.randn(cache.batch_size, Lb, cache.num_kv_heads, cache.head_dim, generator=g)
            out.append((bi * cache.policy.block_frames, *(t.to(cache.dtype) for t in (q, k, v))))
    return out


def run(cache, passes):
    outs = []
    for f0, q, k, v in passes:
        outs.append(torch.stack([layer.attend(q, k, v, start_frame=f0) for layer in cache.layers]))
    return outs


def assert_same_state(a, b):
    """Two state dicts are identical: same plain values, bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b and type(a) is type(b)


def only_plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and only_plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(only_plain(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, int, float, str, bool))


# ---------------------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("cut", [4 * 3, 5 * 3 + 1])  # after a whole block / between two passes of a block
def test_state_dict_round_trip_resumes_bit_for_bit(name, cut):
    policy = POLICIES[name]
    passes = inputs(make(policy), blocks=9)
    reference = run(make(policy), passes)
    first = make(policy)
    run(first, passes[:cut])
    buf = io.BytesIO()
    sd = first.state_dict()
    assert only_plain(sd)
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    resumed = make(policy)
    run(resumed, inputs(resumed, blocks=2, seed=7))  # some other stream first: load must replace it entirely
    resumed.load_state_dict(loaded)
    assert_same_state(resumed.state_dict(), sd)
    rest = run(resumed, passes[cut:])
    for got, want in zip(rest, reference[cut:]):
        assert torch.equal(got, want)
    # and the original object continues identically too
    assert all(torch.equal(g, w) for g, w in zip(run(first, passes[cut:]), reference[cut:]))


def test_mass_mode_carried_mass_is_part_of_the_state():
    policy = POLICIES["pc_mass"]
    cache = make(policy)
    run(cache, inputs(cache, blocks=3))  # 9 frames: the next block compresses, so the last pass carried mass
    sd = cache.state_dict()
    m = sd["layers"][0]["mass"]
    assert m is not None and m.shape == (2, 18) and float(m.abs().sum()) > 0
    sd["layers"][0]["mass"] = torch.zeros_like(m)  # a different carried mass changes what is compressed away
    other = make(policy)
    other.load_state_dict(sd)
    nxt = inputs(cache, blocks=4, seed=3)[9:10]
    run(cache, nxt)
    run(other, nxt)
    assert not torch.equal(cache.layers[0].values(), other.layers[0].values())


@pytest.mark.parametrize("change", [
    dict(policy=CachePolicy.deep_sink(window_frames=8, sink_frames=2)),
    dict(policy=CachePolicy.sliding(window_frames=8)),
    dict(layers=3), dict(batch_size=1), dict(num_heads=4), dict(num_kv_heads=2), dict(tokens_per_frame=1),
    dict(dtype=torch.float32), dict(rope=RopeSpec.wan(16, theta=500.0)), dict(rope=RopeSpec.gptj(16)),
])
def test_load_state_dict_from_another_policy_or_geometry_raises_and_changes_nothing(change):
    policy = POLICIES["deep_sink"]
    src_policy = change.pop("policy", policy)
    src = make(src_policy, **change)
    run(src, inputs(src, blocks=4))
    dst = make(policy)
    run(dst, inputs(dst, blocks=5, seed=1))
    before = dst.state_dict()
    with pytest.raises(ValueError):
        dst.load_state_dict(src.state_dict())
    assert_same_state(dst.state_dict(), before)


def test_malformed_state_raises_and_changes_nothing():
    policy = POLICIES["pc_logits"]
    cache = make(policy)
    run(cache, inputs(cache, blocks=5))
    before = cache.state_dict()
    bad_states = []
    sd = cache.state_dict()
    sd["layers"][1]["k"] = sd["layers"][1]["k"][:, :-1]  # only the last layer is bad: layer 0 must not load
    bad_states.append(sd)
    sd = cache.state_dict()
    sd["layers"][0]["reuse"] = None
    bad_states.append(sd)
    sd = cache.state_dict()
    sd["layers"][0]["schedule"] = dict(sd["layers"][0]["schedule"], frames=99)
    bad_states.append(sd)
    sd = cache.state_dict()
    sd["layers"][0]["schedule"] = dict(sd["layers"][0]["schedule"], block_start=None)
    bad_states.append(sd)
    sd = cache.state_dict()
    sd["layers"] = sd["layers"][:1]
    bad_states.append(sd)
    bad_states += [{}, {"format": "something else"}, None]
    other = make(policy)
    run(other, inputs(other, blocks=7, seed=5))
    for bad in bad_states:
        snapshot = other.state_dict()
        with pytest.raises(ValueError):
            other.load_state_dict(bad)
        assert_same_state(other.state_dict(), snapshot)
    assert_same_state(cache.state_dict(), before)


# ---------------------------------------------------------------------------------------------- bad calls
def test_failed_attend_calls_leave_the_cache_unchanged():
    policy = POLICIES["pc_mass"]
    cache = make(policy, layers=1)
    layer = cache.layers[0]
    run(cache, inputs(cache, blocks=4))
    q, k, v = inputs(cache, blocks=1)[0][1:]
    bad = [
        (dict(q=q[:, :-1]), "q must have shape"),
        (dict(k=k[:, :, :, :8]), "k must have shape"),
        (dict(v=torch.cat([v, v], 2)), "v must have shape"),
        (dict(q=q[:1]), "q must have shape"),
        (dict(q=q.float()), "dtype"),
        (dict(k=k.half()), "dtype"),
        (dict(v=v.tolist()), "torch.Tensor"),
        (dict(start_frame=10), "neither the current block's start"),  # inside the current block (9..11)
        (dict(start_frame=3), "neither the current block's start"),  # backwards
        (dict(start_frame=-3), "start_frame"),
        (dict(start_frame=12.0), "start_frame"),
        (dict(start_frame=None), "start_frame"),
        (dict(k=k.clone().index_fill_(1, torch.tensor([3]), float("nan"))), "k contain"),
        (dict(q=q.clone().index_fill_(2, torch.tensor([1]), float("inf"))), "q contain"),
        (dict(v=v.clone().index_fill_(0, torch.tensor([1]), -float("inf"))), "v contain"),
    ]
    for change, words in bad:
        before = cache.state_dict()
        args = dict(q=q, k=k, v=v, start_frame=12)
        args.update(change)
        with pytest.raises(ValueError, match=words):
            layer.attend(args["q"], args["k"], args["v"], start_frame=args["start_frame"])
        assert_same_state(cache.state_dict(), before)
    layer.attend(q, k, v, start_frame=12)  # the good call still works afterwards (it compresses)
    assert layer.state.block_start == 12


@pytest.mark.parametrize("kwargs, words", [
    (dict(policy=CachePolicy.deep_sink(), rope=None), "rope"),
    (dict(policy=CachePolicy.deep_forcing(), rope=None), "rope"),
    (dict(rope=RopeSpec.wan(32)), "head_dim"),
    (dict(rope="wan"), "RopeSpec"),
    (dict(num_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(batch_size=1.0), "batch_size"),
    (dict(tokens_per_frame=0), "tokens_per_frame"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(backend="cuda"), "backend"),
    (dict(reserve_frames=10), "reserve_frames"),
    (dict(policy="deep_sink"), "CachePolicy"),
    (dict(device="nonsense"), "device"),
    pytest.param(dict(device="cuda"), "not available", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                  reason="CUDA is here")),
    (dict(backend="triton"), "backend"),
])
def test_bad_cache_configurations_raise_value_error(kwargs, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # backend="triton" on CPU needs the interpreter
    args = dict(policy=CachePolicy.deep_sink(), num_layers=1, batch_size=2, num_heads=2, head_dim=16,
                tokens_per_frame=2, rope=RopeSpec.wan(16))
    args.update(kwargs)
    policy = args.pop("policy")
    with pytest.raises(ValueError, match=words):
        StreamingKVCache(policy, **args)


def test_rope_may_be_omitted_when_nothing_is_rephased():
    for policy in (CachePolicy.full(), CachePolicy.sliding(), CachePolicy.frame_sink()):
        cache = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=2, head_dim=16, tokens_per_frame=1,
                                 rope=None, dtype=torch.float32)
        run(cache, inputs(cache, blocks=9, passes=1))
        assert cache.layers[0].attention_args() == {"sink_len": 0, "sink_shift": 0, "key_shift": None}


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "full"])
def test_storage_is_preallocated_and_never_reallocated(name):
    policy = POLICIES[name]
    cache = make(policy, layers=1)
    layer = cache.layers[0]
    ptrs = (layer.storage.k.data_ptr(), layer.storage.v.data_ptr())
    cap = layer.storage.k.shape[1]
    assert cap == (policy.window_frames + policy.block_frames) * cache.tokens_per_frame
    run(cache, inputs(cache, blocks=15, passes=2))
    assert (layer.storage.k.data_ptr(), layer.storage.v.data_ptr()) == ptrs and layer.storage.k.shape[1] == cap


def test_finite_check_can_be_turned_off():
    cache = make(POLICIES["sliding"], layers=1, check_finite=False)
    q, k, v = inputs(cache, blocks=1)[0][1:]
    cache.layers[0].attend(q, k.clone().fill_(float("nan")), v, start_frame=0)  # trusted caller: no sync, no check
    assert cache.layers[0].keys().isnan().all()
    with pytest.raises(ValueError, match="check_finite"):
        make(POLICIES["sliding"], check_finite=1)


def test_a_state_with_an_unknown_top_level_key_is_refused():
    """Only format, policy, geometry and layers make a cache state: anything else is a state of something else (or
    an edited one), refused before any layer changes."""
    from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache

    cache = StreamingKVCache(CachePolicy.sliding(window_frames=6), num_layers=1, batch_size=1, num_heads=2,
                             head_dim=16, tokens_per_frame=2, rope=RopeSpec.wan(16), dtype=torch.float32)
    state = cache.state_dict()
    cache.load_state_dict(state)  # the state as saved loads
    with pytest.raises(ValueError, match="unknown keys"):
        cache.load_state_dict(dict(state, note="edited"))
