"""StreamingKVCache on tensors: attention equals the reference op over the attended cache, positions are what
the keys encode, Top-C equals a brute-force selection (logits and mass), Top-C unification, sink_gap, GQA."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache, apply_rope, release_logit_score, sink_attention
from deepforcing_kernels.schedule import plan_pass

warnings.filterwarnings("ignore", message=".*C\\+\\+ CPU kernel is not built.*")


pytestmark = pytest.mark.usefixtures("one_thread")


POLICIES = {
    "full": CachePolicy.full(),
    "sliding": CachePolicy.sliding(window_frames=8),
    "frame_sink": CachePolicy.frame_sink(window_frames=8, sink_frames=2),
    "deep_sink": CachePolicy.deep_sink(window_frames=8, sink_frames=3),
    "deep_sink_gap0": CachePolicy.deep_sink(window_frames=8, sink_frames=3, sink_gap=0),
    "pc_logits": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                          score="logits", topc_max_reuse=2),
    "pc_mass": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                        topc_max_reuse=2),
    "pc_mass_unify": CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=5,
                                              unify_topc_rope=True, sink_gap=1),
    "pc_mass_no_topc": CachePolicy.deep_forcing(window_frames=8, sink_frames=2, budget_frames=6, recent_frames=4),
    "pc_logits_unify_b2": CachePolicy.deep_forcing(window_frames=9, sink_frames=2, budget_frames=7,
                                                   recent_frames=3, score="logits", unify_topc_rope=True,
                                                   block_frames=2),
}


def make_cache(policy, *, B=2, H=2, Hkv=None, D=16, n=2, dtype=torch.float32, rope=None, layers=1, **kw):
    rope = rope or RopeSpec.wan(D)
    return StreamingKVCache(policy, num_layers=layers, batch_size=B, num_heads=H, head_dim=D, tokens_per_frame=n,
                            rope=rope, dtype=dtype, num_kv_heads=Hkv, **kw)


def rotated_block(raw, rope, f0, n):
    """Rotate raw [B, F*n, H, D] at absolute frames f0.. (grid (F, 1, n))."""
    F = raw.shape[1] // n
    if rope.num_axes == 1:
        assert n == 1, "1-D RoPE: one token per frame (the temporal unit is the frame)"
        return apply_rope(raw, rope, frame_offset=f0, grid=(F,))
    return apply_rope(raw, rope, frame_offset=f0, grid=(F, 1, n))


def stream(policy, cache, blocks, passes=2, seed=0):
    """Yield (f0, pass, q, k, v, raw_k) with q, k RoPE'd at absolute frames; raw_k is the unrotated key."""
    c, n = cache, cache.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    Lb = policy.block_frames * n
    for bi in range(blocks):
        f0 = bi * policy.block_frames
        for p in range(passes):
            q = torch.randn(c.batch_size, Lb, c.num_heads, c.head_dim, generator=g)
            kr = torch.randn(c.batch_size, Lb, c.num_kv_heads, c.head_dim, generator=g)
            v = torch.randn(c.batch_size, Lb, c.num_kv_heads, c.head_dim, generator=g)
            q = rotated_block(q, c.rope, f0, n).to(c.dtype)
            k = rotated_block(kr, c.rope, f0, n).to(c.dtype)
            yield f0, p, q, k, v.to(c.dtype), kr


