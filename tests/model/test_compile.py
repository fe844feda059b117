"""``torch.compile`` of the whole model (inductor, CPU) with the op inside: a short rollout matches eager.

The rollout: the tiny model through a small ``deep_forcing`` cache (window 6 frames, sink 1, budget 5, recent 3,
so a compression and a sink re-phasing happen by the third block), 3 passes per block. Every op call is traced
into the graph (inductor keeps it as an extern call to the op's CPU kernel); dynamo breaks the graph only around
the cache's host-side checks.

Tolerance: rtol = atol = 1e-4 on the float32 flow of every pass. Inductor fuses the pointwise ops and re-orders
the reductions of LayerNorm / RMSNorm / the FFN (about 1e-7 relative per op in float32; measured: at most 4.2e-7
over the rollout), and the cache carries each pass's keys into the next; 1e-4 leaves room for that drift on other
CPUs while a wrong cache position, a skipped re-phasing, a graph that baked in one start_frame or a wrong
compaction is off by 1e-2 or more. (Mass scoring once diverged by 4e-2 to 3e-1, varying from run to run, when
inductor fused the storage's in-place compaction into one parallel kernel; the moves now stay eager, see
deepforcing_kernels.cache.storage, and both scorings must match.)
"""
import pytest
import torch

from deepforcing_kernels.cache import CachePolicy, StreamingKVCache
from deepforcing_kernels.models import CausalWanModel, WanConfig

pytestmark = [
    pytest.mark.slow,
    # torch's own TorchScript internals, reached by dynamo, deprecate themselves: not this package's call
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    # the RoPE / rotation tables and the extension loader are lru_cache'd pure functions of their arguments:
    # dynamo tracing the wrapped function (as it says it does) is exactly right for them
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function:UserWarning"),
]


def _rollout(model, score, blocks, passes=3, seed=0):
    c = model.config
    policy = CachePolicy.deep_forcing(window_frames=6, sink_frames=1, budget_frames=5, recent_frames=3, score=score)
    cache = StreamingKVCache(policy, num_layers=c.num_layers, batch_size=1, num_heads=c.num_heads,
                             head_dim=c.head_dim, tokens_per_frame=c.tokens_per_frame(c.latent_size), rope=c.rope(),
                             dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, c.text_len or 16, c.text_dim, generator=g)
    outs = []
    with torch.no_grad():
        for b in range(blocks):
            x = torch.randn(1, 3, c.in_dim, *c.latent_size, generator=g)
            for t in (1000.0, 500.0, 0.0)[:passes]:
                x = model(x, torch.full((1, 3), t), text, cache=cache, start_frame=3 * b)
                outs.append(x.clone())
    assert cache.layers[0].state.compressed  # the comparison covered a compression and the re-phased sink
    return outs


@pytest.fixture(scope="module")
def models():
    """The tiny model and one ``torch.compile`` of it, shared by both scorings.

    Compiling is the whole cost of this module (about 30 graphs, each a C++ build of inductor's kernels: about
    50 s cold on a 2-core CPU); the second scoring runs the same blocks, so it reuses the graphs of the first and
    compiles only what its own cache path adds (what a second ``torch.compile`` of a fresh model also did, as
    dynamo keys its graphs on the code, not on the model). Module-scoped, so tests/conftest.py puts both tests
    on one worker: spread over two, each compiled everything cold. Both rollouts still start from a fresh cache,
    and the compiled one is still checked against eager pass by pass."""
    model = CausalWanModel(WanConfig.tiny()).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    return model, torch.compile(model, backend="inductor")


def _compare(models, score, blocks):
    model, compiled_model = models
    eager = _rollout(model, score, blocks)
    compiled = _rollout(compiled_model, score, blocks)
    assert len(eager) == len(compiled) == 3 * blocks
    for i, (a, b) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"pass {i}: {m}")


def test_compiled_model_matches_eager_logits_scoring(models):
    _compare(models, "logits", blocks=4)


def test_compiled_model_matches_eager_mass_scoring(models):
    _compare(models, "mass", blocks=3)
