"""The compact Wan2.1 causal DiT: names, pieces against brute force, a whole block against a functional float64
re-derivation of docs/spec.md section 1, checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

from deepforcing_kernels.models import CausalWanModel, WanConfig, load_wan_state_dict, unpatchify
from deepforcing_kernels.models.wan import WanRMSNorm, sinusoidal_embedding
from deepforcing_kernels.reference.rope import apply_rope

# ------------------------------------------------------------------------------------------------ helpers


pytestmark = pytest.mark.usefixtures("one_thread")

class _FullLayer:
    """Stand-in for one cache layer: plain full attention over every block appended so far; a repeated
    start_frame overwrites the last block (the Self-Forcing call pattern)."""

    def __init__(self):
        self.k = self.v = None
        self.start = None
        self.calls = []

    def attend(self, q, k, v, start_frame):
        self.calls.append((start_frame, q.dtype, q.shape))
        if self.start == start_frame:
            self.k[:, -k.shape[1]:] = k
            self.v[:, -v.shape[1]:] = v
        else:
            self.k = k.clone() if self.k is None else torch.cat([self.k, k], 1)
            self.v = v.clone() if self.v is None else torch.cat([self.v, v], 1)
            self.start = start_frame
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        o = F.scaled_dot_product_attention(q.transpose(1, 2).to(cd), self.k.transpose(1, 2).to(cd),
                                           self.v.transpose(1, 2).to(cd))
        return o.transpose(1, 2).to(q.dtype)


class FullCache:
    def __init__(self, num_layers, dtype=None):
        self.layers = [_FullLayer() for _ in range(num_layers)]
        if dtype is not None:
            self.dtype = dtype


def random_model(cfg=None, seed=0, dtype=torch.float32):
    cfg = cfg or WanConfig.tiny()
    m = CausalWanModel(cfg)
    m.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    # make norm weights / biases non-trivial so a swapped or skipped affine shows up
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.to(dtype).eval()


def inputs(cfg, b=1, nf=3, t=1000.0, lt=5, seed=0, hw=None):
    g = torch.Generator().manual_seed(seed)
    h, w = hw or cfg.latent_size
    x = torch.randn(b, nf, cfg.in_dim, h, w, generator=g)
    ts = torch.full((b, nf), float(t))
    txt = torch.randn(b, lt, cfg.text_dim, generator=g)
    return x, ts, txt


# ------------------------------------------------------------------------------------------------ config / names
def test_configs():
    tiny = WanConfig.tiny()
    assert tiny.head_dim == 48 and tiny.rope().band_dims == (16, 16, 16)
    big = WanConfig.wan_1_3b()
    assert (big.dim, big.ffn_dim, big.num_heads, big.num_layers, big.text_dim, big.text_len, big.freq_dim,
            big.in_dim, big.out_dim, big.eps) == (1536, 8960, 12, 30, 4096, 512, 256, 16, 16, 1e-6)
    assert big.tokens_per_frame() == 1560 and big.rope().band_dims == (44, 42, 42)
    assert WanConfig.from_name("wan-1.3b") == big
    with pytest.raises(ValueError):
        WanConfig.tiny(num_heads=5)
    with pytest.raises(ValueError):
        WanConfig.tiny(patch_size=(2, 2, 2))
    assert WanConfig.from_name("wan-14b") == WanConfig.from_name("wan_14b") == WanConfig.wan_14b()
    with pytest.raises(ValueError, match="unknown model"):
        WanConfig.from_name("wan-7b")


def _wan_parameter_count(dim, ffn, layers, text_dim=4096, in_dim=16, out_dim=16, freq_dim=256, patch=4):
    """Parameters of a Wan2.1 T2V DiT from wan/modules/model.py, counted by hand (weights + biases)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    attn = 4 * lin(dim, dim) + 2 * dim  # q, k, v, o + the q / k RMSNorm weights
    block = 2 * attn + 2 * dim + lin(dim, ffn) + lin(ffn, dim) + 6 * dim  # self, cross, norm3 (affine), ffn, mod.
    return (in_dim * patch * dim + dim + lin(text_dim, dim) + lin(dim, dim) + lin(freq_dim, dim) + lin(dim, dim)
            + lin(dim, 6 * dim) + layers * block + lin(dim, patch * out_dim) + 2 * dim)