def snapshot(layer):
    return layer.keys(), layer.values(), layer.frames()


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("Hkv", [2, 1])
def test_attend_equals_reference_over_the_attended_cache(name, Hkv):
    """Every pass: the output equals sink_attention(reference) over the attended cache, and effective_keys()
    are the raw keys rotated at positions() (so positions() is what attention really sees)."""
    policy = POLICIES[name]
    n = 2
    cache = make_cache(policy, Hkv=Hkv, n=n)
    layer, rope = cache.layers[0], cache.rope
    raw = {}  # (b, frame, tok) -> unrotated key of the latest pass
    checked_aug = 0
    for f0, p, q, k, v, kr in stream(policy, cache, blocks=9):
        plan = plan_pass(policy, layer.state, f0)
        before = snapshot(layer)
        out = layer.attend(q, k, v, start_frame=f0)
        for b in range(cache.batch_size):
            for j in range(k.shape[1]):
                # a token is found again by its value (random floats are distinct): Top-C slots hold any token
                raw[b, float(v[b, j, 0, 0])] = (kr[b, j], j % n)
        if plan.compress_after_attend:
            # mass mode: the pass attended to the augmented cache [cache, block] with the sink at the plan's
            # placement; rebuild it from the cache as it was before the pass
            kk = torch.cat([before[0], k], 1)
            vv = torch.cat([before[1], v], 1)
            S_tok = policy.sink_frames * n
            shift = torch.zeros(cache.batch_size, kk.shape[1], dtype=torch.int64)
            shift[:, :S_tok] = plan.attend_sink_shift()
            if policy.unify_topc_rope and plan.attend_compressed:
                C_tok = policy.topc_frames * n
                slots = torch.arange(S_tok, S_tok + C_tok)
                shift[:, S_tok:S_tok + C_tok] = plan.attend_sink_start + slots // n - before[2][:, S_tok:S_tok + C_tok]
            ref = sink_attention(q, kk, vv, rope=rope, key_shift=shift, backend="reference")
            checked_aug += 1
        else:
            ref = sink_attention(q, layer.keys(), layer.values(), rope=rope, backend="reference",
                                 **layer.attention_args())
            eff = sink_attention(q, layer.effective_keys(), layer.values(), backend="reference")
            torch.testing.assert_close(out, eff, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        if p == 0:
            # effective key of each slot == its raw key rotated at positions() (temporal) and its own row/col
            eff_k, pos, vals = layer.effective_keys(), layer.positions(), layer.values()
            for b in range(cache.batch_size):
                found = [raw[b, float(x)] for x in vals[b, :, 0, 0]]
                # rotate each raw key at (positions()[j], its own row/col) and take its token
                rotated = torch.cat([apply_rope(kj[None, None].expand(1, n, -1, -1).contiguous(), rope,
                                                frame_offset=int(pos[b, j]), grid=(1, 1, n))[:, t][:, None]
                                     for j, (kj, t) in enumerate(found)], 1)
                torch.testing.assert_close(eff_k[b:b + 1], rotated, atol=1e-5, rtol=1e-5)
    assert (checked_aug > 0) == (policy.compresses and policy.score == "mass")


def test_bf16_cache_attends_like_the_reference():
    policy = POLICIES["pc_logits"]
    cache = make_cache(policy, dtype=torch.bfloat16)
    layer = cache.layers[0]
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=8):
        out = layer.attend(q, k, v, start_frame=f0)
        assert out.dtype == torch.bfloat16
        ref = sink_attention(q, layer.keys(), layer.values(), rope=cache.rope, backend="reference",
                             **layer.attention_args())
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_sink_keys_are_never_rewritten():
    policy = CachePolicy.deep_sink(window_frames=8, sink_frames=3)
    cache = make_cache(policy, dtype=torch.bfloat16)
    layer = cache.layers[0]
    sink = None
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=12, passes=2):
        layer.attend(q, k, v, start_frame=f0)
        if f0 == 0:
            sink = k[:, :3 * 2].clone() if p == 1 else None  # the last pass of block 0 leaves its keys
        if sink is not None and f0 >= 3:
            assert torch.equal(layer.keys()[:, :4], sink[:, :4])
    assert layer.state.sink_start is not None and layer.attention_args()["sink_shift"] != 0


# ---------------------------------------------------------------------------------------------- Top-C: logits
def brute_topc(score, reuse, count, cap):
    """Per row: eligible (reuse < cap) by score desc, then ineligible by score desc; the first ``count``."""
    out = []
    for s, r in zip(score.tolist(), reuse.tolist()):
        order = sorted(range(len(s)), key=lambda j: -s[j])
        ok = [j for j in order if cap is None or r[j] < cap]
        out.append(sorted((ok + [j for j in order if j not in ok])[:count]))
    return out


