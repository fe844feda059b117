"""load_checkpoint: the field's checkpoint layouts, at tiny sizes, with exactly their published key names."""
import json

import pytest
import torch

from deepforcing_kernels.models import CausalWanModel, WanConfig
from deepforcing_kernels.models.checkpoints import (
    detect_layout,
    load_checkpoint,
    merge_lora,
    read_checkpoint,
    wan_sizes_from_state_dict,
)


def _model():
    return CausalWanModel(WanConfig.tiny())


def _random_sd(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _assert_loaded(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def _lora_targets(model):
    # LongLive's configure_lora_for_model: every nn.Linear inside the attention blocks
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]


def _training_ckpt(model, seed=0):
    """Self-Forcing's trainer output: generator under WanDiffusionWrapper (model.), EMA saved from FSDP."""
    gen, ema = _random_sd(model, seed), _random_sd(model, seed + 1)
    ckpt = {"generator": {f"model.{k}": v for k, v in gen.items()},
            "generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in ema.items()},
            "critic": {"model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)}}
    return ckpt, gen, ema


@pytest.mark.parametrize("name", ["self_forcing_dmd.pt", "causal_forcing.pt", "framewise-2step.pt",
                                  "rolling_forcing_dmd.pt"])
def test_generator_layouts(tmp_path, name):
    """Self-Forcing, Causal Forcing and Rolling Forcing all save {'generator', 'generator_ema', ...}."""
    m = _model()
    ckpt, gen, ema = _training_ckpt(m)
    torch.save(ckpt, tmp_path / name)
    info = load_checkpoint(m, tmp_path / name)
    assert info.layout == "self_forcing" and info.selected == "generator" and info.lora_modules == 0
    _assert_loaded(m, gen)
    info = load_checkpoint(m, tmp_path / name, use_ema=True)
    assert info.selected == "generator_ema"
    _assert_loaded(m, ema)
    only_ema = {"generator_ema": ckpt["generator_ema"]}
    assert load_checkpoint(m, only_ema).selected == "generator_ema"
    with pytest.raises(ValueError, match="no 'generator'"):
        load_checkpoint(m, only_ema, use_ema=False)
    with pytest.raises(ValueError, match="no 'generator_ema'"):
        load_checkpoint(m, {"generator": ckpt["generator"]}, use_ema=True)


def _lora(model, rank, seed, *, prefix="base_model.model."):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in _lora_targets(model):
        w = model.get_submodule(t).weight
        out[f"{prefix}{t}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
        out[f"{prefix}{t}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    return out


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_longlive_base_plus_lora(tmp_path, alpha):
    m = _model()
    ckpt, gen, _ = _training_ckpt(m)
    base = {"generator": ckpt["generator"]}  # longlive_base.pt
    lora = _lora(m, rank=4, seed=3)
    torch.save(base, tmp_path / "longlive_base.pt")
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    info = load_checkpoint(m, tmp_path / "longlive_base.pt", lora=tmp_path / "lora.pt", lora_alpha=alpha)
    scale = (alpha if alpha is not None else 4) / 4
    assert info.layout == "longlive" and info.lora_rank == 4 and info.lora_scale == scale
    assert info.lora_modules == len(_lora_targets(m)) == 2 * 10
    want = dict(gen)
    for t in _lora_targets(m):
        a = lora[f"base_model.model.{t}.lora_A.weight"]
        b = lora[f"base_model.model.{t}.lora_B.weight"]
        want[f"{t}.weight"] = gen[f"{t}.weight"] + scale * b @ a
    own = m.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(own[k], v, atol=1e-6, rtol=1e-6)
    assert not torch.equal(own["blocks.0.self_attn.q.weight"], gen["blocks.0.self_attn.q.weight"])
    assert torch.equal(own["blocks.0.self_attn.q.bias"], gen["blocks.0.self_attn.q.bias"])  # biases untouched
    # the peft dict itself as lora=, and LongLive2's single file with generator_lora beside generator
    m2 = _model()
    load_checkpoint(m2, base, lora=lora, lora_alpha=alpha)
    assert all(torch.equal(m2.state_dict()[k], own[k]) for k in own)
    m3 = _model()
    assert load_checkpoint(m3, dict(base, generator_lora=lora), lora_alpha=alpha).layout == "longlive"
    assert all(torch.equal(m3.state_dict()[k], own[k]) for k in own)
    # adapter-named keys (a raw peft model's state_dict) merge the same
    named = {k.replace(".weight", ".default.weight"): v for k, v in lora.items()}
    m4 = _model()
    load_checkpoint(m4, base, lora=named, lora_alpha=alpha)
    assert all(torch.equal(m4.state_dict()[k], own[k]) for k in own)


def test_longlive_errors(tmp_path):
    m = _model()
    ckpt, _, _ = _training_ckpt(m)
    lora = _lora(m, rank=2, seed=0)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="LoRA alone"):
        load_checkpoint(m, tmp_path / "lora.pt")
    bad = dict(lora)
    bad["base_model.model.blocks.9.self_attn.q.lora_A.weight"] = torch.zeros(2, 96)
    bad["base_model.model.blocks.9.self_attn.q.lora_B.weight"] = torch.zeros(96, 2)
    del bad["base_model.model.blocks.0.ffn.0.lora_B.weight"]
    with pytest.raises(ValueError, match=r"incomplete \(1\): blocks.0.ffn.0 \(lora_B missing\).*"
                                         r"no base weight for \(1\): blocks.9.self_attn.q.weight"):
        load_checkpoint(m, ckpt, lora=bad)
    wrong = dict(lora)
    wrong["base_model.model.blocks.0.self_attn.q.lora_B.weight"] = torch.zeros(95, 2)
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(m, ckpt, lora=wrong)
    with pytest.raises(ValueError, match="not a LoRA state dict"):
        load_checkpoint(m, ckpt, lora={"blocks.0.self_attn.q.weight": torch.zeros(1)})
    dora = dict(lora, **{"base_model.model.blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(96)})
    with pytest.raises(ValueError, match="not LoRA weights"):
        merge_lora(ckpt["generator"], dora)


def test_safetensors_krea_layout(tmp_path):
    """Krea Realtime 14B ships one flat safetensors of the wrapper's state dict (model.blocks.0...)."""
    from safetensors.torch import save_file
    m = _model()
    sd = _random_sd(m, 5)
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()},
              str(tmp_path / "krea-realtime-video-14b.safetensors"))
    info = load_checkpoint(m, tmp_path / "krea-realtime-video-14b.safetensors")
    assert info.layout == "safetensors" and info.sizes["dim"] == 96
    _assert_loaded(m, sd)
    # a folder of shards with an index (Wan2.1's diffusion_pytorch_model-0000N-of-0000M.safetensors)
    keys = sorted(sd)
    shard = tmp_path / "shards"
    shard.mkdir()
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:20],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[20:]}
    sd2 = _random_sd(m, 6)
    for f, ks in halves.items():
        save_file({k: sd2[k].contiguous() for k in ks}, str(shard / f))
    (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    assert load_checkpoint(m, shard).layout == "safetensors"
    _assert_loaded(m, sd2)
    save_file({"condition_embedder.text_embedder.linear_1.weight": torch.zeros(2, 2),
               "blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(ValueError, match="diffusers WanTransformer3DModel"):
        load_checkpoint(m, tmp_path / "diffusers.safetensors")


def test_sizes_and_mismatch_messages(tmp_path):
    m = _model()
    sd = _random_sd(m, 0)
    sizes = wan_sizes_from_state_dict({f"model.{k}": v for k, v in sd.items()})
    c = m.config
    assert sizes == dict(dim=c.dim, in_dim=c.in_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
                         text_dim=c.text_dim, freq_dim=c.freq_dim, out_dim=c.out_dim)  # 96 % 128: no num_heads
    big = CausalWanModel(WanConfig.tiny(dim=128, num_heads=2, ffn_dim=256))
    with pytest.raises(ValueError, match=r"self_forcing layout, 'generator'.*dim=128 but the model is dim=96"):
        load_checkpoint(m, {"generator": {f"model.{k}": v for k, v in _random_sd(big, 0).items()}})
    part = dict(sd)
    del part["head.head.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(m, part)
    with pytest.raises(ValueError, match="not a recognised checkpoint layout.*optimizer"):
        load_checkpoint(m, {"optimizer": {"state": {}}, "step": 3})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(m, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(m, tmp_path / "junk.pt")
    import argparse  # a non-tensor object, as training scripts pickle their config
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}, "config": argparse.Namespace(lr=1.0)},
               tmp_path / "cfg.pt")
    with pytest.raises(ValueError, match="trust_pickle"):
        read_checkpoint(tmp_path / "cfg.pt")
    assert load_checkpoint(m, tmp_path / "cfg.pt", trust_pickle=True).layout == "self_forcing"


def test_detect_layout():
    t = torch.zeros(1)
    assert detect_layout({"generator": {"model.a": t}}) == "self_forcing"
    assert detect_layout({"generator": {"a": t}, "generator_lora": {"x.lora_A.weight": t}}) == "longlive"
    assert detect_layout({"base_model.model.x.lora_A.weight": t}) == "lora"
    assert detect_layout({"patch_embedding.weight": t}) == "state_dict"
    assert detect_layout({"model": {"patch_embedding.weight": t}}) == "state_dict"
    assert detect_layout({"step": 1}) == "unknown"
