"""The ``release`` baseline of the rollout bench (``bench.rollout.ReleaseCache``): the authors' data movement on
the schedule of ``CachePolicy.deep_forcing(score="logits")``.

It must produce the same schedule as this package's cache: the same frames in the same slots after every pass
(sink, Top-C picks, recent), the same schedule state, and attention outputs that agree to bf16 rounding. With
integer-valued q and k every Top-C score is exact in both (bf16 products of small integers summed in fp32 and
below 257 in magnitude), so even the data-dependent picks must match slot for slot.
"""
import pytest
import torch

from deepforcing_kernels import RopeSpec
from deepforcing_kernels.bench.rollout import ReleaseCache, RolloutConfig, run_cache_rollout
from deepforcing_kernels.cache import CachePolicy, StreamingKVCache
from deepforcing_kernels.rotation import rephase

H, D, N = 2, 16, 2  # heads, head_dim, tokens per frame


def _pair(num_layers=1):
    rope = RopeSpec.wan(D)
    ours = StreamingKVCache(CachePolicy.deep_forcing(score="logits"), num_layers=num_layers, batch_size=1,
                            num_heads=H, head_dim=D, tokens_per_frame=N, rope=rope, dtype=torch.bfloat16,
                            backend="reference")
    release = ReleaseCache(num_layers=num_layers, batch_size=1, num_heads=H, head_dim=D, tokens_per_frame=N,
                           rope=rope, dtype=torch.bfloat16)
    return ours, release, rope


def _block(g, integer):
    shape = (3, 1, 3 * N, H, D)
    if integer:  # entries in {-1, 0, 1}: every logit score is an exact small integer
        return torch.randint(-1, 2, shape, generator=g).to(torch.bfloat16).unbind(0)
    return torch.randn(shape, generator=g).to(torch.bfloat16).unbind(0)


@pytest.mark.parametrize("integer", [True, False], ids=["exact_scores", "random"])
def test_same_schedule_as_deep_forcing_logits(integer):
    ours, release, _ = _pair()
    g = torch.Generator().manual_seed(1)
    a, b = ours.layers[0], release.layers[0]
    compressions = 0
    for f0 in range(0, 66, 3):
        for _ in range(5):  # the five denoising passes of a block
            q, k, v = _block(g, integer)
            out_a = a.attend(q, k, v, start_frame=f0)
            out_b = b.attend(q, k, v, start_frame=f0)
            assert b.state == a.state
            assert len(b) == len(a)
            if integer:
                assert torch.equal(b.frames(), a.frames()), f"slot frames differ at f0={f0}"
            else:  # bf16 scores may order near-ties differently: compare everything but the Top-C picks
                kinds = a.kinds()
                keep = torch.tensor([kd != "topc" for kd in kinds])
                assert torch.equal(b.frames()[:, keep], a.frames()[:, keep])
            torch.testing.assert_close(out_b.float(), out_a.float(), rtol=0, atol=0.06 if integer else 0.25)
        compressions += a.state.compressed and a.state.frames == ours.policy.budget_frames
    assert a.state.compressed and compressions > 3  # the stream really compressed, several times


def test_sink_rotated_in_place_in_bf16():
    # the stored sink keys encode the current sink position (the release's in-place rotation), rounded to bf16
    # after every move: close to the exact rotation of the keys as first written (which this package's cache
    # keeps), but not equal (the rounding piles up)
    ours, release, rope = _pair()
    g = torch.Generator().manual_seed(2)
    a, b = ours.layers[0], release.layers[0]
    moves = set()
    for f0 in range(0, 60, 3):
        for _ in range(5):
            q, k, v = _block(g, False)
            a.attend(q, k, v, start_frame=f0)
            b.attend(q, k, v, start_frame=f0)
        moves.add(b.state.sink_start)
    assert len(moves - {None}) >= 3  # the sink moved several times
    S_tok = ours.policy.sink_frames * N
    exact = rephase(a.keys()[:, :S_tok].float(), rope, b.state.sink_start - b.state.stream_start)
    err = (b._k[:, :S_tok].float() - exact).abs().max().item()
    assert 0 < err < 0.1, err
    assert torch.equal(a.keys()[:, S_tok:], b._k[:, S_tok:len(b)])  # nothing but the sink is ever rotated


def test_release_runs_in_the_rollout_bench():
    cfg = RolloutConfig(num_frames=33, num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=2, passes=2,
                        dtype=torch.bfloat16, backend="reference", policies=("deep_forcing_logits", "release"))
    res = run_cache_rollout(cfg)
    assert set(res) == {"deep_forcing_logits", "release"}
    assert res["release"]["series"]["cache_frames"] == res["deep_forcing_logits"]["series"]["cache_frames"]
    assert res["release"]["series"]["attended_frames"] == res["deep_forcing_logits"]["series"]["attended_frames"]
    assert res["release"]["per_block_s_median"] > 0
