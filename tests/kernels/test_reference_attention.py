"""The reference op against an independent float64 brute force, plus invariants of lse, mass and GQA."""
import math

import pytest
import torch

from deepforcing_kernels import RopeSpec, apply_rope, release_logit_score, sink_attention


def brute_force(q, k, v, rope, sink_len, sink_shift, scale, m0, m1, key_shift=None):
    """Loops over batch, head and query in float64; keys re-phased by rotating pairs with explicit cos/sin."""
    q, k, v = q.double(), k.double().clone(), v.double()
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if rope is not None:
        freqs = [rope.theta ** (-2.0 * j / rope.band_dims[0]) for j in range(rope.temporal_pairs)]
        for b in range(B):
            for j in range(Lk):
                s = int(key_shift[b, j]) if key_shift is not None else (sink_shift if j < sink_len else 0)
                for p, w in enumerate(freqs):
                    a, c = (2 * p, 2 * p + 1) if rope.layout == "interleaved" else (p, p + D // 2)
                    cs, sn = math.cos(s * w), math.sin(s * w)
                    x, y = k[b, j, :, a].clone(), k[b, j, :, c].clone()
                    k[b, j, :, a] = x * cs - y * sn
                    k[b, j, :, c] = x * sn + y * cs
    out = torch.zeros(B, Lq, Hq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, Lq, dtype=torch.float64)
    mass = torch.zeros(B, Hkv, Lk, dtype=torch.float64)
    g = Hq // Hkv
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, :, h // g], v[b, :, h // g]
            for i in range(Lq):
                s = (kh @ q[b, i, h]) * scale
                mx = s.max()
                z = torch.exp(s - mx).sum()
                p = torch.exp(s - mx) / z
                out[b, i, h] = p @ vh
                lse[b, h, i] = mx + torch.log(z)
                if m0 <= i < m1:
                    mass[b, h // g] += p
    return out, lse, mass


CASES = [
    # B, Lq, Lk, Hq, Hkv, D, rope, sink_len, sink_shift, mass range
    (1, 5, 9, 2, 2, 16, RopeSpec.gptj(16), 4, 3, None),
    (2, 7, 13, 4, 2, 24, RopeSpec.wan(24), 13, -9, (2, 6)),
    (1, 3, 11, 6, 3, 32, RopeSpec.llama(32), 5, 123457, (0, 1)),
    (2, 4, 6, 3, 1, 16, None, 0, 0, (1, 4)),
]


@pytest.mark.parametrize("B,Lq,Lk,Hq,Hkv,D,rope,sink_len,shift,mr", CASES)
def test_reference_matches_brute_force(B, Lq, Lk, Hq, Hkv, D, rope, sink_len, shift, mr):
    dtype, tol = torch.float32, 2e-5
    q = torch.randn(B, Lq, Hq, D, dtype=dtype)
    k = torch.randn(B, Lk, Hkv, D, dtype=dtype)
    v = torch.randn(B, Lk, Hkv, D, dtype=dtype)
    res = sink_attention(q, k, v, rope=rope, sink_len=sink_len, sink_shift=shift, return_lse=True,
                         return_mass=True, mass_q_range=mr, backend="reference")
    m0, m1 = mr if mr else (0, Lq)
    out, lse, mass = brute_force(q, k, v, rope, sink_len, shift, D ** -0.5, m0, m1)
    assert res.out.dtype == dtype and res.lse.dtype == torch.float32 and res.mass.dtype == torch.float32
    torch.testing.assert_close(res.out.double(), out, atol=tol, rtol=tol)
    torch.testing.assert_close(res.lse.double(), lse, atol=tol, rtol=tol)
    torch.testing.assert_close(res.mass.double(), mass, atol=tol, rtol=tol)


def test_reference_per_key_shift_matches_brute_force():
    rope = RopeSpec.wan(24)
    q, k, v = torch.randn(2, 4, 2, 24), torch.randn(2, 7, 2, 24), torch.randn(2, 7, 2, 24)
    ks = torch.tensor([[0, 5, -3, 99999, 1, 1, 0], [2, 2, 2, -70000, 0, 3, 4]])
    res = sink_attention(q, k, v, rope=rope, key_shift=ks, softmax_scale=0.3, return_mass=True,
                         backend="reference")
    out, _, mass = brute_force(q, k, v, rope, 0, 0, 0.3, 0, 4, key_shift=ks)
    torch.testing.assert_close(res.out.double(), out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(res.mass.double(), mass, atol=2e-5, rtol=2e-5)
    # a [Lk] shift is broadcast over the batch
    res1 = sink_attention(q, k, v, rope=rope, key_shift=ks[0], softmax_scale=0.3, backend="reference")
    out1, _, _ = brute_force(q, k, v, rope, 0, 0, 0.3, 0, 4, key_shift=ks[0].expand(2, 7))
    torch.testing.assert_close(res1.double(), out1, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mr", [None, (0, 0), (3, 10), (9, 10)])
def test_mass_sums_to_queries_times_group(mr):
    Hq, Hkv, Lq = 6, 2, 10
    q, k, v = torch.randn(2, Lq, Hq, 32), torch.randn(2, 21, Hkv, 32), torch.randn(2, 21, Hkv, 32)
    res = sink_attention(q, k, v, return_mass=True, mass_q_range=mr, backend="reference")
    m0, m1 = mr if mr else (0, Lq)
    want = (m1 - m0) * (Hq // Hkv)
    torch.testing.assert_close(res.mass.sum(-1), torch.full((2, Hkv), float(want)), atol=1e-4, rtol=1e-5)
    assert (res.mass >= 0).all()


def test_lse_matches_torch_logsumexp():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 12, 4, 16), torch.randn(1, 12, 4, 16)
    res = sink_attention(q, k, v, softmax_scale=0.7, return_lse=True, backend="reference")
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 0.7
    torch.testing.assert_close(res.lse, torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-5)
    assert res.mass is None


def test_gqa_equals_repeated_kv_heads():
    rope = RopeSpec.wan(32)
    q, k, v = torch.randn(2, 5, 6, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
    kw = dict(rope=rope, sink_len=4, sink_shift=6, return_lse=True, return_mass=True, backend="reference")
    g = sink_attention(q, k, v, **kw)
    full = sink_attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), **kw)
    torch.testing.assert_close(g.out, full.out)
    torch.testing.assert_close(g.lse, full.lse)
    torch.testing.assert_close(g.mass, full.mass.view(2, 2, 3, 9).sum(2))


def test_sink_rephase_equals_attending_at_new_positions():
    """Re-phasing the sink on load is the same as having written the sink keys at shifted frames."""
    rope = RopeSpec.wan(24)
    grid = (4, 2, 2)  # 4 frames of 4 tokens; the first 2 frames are the sink
    raw = torch.randn(1, 16, 2, 24)
    q = apply_rope(torch.randn(1, 4, 2, 24), rope, frame_offset=30, grid=(1, 2, 2))
    v = torch.randn(1, 16, 2, 24)
    k = apply_rope(raw, rope, frame_offset=0, grid=grid)
    moved = sink_attention(q, k, v, rope=rope, sink_len=8, sink_shift=20, backend="reference")
    k_true = torch.cat([apply_rope(raw[:, :8], rope, frame_offset=20, grid=(2, 2, 2)),
                        apply_rope(raw[:, 8:], rope, frame_offset=2, grid=(2, 2, 2))], dim=1)
    direct = sink_attention(q, k_true, v, backend="reference")
    torch.testing.assert_close(moved, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_out_dtype(dtype):
    q, k, v = (torch.randn(1, 4, 2, 16).to(dtype) for _ in range(3))
    out = sink_attention(q, k, v, backend="reference")
    assert out.dtype == dtype
    ref = sink_attention(q.float(), k.float(), v.float(), backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_huge_logits_stay_finite():
    q, k, v = torch.randn(1, 6, 2, 16) * 100, torch.randn(1, 9, 2, 16) * 100, torch.randn(1, 9, 2, 16)
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, backend="reference")
    assert all(torch.isfinite(t).all() for t in res)


def test_empty_query_block():
    q, k, v = torch.randn(1, 0, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    res = sink_attention(q, k, v, return_lse=True, return_mass=True, backend="reference")
    assert res.out.shape == (1, 0, 2, 16) and res.lse.shape == (1, 2, 0)
    assert torch.equal(res.mass, torch.zeros(1, 2, 5))


def test_release_logit_score_brute_force():
    qb, k = torch.randn(2, 7, 4, 8), torch.randn(2, 11, 2, 8)
    got = release_logit_score(qb, k)
    want = torch.zeros(2, 11, dtype=torch.float64)
    for b in range(2):
        for j in range(11):
            for h in range(4):
                want[b, j] += float(qb[b, :, h].double().sum(0) @ k[b, j, h // 2].double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_production_logit_score_matches_the_float64_oracle():
    """The cache's chunked float32 GEMV score (what compression uses) against the oracle's float64 einsum."""
    from deepforcing_kernels.cache import release_logit_score as production
    from deepforcing_kernels.reference.attention import release_logit_score as oracle

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        qb = torch.randn(2, 4, 12, 128, generator=g)
        k = torch.randn(2, 9000, 4, 128, generator=g).to(dtype)  # several GEMV chunks, GQA 12 / 4
        got, want = production(qb, k), oracle(qb, k)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
