"""Reliability: long streams, 1200+ latent frames (past the release's 1021-frame RoPE-table crash), every policy.

A tiny geometry (2 tokens per frame, 2 heads, head_dim 32, one layer) streams 1206 frames, two passes per block
(the first appends or rolls or compresses, the second overwrites as the clean pass does). Keys and queries are
RoPE'd at their absolute frames (up to 1205). After every block: outputs finite, the cache never holds more than
the window, and the frames and temporal positions of every slot are exactly what docs/spec.md sections 2-4 say (derived
here from the formulas, not from the schedule engine). At the last block, the output is compared with attention
over keys rotated *directly* at their SPEC positions in float64 (no re-phasing involved): a sink shift of ~1180
frames must keep the output within the docs/spec.md section 7 budget, in fp32 and bf16.
"""
import pytest
import torch

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache, apply_rope
from deepforcing_kernels.testing import assert_within_budget

N_TOK, H, D = 2, 2, 32
ROPE = RopeSpec.wan(D)
FRAMES = 1206  # 402 blocks of 3: the last block starts at 1203 > 1021

POLICIES = {
    "full": CachePolicy.full(),
    "sliding": CachePolicy.sliding(21),
    "frame_sink": CachePolicy.frame_sink(21, 3),
    "deep_sink": CachePolicy.deep_sink(21, 14),
    "deep_sink_gap0": CachePolicy.deep_sink(21, 14, sink_gap=0),
    "deep_forcing_mass": CachePolicy.deep_forcing(),
    "deep_forcing_logits": CachePolicy.deep_forcing(score="logits"),
    "deep_forcing_unified": CachePolicy.deep_forcing(unify_topc_rope=True, sink_gap=0, topc_max_reuse=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only spins


def expected_layout(p: CachePolicy, f0: int, last_compress: int):
    """Per frame slot after the passes of the block at ``f0``: (frames, positions) for the non-Top-C slots, and the
    Top-C region's (first slot, count, unified positions or None). Stream starts at 0, contiguous blocks."""
    F, total = p.block_frames, f0 + p.block_frames
    g = p.gap_frames
    if p.kind == "full":
        fr = list(range(total))
        return fr, fr, None
    W = p.window_frames
    if total <= W:
        fr = list(range(total))
        return fr, fr, None
    if p.kind == "sliding":
        fr = list(range(total - W, total))
        return fr, fr, None
    S = p.sink_frames
    if p.kind in ("frame_sink", "deep_sink"):
        fr = list(range(S)) + list(range(total - (W - S), total))
        sink_start = f0 + F - W - g if p.kind == "deep_sink" else 0
        return fr, [sink_start + i for i in range(S)] + fr[S:], None
    # deep_forcing: sink + C Top-C frames + the frames after the last compression's recent block
    N, R, C = p.budget_frames, p.recent_frames, p.topc_frames
    sink_start = last_compress + F - N - g
    recent = list(range(last_compress + F - R, total))
    unified = [sink_start + S + r for r in range(C)] if p.unify_topc_rope else None
    return list(range(S)) + recent, [sink_start + i for i in range(S)] + recent, (S, C, unified)


def run_stream(policy: CachePolicy, dtype: torch.dtype):
    torch.manual_seed(1234)
    cache = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=H, head_dim=D, tokens_per_frame=N_TOK,
                             rope=ROPE, dtype=dtype)
    layer = cache.layers[0]
    F = policy.block_frames
    Lb = F * N_TOK
    raw_k, raw_v = {}, {}  # frame -> raw (un-rotated) keys / values of its last (clean) pass, [1, n, H, D]
    last_compress, held, compressions, state_bytes = None, 0, [], []
    for f0 in range(0, FRAMES, F):
        if policy.compresses and held + F > policy.window_frames:  # SPEC 3.2 trigger: the append would overflow
            last_compress, held = f0, policy.budget_frames
            compressions.append(f0)
        else:
            held += F
        grid = (F, 1, N_TOK)
        for pass_ in range(2):
            rq, rk, v = torch.randn(1, Lb, H, D), torch.randn(1, Lb, H, D), torch.randn(1, Lb, H, D)
            q = apply_rope(rq, ROPE, frame_offset=f0, grid=grid).to(dtype)
            k = apply_rope(rk, ROPE, frame_offset=f0, grid=grid).to(dtype)
            out = layer.attend(q, k, v.to(dtype), start_frame=f0)
            assert out.shape == q.shape and out.dtype == dtype
            assert torch.isfinite(out.float()).all(), f"non-finite output at frame {f0}, pass {pass_}"
        for i in range(F):
            raw_k[f0 + i] = rk[:, i * N_TOK:(i + 1) * N_TOK]
            raw_v[f0 + i] = v[:, i * N_TOK:(i + 1) * N_TOK]
        # ---- bounded, exact frames and positions after every block
        if policy.kind != "full":
            assert len(layer) <= policy.window_frames * N_TOK, f"cache past its window at frame {f0}"
            if f0 in (603, FRAMES - F):  # same phase of the compress/append cycle: the whole state is no bigger
                state_bytes.append(_tensor_bytes(cache.state_dict()))
        frames, positions = layer.frames()[0].tolist(), layer.positions()[0].tolist()
        want_f, want_p, topc = expected_layout(policy, f0, last_compress)
        per_tok = lambda xs: [x for x in xs for _ in range(N_TOK)]  # noqa: E731
        if topc is None:
            assert frames == per_tok(want_f), f"frames at f0={f0}"
            assert positions == per_tok(want_p), f"positions at f0={f0}"
        else:
            S, C, unified = topc
            a, b = S * N_TOK, (S + C) * N_TOK
            assert frames[:a] + frames[b:] == per_tok(want_f) and positions[:a] + positions[b:] == per_tok(want_p)
            cand_hi = want_f[S]  # Top-C tokens come from between the sink and the recent frames
            assert all(S <= fr < cand_hi for fr in frames[a:b]), f"Top-C frames {frames[a:b]} at f0={f0}"
            assert positions[a:b] == (per_tok(unified) if unified is not None else frames[a:b])
    if policy.kind != "full":
        assert len(state_bytes) == 2 and state_bytes[1] == state_bytes[0], f"state grew: {state_bytes}"
    return cache, layer, raw_k, raw_v, q, out, compressions


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_long_stream_1200_frames(name, dtype):
    policy = POLICIES[name]
    cache, layer, raw_k, raw_v, q, out, compressions = run_stream(policy, dtype)
    if policy.compresses:  # SPEC 3.4 steady state (W 21, block 3, N 16): compress at f0 = 21, 27, 33, ...
        assert compressions == list(range(21, FRAMES, 6))
    # the final pass: re-derive the attention from keys rotated directly at their SPEC positions (float64)
    frames, positions, values = layer.frames()[0].tolist(), layer.positions()[0].tolist(), layer.values()
    if policy.rephase_sink:
        assert positions[0] - frames[0] > 1100, "the test must exercise a large sink shift"
    cols = []
    for j, f in enumerate(frames):  # which token of its frame each slot holds (Top-C picks single tokens)
        match = [c for c in range(N_TOK) if torch.equal(values[0, j], raw_v[f][0, c].to(dtype))]
        assert len(match) == 1
        cols.append(match[0])
    k_direct = torch.cat([_rotated(raw_k[f][:, c:c + 1], p, c) for f, p, c in zip(frames, positions, cols)], dim=1)
    assert_within_budget(out, q, k_direct.to(dtype), values)
    # the cache's own account of its keys agrees (re-phasing applied in float32 to the stored keys)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8 * float(k_direct.abs().max())
    torch.testing.assert_close(layer.effective_keys().double(), k_direct, atol=tol, rtol=0)


def _rotated(raw, position, col):
    """One raw key token [1, 1, H, D] rotated in float64 at (frame=position, row 0, column=col)."""
    pad = torch.zeros(1, col, H, D, dtype=torch.float64)
    return apply_rope(torch.cat([pad, raw.double()], dim=1), ROPE, frame_offset=position, grid=(1, 1, col + 1))[:, col:]


@pytest.mark.slow
@pytest.mark.parametrize("policy", [CachePolicy.deep_forcing(), CachePolicy.deep_sink()], ids=["deep_forcing",
                                                                                                 "deep_sink"])
def test_generate_1206_frames_through_the_model(policy):
    """The whole stack (model RoPE at absolute frames, cache, driver) past the release's 1021-frame crash, bf16 cache:
    every block finite, the cache bounded at every block, and the sink re-phased to SPEC positions at the end."""
    from deepforcing_kernels.driver import generate
    from deepforcing_kernels.models import CausalWanModel, WanConfig

    m = CausalWanModel(WanConfig.tiny(num_layers=1, dim=48, ffn_dim=48, freq_dim=16))
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    ro = generate(m.eval(), torch.randn(1, 5, 32), FRAMES, policy, 0, latent_size=(2, 2), cache_dtype=torch.bfloat16,
                  progress=False)
    blocks = 0
    for block in ro:
        blocks += 1
        assert torch.isfinite(block).all(), f"non-finite latents in block {blocks}"
        assert ro.cache_frames <= policy.window_frames
    assert blocks == FRAMES // 3
    layer = ro.cache.layers[0]
    f0, F, g = FRAMES - 3, policy.block_frames, policy.gap_frames
    held = policy.budget_frames if policy.compresses else policy.window_frames
    if policy.compresses:  # the last block (f0 = 1203) compresses: 1203 = 21 + 6 * 197
        assert (f0 - 21) % 6 == 0 and len(layer) == held
    sink_start = f0 + F - held - g
    S = policy.sink_frames
    assert layer.positions()[0, :S].tolist() == list(range(sink_start, sink_start + S))
    assert layer.frames()[0, -3:].tolist() == [f0, f0 + 1, f0 + 2]
    assert layer.positions()[0, -3:].tolist() == [f0, f0 + 1, f0 + 2]
