"""WanVAE: original-key loading against a re-derivation of Wan2.1's VAE, streaming decode, diffusers folders."""
import pytest
import torch

pytest.importorskip("diffusers")

from wan_original.vae import OriginalWanVAE  # noqa: E402

from deepforcing_kernels.video import WanVAE  # noqa: E402
from deepforcing_kernels.video.vae import (  # noqa: E402
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    original_state_dict_shapes,
    original_to_diffusers_key,
    random_original_state_dict,
)

# Wan2.1's layout at small widths; one config with the real z_dim = 16 (so Wan2.1's mean / std are used) and
# the real num_res_blocks = 2, one with the tiny model's settings.
CONFIGS = [
    dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
         temperal_downsample=(False, True, True)),
    dict(dim=8, z_dim=4, dim_mult=(1, 2, 2, 1), num_res_blocks=1, attn_scales=(),
         temperal_downsample=(True, False, True)),
]


def _stats(cfg):
    z = cfg["z_dim"]
    if z == 16:
        return torch.tensor(WAN21_LATENT_MEAN), torch.tensor(WAN21_LATENT_STD)
    return torch.zeros(z), torch.ones(z)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["z16-nrb2", "z4-nrb1"])
def test_decode_matches_original(cfg):
    sd = random_original_state_dict(seed=1, **cfg)
    vae = WanVAE.from_original(sd, **cfg)
    ref = OriginalWanVAE(sd, cfg["dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"],
                         cfg["temperal_downsample"])
    mean, std = _stats(cfg)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(2, 4, cfg["z_dim"], 3, 5, generator=g)  # [B, F, C, h, w], odd latent size
    out = vae.decode(lat)
    want = ref.decode(lat.permute(0, 2, 1, 3, 4), mean, std).permute(0, 2, 1, 3, 4)
    tf = 2 ** sum(cfg["temperal_downsample"])
    assert out.shape == (2, 1 + tf * 3, 3, 24, 40)
    assert 0.05 < want.std() and (want.abs() < 1).float().mean() > 0.5  # not a saturated, trivial output
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["z16-nrb2", "z4-nrb1"])
def test_encode_matches_original(cfg):
    sd = random_original_state_dict(seed=3, **cfg)
    vae = WanVAE.from_original(sd, **cfg)
    ref = OriginalWanVAE(sd, cfg["dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"],
                         cfg["temperal_downsample"])
    mean, std = _stats(cfg)
    tf = 2 ** sum(cfg["temperal_downsample"])
    g = torch.Generator().manual_seed(4)
    video = torch.rand(1, 1 + 2 * tf, 3, 16, 24, generator=g) * 2 - 1
    lat = vae.encode(video)
    want = ref.encode(video.permute(0, 2, 1, 3, 4), mean, std).permute(0, 2, 1, 3, 4)
    assert lat.shape == (1, 3, cfg["z_dim"], 2, 3)
    torch.testing.assert_close(lat, want, atol=1e-5, rtol=0)


def test_real_size_key_table_matches_diffusers_script():
    """At the real sizes the derived names are exactly diffusers' AutoencoderKLWan() parameter names, and a few
    rows checked by hand against scripts/convert_wan_to_diffusers.py (convert_vae)."""
    from diffusers import AutoencoderKLWan
    with torch.device("meta"):
        own = AutoencoderKLWan().state_dict()
    shapes = original_state_dict_shapes()
    mapped = {original_to_diffusers_key(k): s for k, s in shapes.items()}
    assert None not in mapped
    assert set(mapped) == set(own)
    for k, s in mapped.items():
        assert tuple(own[k].shape) == s, k
    table = {"decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
             "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
             "decoder.upsamples.7.time_conv.bias": "decoder.up_blocks.1.upsamplers.0.time_conv.bias",
             "decoder.upsamples.14.residual.6.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
             "encoder.downsamples.2.resample.1.weight": "encoder.down_blocks.2.resample.1.weight",
             "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
             "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
             "conv2.bias": "post_quant_conv.bias", "decoder.head.2.weight": "decoder.conv_out.weight"}
    for k, v in table.items():
        assert original_to_diffusers_key(k) == v