@pytest.mark.parametrize("name,sizes", [("wan_1_3b", (1536, 8960, 30)), ("wan_14b", (5120, 13824, 40))])
def test_parameter_count_on_meta_matches_the_published_architecture(name, sizes):
    with torch.device("meta"):
        m = CausalWanModel(WanConfig.from_name(name))
    n = sum(p.numel() for p in m.parameters())
    assert n == _wan_parameter_count(*sizes)
    assert (1.40e9 < n < 1.43e9) if name == "wan_1_3b" else (14.0e9 < n < 14.4e9)  # "14B" is 14.29 B


def test_parameter_names_and_1_3b_size():
    names = set(CausalWanModel(WanConfig.tiny()).state_dict())
    for n in ("patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight", "text_embedding.2.weight",
              "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
              "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias",
              "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight", "blocks.0.norm3.weight",
              "blocks.0.norm3.bias", "blocks.0.cross_attn.k.weight", "blocks.0.cross_attn.norm_k.weight",
              "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "blocks.1.modulation", "head.head.weight",
              "head.head.bias", "head.modulation"):
        assert n in names, n
    # norm1 / norm2 / head.norm have no affine parameters in Wan
    assert not any(".norm1." in n or ".norm2." in n or n.startswith("head.norm") for n in names)
    with torch.device("meta"):
        big = CausalWanModel(WanConfig.wan_1_3b())
    shapes = {n: tuple(p.shape) for n, p in big.named_parameters()}
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["blocks.29.modulation"] == (1, 6, 1536) and shapes["head.modulation"] == (1, 2, 1536)
    assert shapes["head.head.weight"] == (64, 1536) and shapes["time_projection.1.weight"] == (9216, 1536)
    assert 1.40e9 < sum(math.prod(s) for s in shapes.values()) < 1.43e9  # "1.3B" is 1.42 B parameters


def test_fresh_model_predicts_zero_flow_like_wan():
    cfg = WanConfig.tiny()
    m = CausalWanModel(cfg).eval()  # Wan's init zeroes the output head
    x, t, txt = inputs(cfg)
    with torch.no_grad():
        assert torch.count_nonzero(m(x, t, txt, cache=FullCache(2), start_frame=0)) == 0


# ------------------------------------------------------------------------------------------------ pieces
def test_sinusoid_is_cos_first_float64():
    t = torch.tensor([0.0, 833.3333333333334, 1000.0])
    e = sinusoidal_embedding(8, t)
    assert e.dtype == torch.float64
    for i, tv in enumerate(t.tolist()):
        for k in range(4):
            w = 10000.0 ** (-k / 4)
            assert e[i, k].item() == pytest.approx(math.cos(tv * w), abs=1e-12)
            assert e[i, 4 + k].item() == pytest.approx(math.sin(tv * w), abs=1e-12)