@pytest.mark.parametrize("policy", [
    POLICIES["pc_logits"],
    # compress every block (budget == window, one-frame blocks): reuse cap 1 forces the filler path
    CachePolicy.deep_forcing(window_frames=7, sink_frames=1, budget_frames=7, recent_frames=2, score="logits",
                             topc_max_reuse=1, block_frames=1),
    CachePolicy.deep_forcing(window_frames=9, sink_frames=2, budget_frames=8, recent_frames=5, score="logits",
                             topc_max_reuse=None, block_frames=2),
])
def test_logits_topc_equals_brute_force_release_score(policy):
    n = 2
    cache = make_cache(policy, n=n, Hkv=1, H=2)
    layer = cache.layers[0]
    R, S, C = policy.recent_frames, policy.sink_frames, policy.topc_frames
    qbuf = None  # the release's recent-query buffer: last R frames of queries, every pass appends
    compressions = fills = 0
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=20, passes=2):
        v = v.clone()
        v[..., 0, 0] = torch.arange(k.shape[1]).float() + 1000 * f0  # identity of each token in its value
        plan = plan_pass(policy, layer.state, f0)
        qbuf = q if qbuf is None else torch.cat([qbuf, q], 1)[:, -R * n:]
        if plan.action == "compress":
            kaug = torch.cat([layer.keys(), k], 1)
            ids = torch.cat([layer.values()[..., 0, 0], v[..., 0, 0]], 1)
            reuse = torch.cat([layer.reuse_counts(), torch.zeros(2, k.shape[1], dtype=torch.int32)], 1)
            T = kaug.shape[1]
            score = release_logit_score(qbuf, kaug)[:, S * n:T - R * n]
            cand_reuse = reuse[:, S * n:T - R * n]
            pick = brute_topc(score, cand_reuse, C * n, policy.topc_max_reuse)
            cap = policy.topc_max_reuse
            fills += sum(int((cand_reuse[b] < cap).sum()) < C * n for b in range(2)) if cap else 0
        layer.attend(q, k, v, start_frame=f0)
        if plan.action == "compress":
            compressions += 1
            got = layer.values()[..., 0, 0]
            for b in range(2):
                want = ids[b, S * n:T - R * n][pick[b]]
                assert got[b, S * n:(S + C) * n].tolist() == want.tolist()
                # the reuse counters travelled with their tokens and the chosen ones got +1
                assert layer.reuse_counts()[b, S * n:(S + C) * n].tolist() == \
                    (cand_reuse[b][pick[b]] + 1).tolist()
                assert got[b, :S * n].tolist() == ids[b, :S * n].tolist()
                assert got[b, (S + C) * n:].tolist() == ids[b, T - R * n:].tolist()
    assert compressions >= 5
    if policy.topc_max_reuse == 1:
        assert fills > 0  # the filler rule was exercised


# ---------------------------------------------------------------------------------------------- Top-C: mass
def augmented_shift(policy, plan, frames_before, T, n):
    """Per-key shift of the augmented cache a mass-mode compressing pass attends to (sink at the plan's
    placement; with unify_topc_rope, the previous Top-C right after it)."""
    S_tok = policy.sink_frames * n
    shift = torch.zeros(frames_before.shape[0], T, dtype=torch.int64)
    shift[:, :S_tok] = plan.attend_sink_shift()
    if policy.unify_topc_rope and plan.attend_compressed:
        C_tok = policy.topc_frames * n
        slots = torch.arange(S_tok, S_tok + C_tok)
        shift[:, S_tok:S_tok + C_tok] = plan.attend_sink_start + slots // n - frames_before[:, S_tok:S_tok + C_tok]
    return shift


