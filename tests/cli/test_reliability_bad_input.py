"""Reliability: wrong calls raise a clear ValueError / TypeError and leave everything exactly as it was.

The op's own bad-input table is tests/kernels/test_validation.py; this module covers the stateful layers on top of it:
``CacheLayer.attend`` (shapes, dtypes, mixed devices, NaN / inf, start_frame backwards or inside the block, a block
of the wrong length), ``StreamingKVCache.load_state_dict`` (another policy with the same kind, another geometry,
someone else's state, one bad layer among good ones), ``generate(resume_from=...)`` and ``deepforcing generate
--resume`` on a file that is not a run of it. After every rejected call the cache's state_dict() is compared bit for
bit with the one taken before (nothing half-written).
"""
import pytest
import torch
from support import state_equal

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache
from deepforcing_kernels.cli import main
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig

B, H, HKV, D, N = 2, 4, 2, 16, 2
ROPE = RopeSpec.wan(D)
POLICIES = {
    "sliding": CachePolicy.sliding(6, block_frames=2),
    "deep_sink": CachePolicy.deep_sink(6, 2, block_frames=2),
    "pc_mass": CachePolicy.deep_forcing(8, 2, 6, 2, block_frames=2),
    "pc_logits": CachePolicy.deep_forcing(8, 2, 6, 3, score="logits", block_frames=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only spins


def make(policy, **over):
    kw = dict(num_layers=2, batch_size=B, num_heads=H, head_dim=D, tokens_per_frame=N, rope=ROPE,
              dtype=torch.float32, num_kv_heads=HKV)
    kw.update(over)
    return StreamingKVCache(policy, **kw)


def block(cache, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lb = cache.policy.block_frames * cache.tokens_per_frame
    return tuple(torch.randn(cache.batch_size, Lb, h, cache.head_dim, generator=g).to(cache.dtype)
                 for h in (cache.num_heads, cache.num_kv_heads, cache.num_kv_heads))


def stream(cache, blocks, seed=0, passes=2):
    F = cache.policy.block_frames
    for b in range(blocks):
        for p in range(passes):
            for i, layer in enumerate(cache.layers):
                layer.attend(*block(cache, seed * 1000 + b * 10 + p + 100 * i), start_frame=b * F)


def _nan(t, where=(0, 1, 0, 3), value=float("nan")):
    t = t.clone()
    t[where] = value
    return t


# ---------------------------------------------------------------------------------------------- attend
# (id, change of (q, k, v, start_frame) given the good ones and the current block's start c, exception, words)
ATTEND_BAD = [
    ("block one frame short", lambda q, k, v, f, c: (q[:, :-N], k[:, :-N], v[:, :-N], f), ValueError,
     "shape|frames"),
    ("block one frame long", lambda q, k, v, f, c: (torch.cat([q, q[:, :N]], 1), torch.cat([k, k[:, :N]], 1),
                                                 torch.cat([v, v[:, :N]], 1), f), ValueError, "shape"),
    ("k block of another length", lambda q, k, v, f, c: (q, k[:, :-1], v, f), ValueError, "shape"),
    ("q heads", lambda q, k, v, f, c: (q[:, :, :2], k, v, f), ValueError, "shape"),
    ("kv heads", lambda q, k, v, f, c: (q, torch.cat([k, k], 2), v, f), ValueError, "shape"),
    ("head_dim", lambda q, k, v, f, c: (q[..., :8], k[..., :8], v[..., :8], f), ValueError, "shape"),
    ("batch", lambda q, k, v, f, c: (q[:1], k[:1], v[:1], f), ValueError, "shape"),
    ("3-D q", lambda q, k, v, f, c: (q[0], k, v, f), ValueError, "shape"),
    ("dtype of q", lambda q, k, v, f, c: (q.half(), k, v, f), TypeError, "dtype"),
    ("dtype of v", lambda q, k, v, f, c: (q, k, v.bfloat16(), f), TypeError, "dtype"),
    ("integer k", lambda q, k, v, f, c: (q, k.to(torch.int32), v, f), TypeError, "dtype"),
    ("list v", lambda q, k, v, f, c: (q, k, v.tolist(), f), TypeError, "Tensor"),
    ("q on another device", lambda q, k, v, f, c: (q.to("meta"), k, v, f), ValueError, "device| is on "),
    ("k on another device", lambda q, k, v, f, c: (q, k.to("meta"), v, f), ValueError, "device| is on "),
    ("start_frame backwards", lambda q, k, v, f, c: (q, k, v, c - 2), ValueError, "start_frame"),
    ("start_frame far backwards", lambda q, k, v, f, c: (q, k, v, 0), ValueError, "start_frame"),
    ("start_frame inside block", lambda q, k, v, f, c: (q, k, v, c + 1), ValueError, "start_frame"),
    ("start_frame negative", lambda q, k, v, f, c: (q, k, v, -2), ValueError, "start_frame"),
    ("start_frame float", lambda q, k, v, f, c: (q, k, v, float(f)), TypeError, "start_frame"),
    ("start_frame None", lambda q, k, v, f, c: (q, k, v, None), TypeError, "start_frame"),
    ("start_frame bool", lambda q, k, v, f, c: (q, k, v, True), TypeError, "start_frame"),
    ("start_frame str", lambda q, k, v, f, c: (q, k, v, "8"), TypeError, "start_frame"),
]
# NaN / inf are stored for later (K/V in the cache, queries in the logits buffer or the carried mass): the cache is
# where a NaN check belongs (the op may skip it on GPU for cost); one bad frame must not poison a whole video.
NONFINITE = [
    ("NaN in k", lambda q, k, v, f, c: (q, _nan(k), v, f)),
    ("NaN in v", lambda q, k, v, f, c: (q, k, _nan(v), f)),
    ("inf in k", lambda q, k, v, f, c: (q, _nan(k, value=float("inf")), v, f)),
    ("-inf in v", lambda q, k, v, f, c: (q, k, _nan(v, value=-float("inf")), f)),
    ("NaN in q", lambda q, k, v, f, c: (_nan(q), k, v, f)),
]


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("change,exc,words", [c[1:] for c in ATTEND_BAD], ids=[c[0] for c in ATTEND_BAD])
@pytest.mark.parametrize("when", ["new_block", "overwrite"])
def test_bad_attend_raises_and_changes_nothing(name, change, exc, words, when):
    cache = make(POLICIES[name])
    stream(cache, 4)  # 8 frames: the next block rolls / compresses
    F = cache.policy.block_frames
    f = 4 * F if when == "new_block" else 3 * F
    q, k, v = block(cache, 99)
    before = cache.state_dict()
    layer = cache.layers[1]
    args = change(q, k, v, f, 3 * F)
    with pytest.raises(exc, match=words):
        layer.attend(*args[:3], start_frame=args[3])
    assert state_equal(cache.state_dict(), before), "a rejected pass changed the cache"
    layer.attend(q, k, v, start_frame=f)  # and the good call still works afterwards
    assert layer.state.block_start == f


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("change", [c[1] for c in NONFINITE], ids=[c[0] for c in NONFINITE])
def test_nonfinite_inputs_raise_and_change_nothing(name, change):
    cache = make(POLICIES[name])
    stream(cache, 3)
    q, k, v = block(cache, 5)
    before = cache.state_dict()
    args = change(q, k, v, 3 * cache.policy.block_frames, 2 * cache.policy.block_frames)
    with pytest.raises(ValueError, match="NaN|inf|finite"):
        cache.layers[0].attend(*args[:3], start_frame=args[3])
    assert state_equal(cache.state_dict(), before), "a rejected pass changed the cache"


def test_first_pass_may_start_anywhere_but_then_only_forward():
    cache = make(POLICIES["deep_sink"])
    layer = cache.layers[0]
    layer.attend(*block(cache), start_frame=7)  # a stream may start at any frame >= 0
    before = cache.state_dict()
    for bad in (6, 8, 0):
        with pytest.raises(ValueError, match="start_frame"):
            layer.attend(*block(cache), start_frame=bad)
        assert state_equal(cache.state_dict(), before)
    layer.attend(*block(cache), start_frame=9)


# ---------------------------------------------------------------------------------------------- load_state_dict
FOREIGN = [
    # (id, policy of the source, geometry changes of the source)
    ("window", CachePolicy.deep_forcing(9, 2, 6, 2, block_frames=2), {}),
    ("score", CachePolicy.deep_forcing(8, 2, 6, 2, score="logits", block_frames=2), {}),
    ("reuse cap", CachePolicy.deep_forcing(8, 2, 6, 2, topc_max_reuse=None, block_frames=2), {}),
    ("unify", CachePolicy.deep_forcing(8, 2, 6, 2, unify_topc_rope=True, block_frames=2), {}),
    ("sink gap", CachePolicy.deep_forcing(8, 2, 6, 2, sink_gap=0, block_frames=2), {}),
    ("budget", CachePolicy.deep_forcing(8, 2, 7, 2, block_frames=2), {}),
    ("block frames", CachePolicy.deep_forcing(8, 2, 6, 2, block_frames=1), {}),
    ("deep_sink", CachePolicy.deep_sink(8, 2, block_frames=2), {}),
    ("layers", None, dict(num_layers=1)),
    ("batch", None, dict(batch_size=1)),
    ("kv heads", None, dict(num_kv_heads=4)),
    ("tokens per frame", None, dict(tokens_per_frame=1)),
    ("dtype", None, dict(dtype=torch.bfloat16)),
    ("rope layout", None, dict(rope=RopeSpec.llama(D))),
    ("rope theta", None, dict(rope=RopeSpec.wan(D, theta=100.0))),
]


@pytest.mark.parametrize("src_policy,geometry", [f[1:] for f in FOREIGN], ids=[f[0] for f in FOREIGN])
def test_load_state_from_another_policy_or_geometry(src_policy, geometry):
    dst_policy = POLICIES["pc_mass"]
    src = make(src_policy or dst_policy, **geometry)
    stream(src, 5, seed=1)
    dst = make(dst_policy)
    stream(dst, 5)
    before = dst.state_dict()
    with pytest.raises(ValueError):
        dst.load_state_dict(src.state_dict())
    assert state_equal(dst.state_dict(), before)


def _corrupt(sd, how):
    sd = {**sd, "layers": [dict(layer) for layer in sd["layers"]]}
    last = sd["layers"][-1]  # the LAST layer is bad: the first must not be loaded before it is checked
    if how == "k dtype":
        last["k"] = last["k"].double()
    elif how == "v shape":
        last["v"] = last["v"][:, :-1]
    elif how == "frames missing":
        del last["frames"]
    elif how == "mass dropped":
        last["mass"] = None
    elif how == "too many frames":
        last["schedule"] = {**last["schedule"], "frames": 40}
    elif how == "layers missing":
        sd["layers"] = sd["layers"][:1]
    elif how == "rollout state":
        sd = {"format": "deepforcing-rollout-v1", "cache": sd}
    elif how == "not a dict":
        sd = [sd]
    return sd


@pytest.mark.parametrize("how", ["k dtype", "v shape", "frames missing", "mass dropped", "too many frames",
                                 "layers missing", "rollout state", "not a dict"])
def test_malformed_state_never_half_loads(how):
    src = make(POLICIES["pc_mass"])
    stream(src, 6, seed=2)
    dst = make(POLICIES["pc_mass"])
    stream(dst, 3)
    before = dst.state_dict()
    with pytest.raises(ValueError):
        dst.load_state_dict(_corrupt(src.state_dict(), how))
    assert state_equal(dst.state_dict(), before), "a rejected state dict was partly loaded"


# ---------------------------------------------------------------------------------------------- generate / CLI
def test_generate_refuses_foreign_resume_states():
    m = CausalWanModel(WanConfig.tiny())
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    txt = torch.randn(1, 5, 32)
    kw = dict(latent_size=(4, 4), progress=False)
    ro = generate(m.eval(), txt, 12, CachePolicy.deep_sink(), 0, **kw)
    next(ro)
    state = ro.state_dict()
    for bad in (dict(policy=CachePolicy.deep_forcing()), dict(seed=1), dict(latent_size=(4, 6)),
                dict(cache_dtype=torch.bfloat16)):
        args = dict(policy=CachePolicy.deep_sink(), seed=0, **kw)
        args.update(bad)
        with pytest.raises(ValueError):
            generate(m, txt, 12, args.pop("policy"), args.pop("seed"), resume_from=state, **args)
    with pytest.raises(ValueError):
        generate(m, txt, 12, CachePolicy.deep_sink(), 0, resume_from=ro.cache.state_dict(), **kw)


@pytest.mark.parametrize("content", ["tensor", "dict", "garbage"])
def test_cli_resume_of_a_file_that_is_not_a_run(tmp_path, content):
    """--resume on a file that `deepforcing generate` did not write exits with a message (SystemExit naming the
    file), not a traceback, and leaves the file alone."""
    out = tmp_path / "x.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), out)
    elif content == "dict":
        torch.save({"latents": torch.zeros(3, 4, 4, 4)}, out)
    else:
        out.write_bytes(b"not a torch file")
    data = out.read_bytes()
    assert main(["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--frames", "6",
                 "--out", str(out), "--resume"]) == 1  # a one-line message naming the file (tests/cli/test_cli_edges.py)
    assert out.read_bytes() == data


def test_generate_with_nan_text_fails_clearly_instead_of_a_nan_video():
    m = CausalWanModel(WanConfig.tiny())
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    txt = torch.randn(1, 5, 32)
    txt[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="text.*(NaN|inf|finite)"):  # blamed on the text, not on q, k, v
        next(generate(m.eval(), txt, 6, CachePolicy.deep_sink(), 0, latent_size=(4, 4), progress=False))


@pytest.mark.parametrize("d", [{}, {"window_frames": 21}, {"kind": "sliding", "window_frames": 21, "bogus": 1},
                               {"kind": "nonsense"}, "sliding"])
def test_policy_from_dict_raises_value_error(d):
    """Documented: a dict that is not a policy raises ValueError (a missing 'kind' raised TypeError before)."""
    with pytest.raises(ValueError):
        CachePolicy.from_dict(d)