def test_rmsnorm_uses_config_eps():
    m = CausalWanModel(WanConfig.tiny())
    norms = [mod for mod in m.modules() if isinstance(mod, WanRMSNorm)]
    assert len(norms) == 4 * 2 and all(n.eps == 1e-6 for n in norms)
    # at mean(x^2) = 1e-6 the eps matters: 1e-6 gives 1/sqrt(2), the class default 1e-5 would give 0.30
    x = torch.full((1, 2, 96), 1e-3)
    assert torch.allclose(m.blocks[0].self_attn.norm_q(x), torch.full_like(x, 2 ** -0.5), atol=1e-6)
    lns = [m.blocks[0].norm1, m.blocks[0].norm2, m.blocks[0].norm3, m.head.norm]
    assert all(ln.eps == 1e-6 for ln in lns)
    assert m.blocks[0].norm3.weight is not None and m.blocks[0].norm1.weight is None


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 3), (1, 1, 1)])
def test_unpatchify_channel_order_against_loop(patch):
    pt, ph, pw = patch
    b, f, h, w, c = 2, 2, 3, 2, 3
    x = torch.randn(b, f * h * w, pt * ph * pw * c)
    out = unpatchify(x, (f, h, w), patch, c)
    assert out.shape == (b, f * pt, c, h * ph, w * pw)
    ref = torch.empty_like(out)
    for bi in range(b):
        for fi in range(f):
            for hi in range(h):
                for wi in range(w):
                    tok = (fi * h + hi) * w + wi
                    for p in range(pt):
                        for q in range(ph):
                            for r in range(pw):
                                for ci in range(c):
                                    ch = ((p * ph + q) * pw + r) * c + ci
                                    ref[bi, fi * pt + p, ci, hi * ph + q, wi * pw + r] = x[bi, tok, ch]
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ whole forward
def _reference_forward(m, latents, t, txt, start_frame, prev_kv=None):
    """docs/spec.md section 1 written out functionally in float64 from the state dict: one block of frames attending to
    ``prev_kv`` (list per layer of (k, v) already RoPE'd, or None) plus itself. Returns (flow, new kv list)."""
    cfg = m.config
    sd = {k: v.double() for k, v in m.state_dict().items()}
    eps, dim, n = cfg.eps, cfg.dim, cfg.num_heads
    d = dim // n
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    ln = lambda x: F.layer_norm(x, (dim,), eps=eps)  # noqa: E731
    rms = lambda x, p: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[p + ".weight"]  # noqa: E731
    B, nf, C, H, W = latents.shape
    h, w = H // 2, W // 2
    # patch embedding as an explicit matmul over 2x2 patches (channel-major kernel layout c, 1, kh, kw)
    patches = latents.double().reshape(B, nf, C, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, nf * h * w, -1)
    x = patches @ sd["patch_embedding.weight"].reshape(dim, -1).T + sd["patch_embedding.bias"]
    # time
    half = cfg.freq_dim // 2
    fr = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = t.double().reshape(-1, 1) * fr
    sinus = torch.cat([ang.cos(), ang.sin()], 1)
    e = lin(F.silu(lin(sinus, "time_embedding.0")), "time_embedding.2").reshape(B, nf, dim)
    e0 = lin(F.silu(e), "time_projection.1").reshape(B, nf, 6, dim)
    # text
    ctx = torch.cat([txt.double(), txt.new_zeros(B, cfg.text_len - txt.shape[1], cfg.text_dim).double()], 1)
    ctx = lin(gelu(lin(ctx, "text_embedding.0")), "text_embedding.2")
    per_frame = lambda v: v.repeat_interleave(h * w, dim=1)  # [B, nf, dim] -> [B, L, dim]  # noqa: E731

    def mha(q, k, v):
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(B, -1, dim)

    new_kv = []
    for i in range(cfg.num_layers):
        p = f"blocks.{i}"
        mod = sd[p + ".modulation"][0] + e0  # [B, nf, 6, dim]
        sh1, sc1, g1, sh2, sc2, g2 = (per_frame(mod[:, :, j]) for j in range(6))
        y = ln(x) * (1 + sc1) + sh1
        q = rms(lin(y, p + ".self_attn.q"), p + ".self_attn.norm_q").view(B, -1, n, d)
        k = rms(lin(y, p + ".self_attn.k"), p + ".self_attn.norm_k").view(B, -1, n, d)
        v = lin(y, p + ".self_attn.v").view(B, -1, n, d)
        q = apply_rope(q, m.rope, frame_offset=start_frame, grid=(nf, h, w))
        k = apply_rope(k, m.rope, frame_offset=start_frame, grid=(nf, h, w))
        if prev_kv is not None:
            k_all, v_all = torch.cat([prev_kv[i][0], k], 1), torch.cat([prev_kv[i][1], v], 1)
        else:
            k_all, v_all = k, v
        new_kv.append((k_all, v_all))
        x = x + g1 * lin(mha(q, k_all, v_all), p + ".self_attn.o")
        y = F.layer_norm(x, (dim,), sd[p + ".norm3.weight"], sd[p + ".norm3.bias"], eps)
        qc = rms(lin(y, p + ".cross_attn.q"), p + ".cross_attn.norm_q").view(B, -1, n, d)
        kc = rms(lin(ctx, p + ".cross_attn.k"), p + ".cross_attn.norm_k").view(B, -1, n, d)
        vc = lin(ctx, p + ".cross_attn.v").view(B, -1, n, d)
        x = x + lin(mha(qc, kc, vc), p + ".cross_attn.o")
        y = ln(x) * (1 + sc2) + sh2
        x = x + g2 * lin(gelu(lin(y, p + ".ffn.0")), p + ".ffn.2")
    mod = sd["head.modulation"][0] + e[:, :, None]  # [B, nf, 2, dim], e without SiLU
    out = lin(ln(x) * (1 + per_frame(mod[:, :, 1])) + per_frame(mod[:, :, 0]), "head.head")
    c = cfg.out_dim
    flow = out.reshape(B, nf, h, w, 2, 2, c).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, nf, c, H, W)
    return flow, new_kv