def test_decode_matches_diffusers_decode():
    """WanVAE.decode runs diffusers' decoder frame by frame; AutoencoderKLWan.decode of the raw latents agrees."""
    vae = WanVAE.tiny(seed=4)
    lat = torch.randn(1, 5, vae.latent_channels, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vae.model.decode(vae._unnormalise(lat)).sample.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(vae.decode(lat), want, atol=1e-6, rtol=0)


def _chunks(n, sizes):
    out, a = [], 0
    for s in sizes:
        out.append((a, min(n, a + s)))
        a += s
    return out


@pytest.mark.parametrize("sizes", [(1, 3, 3, 3), (3, 1, 2, 4), (2, 2, 2, 2, 2), (10,)])
def test_stream_decode_equals_one_shot(sizes):
    vae = WanVAE.tiny(seed=5)
    f = sum(sizes)
    lat = torch.randn(1, f, vae.latent_channels, 2, 3, generator=torch.Generator().manual_seed(6))
    full = vae.decode(lat)
    dec = vae.stream_decoder()
    parts = [dec.decode(lat[:, a:b]) for a, b in _chunks(f, sizes)]
    assert [p.shape[1] for p in parts] == [vae.output_frames(sizes[0])] + [4 * s for s in sizes[1:]]
    assert torch.equal(torch.cat(parts, 1), full)
    assert dec.latent_frames == f


def test_stream_cache_is_bounded_and_resets():
    vae = WanVAE.tiny(seed=0)
    dec = vae.stream_decoder()
    lat = torch.randn(1, 12, vae.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    sizes = []
    for i in range(0, 12, 3):
        dec.decode(lat[:, i:i + 3])
        sizes.append(dec.cache_bytes())
    assert sizes[1] == sizes[2] == sizes[3] > 0  # two frames per causal conv, whatever the stream length
    assert dec.decode(lat[:, :0]).shape == (1, 0, 3, 32, 32)
    with pytest.raises(ValueError, match="reset"):
        dec.decode(torch.randn(1, 1, vae.latent_channels, 4, 6))
    dec.reset()
    again = torch.cat([dec.decode(lat[:, :5]), dec.decode(lat[:, 5:])], 1)
    assert torch.equal(again, vae.decode(lat))


def test_bad_inputs():
    vae = WanVAE.tiny(seed=0)
    with pytest.raises(ValueError, match="channels"):
        vae.decode(torch.randn(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="frames"):
        vae.encode(torch.randn(1, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.randn(1, 5, 3, 12, 16))
    cfg = dict(dim=4, z_dim=4, num_res_blocks=1)
    sd = random_original_state_dict(seed=0, **cfg)
    sd["decoder.extra.weight"] = torch.zeros(1)
    del sd["decoder.head.2.bias"]
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder.extra.weight.*missing \(1\): decoder.conv_out"):
        WanVAE.from_original(sd, **cfg)
    sd = random_original_state_dict(seed=0, **cfg)
    with pytest.raises(ValueError, match="shape"):
        WanVAE.from_original(sd, dim=8, z_dim=4, num_res_blocks=1)
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAE.from_original(sd, attn_scales=(0.5,), **cfg)


def test_files_and_folders(tmp_path):
    cfg = dict(dim=4, z_dim=4, num_res_blocks=1)
    sd = random_original_state_dict(seed=7, **cfg)
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    vae = WanVAE.from_original(tmp_path / "Wan2.1_VAE.pth", **cfg)
    lat = torch.randn(1, 2, 4, 2, 2, generator=torch.Generator().manual_seed(8))
    # the same weights written as a diffusers vae/ folder load to the same decoder
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        other = WanVAE.from_pretrained(folder)
        assert torch.equal(other.decode(lat), vae.decode(lat))
    with pytest.raises(FileNotFoundError, match="from_original"):
        WanVAE.from_pretrained(tmp_path)  # a folder of the original format
    with pytest.raises(ValueError, match="diffusers' layout"):
        WanVAE.from_original(vae.model.state_dict(), **cfg)
    with pytest.raises(FileNotFoundError, match="no such file"):
        WanVAE.from_original(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights file"):
        WanVAE.from_original(tmp_path / "junk.pth")


def test_tiny_shapes_and_dtype():
    vae = WanVAE.tiny(seed=0, dtype=torch.bfloat16)
    out = vae.decode(torch.randn(1, 2, 4, 2, 3))
    assert out.shape == (1, 5, 3, 16, 24) and out.dtype == torch.bfloat16
    assert out.abs().max() <= 1


def test_weights_folders(tmp_path):
    """load_front_end finds the text encoder, tokenizer and VAE in both published folder layouts."""
    from test_video_t5 import _tokenizer_folder

    from deepforcing_kernels.video import load_front_end, weights_layout
    from deepforcing_kernels.video.t5 import random_original_state_dict as t5_sd
    vcfg = dict(dim=4, z_dim=4, num_res_blocks=1)
    tcfg = dict(vocab=300, dim=24, dim_attn=32, dim_ffn=40, num_heads=4, num_layers=2, num_buckets=32)
    orig = tmp_path / "Wan2.1-T2V-1.3B"
    orig.mkdir()
    with pytest.raises(FileNotFoundError, match="neither an original"):
        weights_layout(orig)
    torch.save(random_original_state_dict(seed=0, **vcfg), orig / "Wan2.1_VAE.pth")
    with pytest.raises(FileNotFoundError, match="lacks .*models_t5_umt5-xxl-enc-bf16.pth"):
        weights_layout(orig)
    torch.save(t5_sd(seed=0, **tcfg), orig / "models_t5_umt5-xxl-enc-bf16.pth")
    _tokenizer_folder(orig / "google" / "umt5-xxl")
    assert weights_layout(orig) == "original"
    enc, vae = load_front_end(orig, text_len=10, vae_config=vcfg, text_config=tcfg)
    emb = enc(["a red fox"])
    lat = torch.randn(1, 2, 4, 2, 2)
    diff = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    vae.model.save_pretrained(str(diff / "vae"))
    enc.model.save_pretrained(str(diff / "text_encoder"))
    with pytest.raises(FileNotFoundError, match="diffusers-format but lacks .*tokenizer"):
        weights_layout(diff)
    _tokenizer_folder(diff / "tokenizer")
    assert weights_layout(diff) == "diffusers"
    enc2, vae2 = load_front_end(diff, text_len=10)
    torch.testing.assert_close(enc2(["a red fox"]), emb, atol=1e-6, rtol=0)
    assert torch.equal(vae2.decode(lat), vae.decode(lat))


def test_import_is_light():
    """import deepforcing_kernels (and .video, .models.checkpoints) loads none of the optional libraries; a missing one
    gives one ImportError naming the extra."""
    import subprocess
    import sys
    code = ("import sys, deepforcing_kernels, deepforcing_kernels.video, deepforcing_kernels.models.checkpoints\n"
            "bad = [m for m in ('diffusers', 'transformers', 'av', 'safetensors') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "sys.modules['diffusers'] = None\n"
            "from deepforcing_kernels.video import WanVAE\n"
            "try:\n    WanVAE.tiny()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "deepforcing_kernels[video]"' in out.stdout, out.stdout + out.stderr
