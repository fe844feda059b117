"""Reliability: independent streams driven from two threads give the same results as run one after the other.

Two StreamingKVCaches (different policies, so compression, rolling and re-phasing interleave) are driven pass by
pass from two threads that start together (a barrier) and yield to each other often; then two generate()
rollouts share one model from two threads. Every output must equal, bit for bit, the sequential run's.
"""
import threading

import pytest
import torch

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache, sink_attention
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig


@pytest.fixture
def intraop_threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def _cache(policy, dtype):
    return StreamingKVCache(policy, num_layers=2, batch_size=2, num_heads=4, head_dim=32, tokens_per_frame=3,
                            rope=RopeSpec.wan(32), dtype=dtype, num_kv_heads=2)


def _inputs(policy, seed, blocks, dtype):
    g = torch.Generator().manual_seed(seed)
    F, Lb = policy.block_frames, policy.block_frames * 3
    calls = []
    for b in range(blocks):
        for _ in range(2):  # a new block, then its clean pass
            calls.append((b * F, [tuple(torch.randn(2, Lb, h, 32, generator=g).to(dtype) for h in (4, 2, 2))
                                  for _ in range(2)]))
    return calls


def _drive(cache, calls, out, barrier=None):
    if barrier is not None:
        barrier.wait()
    for f0, per_layer in calls:
        out.append([layer.attend(q, k, v, start_frame=f0) for layer, (q, k, v) in zip(cache.layers, per_layer)])


def _run_threads(targets):
    errors = []

    def wrap(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a stream thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("intraop_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_caches_in_two_threads_equal_sequential(intraop_threads, dtype):
    pa = CachePolicy.deep_forcing(9, 2, 6, 2, block_frames=1)
    pb = CachePolicy.deep_forcing(10, 3, 7, 3, score="logits", unify_topc_rope=True, block_frames=1)
    pc = CachePolicy.deep_sink(7, 2, block_frames=1)
    policies = [pa, pb, pc]
    calls = [_inputs(p, 10 + i, 20, dtype) for i, p in enumerate(policies)]
    sequential = []
    for p, c in zip(policies, calls):
        out = []
        _drive(_cache(p, dtype), c, out)
        sequential.append(out)
    for _ in range(2):  # twice: different interleavings
        outs = [[] for _ in policies]
        barrier = threading.Barrier(len(policies))
        _run_threads([(_drive, _cache(p, dtype), c, o, barrier) for p, c, o in zip(policies, calls, outs)])
        for got, want in zip(outs, sequential):
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), "a threaded stream differs from sequential"


def _op_jobs():
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(6):
        q, k, v = (torch.randn(1, 7 + i, 4, 32, generator=g), torch.randn(1, 40 + 5 * i, 2, 32, generator=g),
                   torch.randn(1, 40 + 5 * i, 2, 32, generator=g))
        jobs.append((q, k, v, dict(rope=RopeSpec.wan(32), sink_len=9, sink_shift=1000 * i - 2500,
                                   return_lse=True, return_mass=True)))
    return jobs


def _same(a, b):
    return torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse) and torch.equal(a.mass, b.mass)


@pytest.mark.parametrize("intraop_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_op_is_deterministic_run_to_run(backend, intraop_threads):
    """The same call gives bit-identical out, lse and mass every time, whatever ran before it (mass-mode Top-C picks
    and the bit-for-bit resume of a stream depend on it)."""
    from conftest import require_cpp

    if backend == "cpp":
        require_cpp()
    jobs = _op_jobs()
    want = [sink_attention(q, k, v, backend=backend, **kw) for q, k, v, kw in jobs]
    for _ in range(30):
        for (q, k, v, kw), w in zip(jobs, want):
            got = sink_attention(q, k, v, backend=backend, **kw)
            assert _same(got, w), f"{backend}: a repeated call differs (mass: " \
                f"{(got.mass - w.mass).abs().max().item():.3g})"


@pytest.mark.parametrize("intraop_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_op_backends_in_threads_equal_sequential(backend, intraop_threads):
    """The public op on every CPU backend from several threads at once (the C++ kernel's scratch must be per call)."""
    from conftest import require_cpp

    if backend == "cpp":
        require_cpp()
    jobs = _op_jobs()
    want = [sink_attention(q, k, v, backend=backend, **kw) for q, k, v, kw in jobs]
    got = [[] for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def one(i, q, k, v, kw):
        barrier.wait()
        for _ in range(20):
            got[i].append(sink_attention(q, k, v, backend=backend, **kw))

    _run_threads([(one, i) + job for i, job in enumerate(jobs)])
    for i, (runs, w) in enumerate(zip(got, want)):
        bad = sum(not _same(r, w) for r in runs)
        assert bad == 0, f"{backend}: {bad} of {len(runs)} threaded calls of job {i} differ from the sequential one"


def test_two_rollouts_share_a_model_from_two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = CausalWanModel(WanConfig.tiny())
        m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
        m.eval()
        txt = [torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        runs = [(CachePolicy.deep_forcing(), 3, txt[0]), (CachePolicy.deep_sink(), 4, txt[1])]
        kw = dict(latent_size=(4, 4), progress=False)
        want = [generate(m, t, 27, p, s, **kw).run() for p, s, t in runs]
        got = [None, None]
        barrier = threading.Barrier(2)

        def one(i, p, s, t):
            barrier.wait()
            got[i] = generate(m, t, 27, p, s, **kw).run()

        _run_threads([(one, i) + r for i, r in enumerate(runs)])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        torch.set_num_threads(saved)