def check_mass_topc(policy, *, n=2, blocks=16, passes=3, H=4, Hkv=2, seed=0):
    """Run a mass-mode cache and check every compression against a brute force: score = mass of the last R-F
    frames of queries before the compressing block, each taken from the last pass of the block that made it
    (over the cache that pass attended: chunk-wise the previous block's tail, frame-wise the last R-F blocks
    whole), + mass of the compressing pass's queries over the augmented cache; summed over heads; per batch
    element. Returns the compression count."""
    cache = make_cache(policy, n=n, H=H, Hkv=Hkv)
    layer, rope = cache.layers[0], cache.rope
    F, R, S, C = policy.block_frames, policy.recent_frames, policy.sink_frames, policy.topc_frames
    # the earlier blocks' query frames the score reaches back to: (blocks back, its last frames of queries)
    back = [(1, R - F)] if R - F <= F else [(j, F) for j in range(1, (R - F) // F + 1)]
    last = {}  # block start -> (q, keys, values, attention args) of that block's latest pass, as it attended
    compressions = 0
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=blocks, passes=passes, seed=seed):
        v = v.clone()
        v[..., 0, 0] = torch.arange(k.shape[1]).float() + 1000 * f0
        plan = plan_pass(policy, layer.state, f0)
        if plan.action == "compress":
            kk, vv = torch.cat([layer.keys(), k], 1), torch.cat([layer.values(), v], 1)
            T = kk.shape[1]
            carried = torch.zeros(cache.batch_size, T)
            for j, frames in back:
                if not frames:
                    continue
                pq, pk, pv, pargs = last[f0 - j * F]
                tail = frames * n
                m = sink_attention(pq, pk, pv, rope=rope, backend="reference", return_mass=True,
                                   mass_q_range=(pq.shape[1] - tail, pq.shape[1]), **pargs).mass
                m = m.sum(1)
                # that pass may have attended another slot table (a compressing pass attends to the augmented
                # cache): match its slots to today's by token identity (kept in the values); a token newer than
                # that pass is in today's recent frames, never a candidate
                for b in range(cache.batch_size):
                    by_id = {float(i): float(x) for i, x in zip(pv[b, :, 0, 0], m[b])}
                    ids_now = layer.values()[b, :, 0, 0].tolist()
                    assert all(float(i) in by_id for i in ids_now[S * n:T - R * n])
                    for jj, i in enumerate(ids_now):
                        carried[b, jj] += by_id.get(float(i), 0.0)
            shift = augmented_shift(policy, plan, layer.frames(), T, n)
            cur = sink_attention(q, kk, vv, rope=rope, key_shift=shift, backend="reference",
                                 return_mass=True).mass.sum(1)
            score = (carried + cur)[:, S * n:T - R * n]
            reuse = torch.cat([layer.reuse_counts(), torch.zeros(cache.batch_size, k.shape[1], dtype=torch.int32)],
                              1)
            pick = brute_topc(score, reuse[:, S * n:T - R * n], C * n, policy.topc_max_reuse)
            ids = vv[..., 0, 0]
        layer.attend(q, k, v, start_frame=f0)
        if plan.action == "compress":
            compressions += 1
            got = layer.values()[..., 0, 0]
            for b in range(cache.batch_size):
                assert got[b, S * n:(S + C) * n].tolist() == ids[b, S * n:T - R * n][pick[b]].tolist(), (f0, p, b)
            last[f0] = (q, kk, vv, dict(key_shift=shift))  # this pass attended the augmented cache
        else:
            last[f0] = (q, layer.keys(), layer.values(), layer.attention_args())
    return compressions


@pytest.mark.parametrize("policy", [
    POLICIES["pc_mass"],
    POLICIES["pc_mass_unify"],
    CachePolicy.deep_forcing(window_frames=7, sink_frames=1, budget_frames=7, recent_frames=2,
                             topc_max_reuse=1, block_frames=1),
    CachePolicy.deep_forcing(window_frames=9, sink_frames=2, budget_frames=6, recent_frames=3, block_frames=3),
    # frame-wise (Causal Forcing's 1 latent frame a block): the carried mass spans the last 3 blocks
    CachePolicy.deep_forcing(window_frames=9, sink_frames=2, budget_frames=7, recent_frames=4, block_frames=1),
    CachePolicy.deep_forcing(block_frames=1),  # the defaults, frame-wise
    CachePolicy.deep_forcing(window_frames=13, sink_frames=2, budget_frames=10, recent_frames=6, block_frames=2),
])
def test_mass_topc_equals_brute_force_attention_mass(policy):
    W, N, F = policy.window_frames, policy.budget_frames, policy.block_frames
    blocks = max(16, (W + 5 * (W - N + F)) // F)  # five compressions at least, at any block size
    assert check_mass_topc(policy, blocks=blocks) >= 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mass_topc_brute_force_random_configs(data):
    F = data.draw(st.integers(1, 3))
    R = data.draw(st.one_of(st.integers(F, 2 * F), st.sampled_from([F + F * j for j in (2, 3)])))
    S = data.draw(st.integers(1, 3))
    W = data.draw(st.integers(S + R, S + R + 6))
    N = data.draw(st.integers(S + R, W))
    policy = CachePolicy.deep_forcing(W, S, N, R, topc_max_reuse=data.draw(st.one_of(st.integers(1, 2), st.none())),
                                      unify_topc_rope=data.draw(st.booleans()),
                                      sink_gap=data.draw(st.one_of(st.none(), st.integers(0, 3))), block_frames=F)
    blocks = (W + 6 * F) // F + 2
    check_mass_topc(policy, n=data.draw(st.integers(1, 2)), blocks=blocks, passes=data.draw(st.integers(1, 3)),
                    H=2, Hkv=data.draw(st.sampled_from([1, 2])), seed=data.draw(st.integers(0, 99)))


def test_mass_selection_differs_per_batch_element_but_schedule_is_shared():
    policy = POLICIES["pc_mass"]
    cache = make_cache(policy, n=2)
    layer = cache.layers[0]
    differ = False
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=12):
        layer.attend(q, k, v, start_frame=f0)
        fr = layer.frames()
        differ |= not torch.equal(fr[0], fr[1])
    assert differ
    assert len(layer.kinds()) == fr.shape[1]


# ---------------------------------------------------------------------------------------------- positions
def test_unify_topc_rope_positions():
    policy = CachePolicy.deep_forcing(window_frames=21, sink_frames=10, budget_frames=16, recent_frames=4,
                                      score="logits", unify_topc_rope=True)
    cache = make_cache(policy, n=2, B=1)
    layer = cache.layers[0]
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=12, passes=1):
        layer.attend(q, k, v, start_frame=f0)
        if f0 >= 21:
            pos = layer.positions()[0].tolist()
            s = layer.state.sink_start
            # Top-C tokens, in slot order, take sink_start + S + rank // tokens_per_frame
            assert pos[20:24] == [s + 10, s + 10, s + 11, s + 11]
            assert pos[:20] == [s + i // 2 for i in range(20)]
            fr = layer.frames()[0].tolist()
            assert pos[24:] == fr[24:]


def test_sink_gap_zero_is_contiguous():
    ds = CachePolicy.deep_sink(window_frames=8, sink_frames=3, sink_gap=0)
    pc = CachePolicy.deep_forcing(window_frames=10, sink_frames=2, budget_frames=8, recent_frames=4,
                                  score="logits", unify_topc_rope=True, sink_gap=0)
    for policy in (ds, pc):
        cache = make_cache(policy, n=1, B=1)
        layer = cache.layers[0]
        for f0, p, q, k, v, _ in stream(policy, cache, blocks=10, passes=1):
            layer.attend(q, k, v, start_frame=f0)
            if layer.state.sink_start is not None:
                pos = layer.positions()[0].tolist()
                if policy is ds or f0 % 6 == 0 or layer.state.frames == policy.budget_frames:
                    # right after a re-phase: sink, (Top-C,) recent sit at consecutive positions
                    assert pos == list(range(pos[0], pos[0] + len(pos))), (f0, pos)
    # and the default gap is one block
    cache = make_cache(CachePolicy.deep_sink(window_frames=8, sink_frames=3), n=1, B=1)
    layer = cache.layers[0]
    for f0, p, q, k, v, _ in stream(layer.policy, cache, blocks=5, passes=1):
        layer.attend(q, k, v, start_frame=f0)
    pos = layer.positions()[0].tolist()
    assert pos[3] - pos[2] == 1 + 3


def test_gqa_shapes_and_rope_1d():
    policy = POLICIES["deep_sink"]
    cache = make_cache(policy, H=4, Hkv=2, n=1, rope=RopeSpec.llama(16))
    layer = cache.layers[0]
    for f0, p, q, k, v, _ in stream(policy, cache, blocks=6, passes=1):
        out = layer.attend(q, k, v, start_frame=f0)
        assert out.shape == q.shape
        ref = sink_attention(q, layer.keys(), layer.values(), rope=cache.rope, backend="reference",
                             **layer.attention_args())
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert layer.keys().shape == (2, 8, 2, 16) and layer.effective_keys().dtype == torch.float32


def test_full_grows_and_keeps_everything():
    cache = make_cache(CachePolicy.full(), n=1, B=1, reserve_frames=4)
    layer = cache.layers[0]
    for f0, p, q, k, v, _ in stream(cache.policy, cache, blocks=10, passes=2):
        out = layer.attend(q, k, v, start_frame=f0)
        ref = sink_attention(q, layer.keys(), layer.values(), backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert layer.frames()[0].tolist() == list(range(30))


def test_multi_layer_caches_are_independent_and_jumps_start_new_blocks():
    policy = POLICIES["deep_sink"]
    cache = make_cache(policy, layers=2, n=1, B=1)
    a, b = cache.layers
    q = torch.randn(1, 3, 2, 16)
    a.attend(q, q, q, start_frame=0)
    assert len(a) == 3 and len(b) == 0
    b.attend(q, q, q, start_frame=0)
    a.attend(q, q, q, start_frame=9)  # a jump forward is a new block
    assert a.frames()[0].tolist() == [0, 1, 2, 9, 10, 11]
    cache.reset()
    assert len(a) == 0 and len(b) == 0


def test_non_contiguous_inputs_and_no_autograd_graph():
    policy = POLICIES["pc_logits"]
    a, b = make_cache(policy, n=1, B=1), make_cache(policy, n=1, B=1)
    for f0, p, q, k, v, _ in stream(policy, a, blocks=8):
        # the same data in a transposed memory layout (heads-major), plus requires_grad inputs
        qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
        assert not qt.is_contiguous()
        out_a = a.layers[0].attend(q, k, v, start_frame=f0)
        out_b = b.layers[0].attend(qt, kt, vt, start_frame=f0)
        assert torch.equal(out_a, out_b) and not out_b.requires_grad
    assert torch.equal(a.layers[0].keys(), b.layers[0].keys())
    assert not b.layers[0].storage.k.requires_grad