def test_forward_matches_functional_reference_over_two_blocks():
    cfg = WanConfig.tiny()
    m = random_model(cfg, dtype=torch.float64)
    cache = FullCache(cfg.num_layers)
    x0, t0, txt = inputs(cfg, b=2, t=937.5, seed=1)
    t0[:, 1] = 625.0  # per-frame timesteps must stay per frame
    x1, t1, _ = inputs(cfg, b=2, t=833.3333333333334, seed=2)
    with torch.no_grad():
        got0 = m(x0, t0, txt, cache=cache, start_frame=0)
        got1 = m(x1, t1, txt, cache=cache, start_frame=3)
    ref0, kv = _reference_forward(m, x0, t0, txt, 0)
    ref1, _ = _reference_forward(m, x1, t1, txt, 3, prev_kv=kv)
    assert got0.shape == (2, 3, cfg.out_dim, 8, 8) and got0.abs().mean() > 1e-2
    # the norms run in float32 as in Wan (x.float()), so even a float64 model agrees only to ~1e-7; a wiring
    # mistake (chunk order, a missing gate, e with SiLU) shows up as O(0.1)
    torch.testing.assert_close(got0, ref0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got1, ref1, rtol=1e-5, atol=1e-6)


def test_attention_goes_through_cache_in_its_dtype():
    cfg = WanConfig.tiny()
    m = random_model(cfg)
    cache = FullCache(cfg.num_layers, dtype=torch.bfloat16)
    x, t, txt = inputs(cfg)
    with torch.no_grad():
        out = m(x, t, txt, cache=cache, start_frame=6)
    assert out.dtype == torch.float32
    for layer in cache.layers:
        assert layer.calls == [(6, torch.bfloat16, torch.Size([1, 3 * 16, 2, 48]))]


def test_rope_is_relative_and_positions_matter():
    cfg = WanConfig.tiny()
    m = random_model(cfg)
    xa, t, txt = inputs(cfg, seed=3)
    xb, _, _ = inputs(cfg, seed=4)

    def two_blocks(f_a, f_b):
        c = FullCache(cfg.num_layers)
        with torch.no_grad():
            m(xa, t, txt, cache=c, start_frame=f_a)
            return m(xb, t, txt, cache=c, start_frame=f_b)

    base = two_blocks(0, 3)
    # a common shift of every position leaves attention unchanged (RoPE is relative) ...
    torch.testing.assert_close(two_blocks(1000, 1003), base, rtol=1e-4, atol=1e-4)
    # ... a different gap between the blocks does not
    assert (two_blocks(0, 9) - base).abs().max() > 1e-3


def test_float_timesteps_and_unmasked_text_padding():
    cfg = WanConfig.tiny()
    m = random_model(cfg)
    x, t, txt = inputs(cfg, lt=5)
    run = lambda mm, tt, te: mm(x, tt, te, cache=FullCache(cfg.num_layers), start_frame=0)  # noqa: E731
    with torch.no_grad():
        a = run(m, torch.full((1, 3), 833.3333333333334), txt)
        b = run(m, torch.full((1, 3), 833.0), txt)
        assert (a - b).abs().max() > 1e-4  # a rounded timestep is a different input
        padded = torch.cat([txt, torch.zeros(1, 11, cfg.text_dim)], 1)
        torch.testing.assert_close(run(m, t, padded), run(m, t, txt))
        # padding rows are attended: without padding (text_len=None) the output changes
        m2 = CausalWanModel(WanConfig.tiny(text_len=None))
        m2.load_state_dict(m.state_dict())
        assert (run(m2.eval(), t, txt) - run(m, t, txt)).abs().max() > 1e-4
        with pytest.raises(ValueError, match="text_len"):
            run(m, t, torch.zeros(1, 17, cfg.text_dim))


def test_bf16_model_and_cache_track_fp32():
    """bf16 is the production dtype: norms and the timestep sinusoid stay in float32 / float64 inside."""
    cfg = WanConfig.tiny()
    m32 = random_model(cfg)
    m16 = random_model(cfg, dtype=torch.bfloat16)
    x, t, txt = inputs(cfg, t=625.0)
    with torch.no_grad():
        ref = m32(x, t, txt, cache=FullCache(cfg.num_layers), start_frame=9)
        got = m16(x, t, txt, cache=FullCache(cfg.num_layers, dtype=torch.bfloat16), start_frame=9)
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 3e-2, err


def test_bad_inputs():
    cfg = WanConfig.tiny()
    m = random_model(cfg)
    x, t, txt = inputs(cfg)
    c = FullCache(cfg.num_layers)
    with pytest.raises(ValueError, match="channels"):
        m(x[:, :, :3], t, txt, cache=c, start_frame=0)
    with pytest.raises(ValueError, match="timestep"):
        m(x, t[:, :2], txt, cache=c, start_frame=0)
    with pytest.raises(ValueError, match="layers"):
        m(x, t, txt, cache=FullCache(1), start_frame=0)
    with pytest.raises(TypeError, match="start_frame"):
        m(x, t, txt, cache=c, start_frame=1.5)
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 3, 4, 7, 8), t, txt, cache=c, start_frame=0)
    with pytest.raises(ValueError, match="text_embeds"):
        m(x, t, torch.randn(1, 4, 31), cache=c, start_frame=0)


