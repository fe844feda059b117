"""RoPE identities for every layout: rotate-then-rephase equals rotate-at-the-sum, spatial channels untouched."""
import math

import pytest
import torch

from deepforcing_kernels import RopeSpec, apply_rope, rephase

SPECS = {
    "wan128": RopeSpec.wan(128),
    "wan64": RopeSpec.wan(64),
    "llama64": RopeSpec.llama(64),
    "gptj32": RopeSpec.gptj(32),
}


def _grid(spec, frames):
    return (frames, 3, 5) if spec.num_axes == 3 else (frames,)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shift", [1, 7, -5, -5003, 123457])
@pytest.mark.parametrize("offset", [0, 5000, 70001])
def test_rotate_then_rephase_equals_rotate_at_sum(name, shift, offset):
    spec = SPECS[name]
    grid = _grid(spec, 4)
    L = math.prod(grid)
    x = torch.randn(2, L, 3, spec.head_dim, dtype=torch.float64)
    moved = rephase(apply_rope(x, spec, frame_offset=offset, grid=grid), spec, shift)
    direct = apply_rope(x, spec, frame_offset=offset + shift, grid=grid)
    torch.testing.assert_close(moved, direct, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", SPECS)
def test_rephase_fp32_large_positions(name):
    """fp32 inputs keep fp32-level accuracy at positions past 5000 (angles are formed in float64)."""
    spec = SPECS[name]
    grid = _grid(spec, 3)
    x = torch.randn(1, math.prod(grid), 2, spec.head_dim)
    moved = rephase(apply_rope(x, spec, frame_offset=6000, grid=grid), spec, 99991)
    direct = apply_rope(x.double(), spec, frame_offset=6000 + 99991, grid=grid)
    assert moved.dtype == torch.float32
    assert (moved.double() - direct).abs().max().item() < 2e-5


@pytest.mark.parametrize("name", SPECS)
def test_rephase_inverse_is_identity(name):
    spec = SPECS[name]
    k = torch.randn(2, 11, 2, spec.head_dim, dtype=torch.float64)
    for d in (3, -17, 100003):
        back = rephase(rephase(k, spec, d), spec, -d)
        torch.testing.assert_close(back, k, atol=1e-10, rtol=1e-10)


def test_rephase_leaves_spatial_channels_bit_identical():
    spec = RopeSpec.wan(128)
    k = torch.randn(1, 9, 2, 128)
    out = rephase(k, spec, 37)
    t = spec.temporal_pairs
    assert t == 22
    assert torch.equal(out[..., 2 * t:], k[..., 2 * t:])  # interleaved: temporal channels are 0 .. 2t-1
    assert not torch.allclose(out[..., :2 * t], k[..., :2 * t])


def test_wan_bands_match_spec():
    spec = RopeSpec.wan(128)
    assert spec.band_dims == (44, 42, 42)
    torch.testing.assert_close(spec.temporal_freqs(), 10000.0 ** (-2 * torch.arange(22, dtype=torch.float64) / 44))
    torch.testing.assert_close(spec.band_freqs(1), 10000.0 ** (-2 * torch.arange(21, dtype=torch.float64) / 42))


def test_wan_apply_rope_matches_complex_formula():
    """Independent check of the Wan layout: interleaved complex pairs, (frame, row, col) bands."""
    spec = RopeSpec.wan(24)  # temporal 8 channels, height 8, width 8
    grid = (2, 2, 3)
    x = torch.randn(1, 12, 1, 24, dtype=torch.float64)
    out = apply_rope(x, spec, frame_offset=3, grid=grid)
    xc = torch.view_as_complex(x.reshape(1, 12, 1, 12, 2))
    ang = torch.empty(12, 12, dtype=torch.float64)
    tok = 0
    for f in range(2):
        for r in range(2):
            for c in range(3):
                ang[tok, :4] = (3 + f) * 10000.0 ** (-2 * torch.arange(4.0, dtype=torch.float64) / 8)
                ang[tok, 4:8] = r * 10000.0 ** (-2 * torch.arange(4.0, dtype=torch.float64) / 8)
                ang[tok, 8:] = c * 10000.0 ** (-2 * torch.arange(4.0, dtype=torch.float64) / 8)
                tok += 1
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None]).reshape(1, 12, 1, 24)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_llama_layout_is_half_split():
    spec = RopeSpec.llama(8)
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., 0] = 1.0  # real part of pair 0; its imaginary part is channel 4
    out = apply_rope(x, spec, frame_offset=1, grid=(1,))
    assert out[0, 0, 0, 0].item() == pytest.approx(math.cos(1.0))
    assert out[0, 0, 0, 4].item() == pytest.approx(math.sin(1.0))
    assert out[0, 0, 0, 1].item() == 0.0


def test_per_token_shift_tensor_shapes():
    spec = RopeSpec.gptj(16)
    k = torch.randn(2, 5, 1, 16, dtype=torch.float64)
    s1 = torch.tensor([0, 1, 2, -3, 50000])
    per_tok = rephase(k, spec, s1)
    for j in range(5):
        torch.testing.assert_close(per_tok[:, j], rephase(k[:, j:j + 1], spec, int(s1[j]))[:, 0])
    s2 = torch.stack([s1, -s1])
    per_b = rephase(k, spec, s2)
    torch.testing.assert_close(per_b[1], rephase(k[1:], spec, -s1)[0])


def test_no_length_cap():
    """The release's 1024-entry angle table crashes past ~1021 frames; positions here are unbounded."""
    spec = RopeSpec.wan(64)
    x = torch.randn(1, 2 * 2 * 2, 1, 64)
    out = apply_rope(x, spec, frame_offset=10**6, grid=(2, 2, 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("call, exc", [
    (lambda: rephase(torch.randn(1, 2, 1, 16), RopeSpec.gptj(32), 1), ValueError),
    (lambda: rephase(torch.randn(1, 2, 1, 16), RopeSpec.gptj(16), 1.5), TypeError),
    (lambda: rephase(torch.randn(1, 2, 1, 16), RopeSpec.gptj(16), torch.tensor([1.0, 2.0])), TypeError),
    (lambda: rephase(torch.randn(1, 2, 1, 16), RopeSpec.gptj(16), torch.tensor([1, 2, 3])), ValueError),
    (lambda: rephase(torch.randn(2, 16), RopeSpec.gptj(16), 1), ValueError),
    (lambda: rephase(torch.randn(1, 2, 1, 16), "gptj", 1), TypeError),
    (lambda: apply_rope(torch.randn(1, 6, 1, 16), RopeSpec.gptj(16), frame_offset=0, grid=(5,)), ValueError),
    (lambda: apply_rope(torch.randn(1, 6, 1, 24), RopeSpec.wan(24), frame_offset=0, grid=(6,)), ValueError),
    (lambda: apply_rope(torch.randn(1, 6, 1, 16), RopeSpec.gptj(16), frame_offset=0.5, grid=(6,)), TypeError),
    (lambda: RopeSpec.wan(7), ValueError),
    (lambda: RopeSpec.llama(0), ValueError),
])
def test_bad_rope_input(call, exc):
    with pytest.raises(exc):
        call()