# ------------------------------------------------------------------------------------------------ loading
def _outputs(m, seed=5):
    x, t, txt = inputs(m.config, seed=seed)
    with torch.no_grad():
        return m(x, t, txt, cache=FullCache(m.config.num_layers), start_frame=0)


def test_checkpoint_round_trip_and_wrapper_prefixes(tmp_path):
    cfg = WanConfig.tiny()
    src = random_model(cfg, seed=7)
    path = tmp_path / "ckpt.pt"
    torch.save(src.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    want = _outputs(src)
    variants = {
        "plain": sd,
        "self-forcing wrapper": {"model." + k: v for k, v in sd.items()},
        "training checkpoint": {"generator": {"model." + k: v for k, v in sd.items()},
                                "generator_ema": {"model." + k: torch.zeros_like(v) for k, v in sd.items()}},
        "generator.model.": {"generator.model." + k: v for k, v in sd.items()},
        "fsdp + checkpoint wrappers": {"model._fsdp_wrapped_module." +
                                       k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.")
                                       : v for k, v in sd.items()},
    }
    for name, variant in variants.items():
        dst = CausalWanModel(cfg).eval()
        res = load_wan_state_dict(dst, variant)
        assert res.missing == [] and res.unexpected == [], name
        torch.testing.assert_close(_outputs(dst), want, rtol=0, atol=0, msg=name)
    # EMA weights on request
    dst = CausalWanModel(cfg).eval()
    load_wan_state_dict(dst, variants["training checkpoint"], select="generator_ema")
    assert torch.count_nonzero(dst.head.head.weight) == 0
    # a bf16 checkpoint loads into an fp32 model (cast on copy)
    dst = CausalWanModel(cfg)
    load_wan_state_dict(dst, {k: v.bfloat16() for k, v in sd.items()})
    assert dst.head.head.weight.dtype == torch.float32


def test_load_errors_list_missing_and_unexpected():
    cfg = WanConfig.tiny()
    sd = dict(random_model(cfg).state_dict())
    del sd["blocks.1.ffn.0.weight"]
    sd["blocks.0.self_attn.rope_table"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_wan_state_dict(CausalWanModel(cfg), sd)
    msg = str(err.value)
    assert "blocks.1.ffn.0.weight" in msg and "blocks.0.self_attn.rope_table" in msg
    assert "missing (1)" in msg and "unexpected (1)" in msg
    res = load_wan_state_dict(CausalWanModel(cfg), sd, strict=False)
    assert res.missing == ["blocks.1.ffn.0.weight"] and res.unexpected == ["blocks.0.self_attn.rope_table"]
    bad = dict(random_model(cfg).state_dict())
    bad["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        load_wan_state_dict(CausalWanModel(cfg), bad)
    clash = dict(random_model(cfg).state_dict())
    clash["model.head.modulation"] = clash["head.modulation"]
    with pytest.raises(ValueError, match="both name"):
        load_wan_state_dict(CausalWanModel(cfg), clash)
    with pytest.raises(TypeError):
        load_wan_state_dict(CausalWanModel(cfg), [1, 2])


def test_text_prepared_once_gives_the_same_flow():
    """The cross-attention K/V computed once per prompt (prepare_text) give the flow of the raw text."""
    from deepforcing_kernels import CachePolicy, StreamingKVCache

    cfg = WanConfig.tiny()
    m = CausalWanModel(cfg).eval()
    m.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    x, t, txt = inputs(cfg)

    def cache():
        return StreamingKVCache(CachePolicy.sliding(), num_layers=cfg.num_layers, batch_size=x.shape[0],
                                num_heads=cfg.num_heads, head_dim=cfg.head_dim, tokens_per_frame=16,
                                rope=cfg.rope(), dtype=torch.float32)
    with torch.no_grad():
        a = m(x, t, txt, cache=cache(), start_frame=0)
        ctx = m.prepare_text(txt)
        b = m(x, t, ctx, cache=cache(), start_frame=0)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert len(ctx.kv) == cfg.num_layers and ctx.kv[0][0].shape == (txt.shape[0], cfg.num_heads, cfg.text_len,
                                                                     cfg.head_dim)
    with pytest.raises(ValueError, match="text context"):
        m(x, t, type(ctx)(ctx.kv[:1]), cache=cache(), start_frame=0)
