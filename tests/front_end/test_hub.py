"""DeepForcingPipeline and Hub folders on tiny random models: convert -> from_pretrained gives the engine's frames
bit for bit (fp32), save_pretrained -> from_pretrained gives the same weights and configs, the folder's parts load
with diffusers' and transformers' own loaders, output folders are never overwritten, and offload changes nothing
but where the weights wait."""
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from support import write_tiny_original_folder  # noqa: E402

from deepforcing_kernels.cli import main  # noqa: E402
from deepforcing_kernels.models import CausalWanModel, WanConfig  # noqa: E402
from deepforcing_kernels.pipeline import DeepForcingPipeline, VideoPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LAT = (4, 4)  # latent size -> 32 x 32 video
PROMPT = "a red fox"


def _np(frames):
    """The engine's frames [B, T, 3, H, W] in [-1, 1] -> diffusers' np video (VideoProcessor's arithmetic)."""
    return (frames * 0.5 + 0.5).clamp(0, 1).permute(0, 1, 3, 4, 2).float().numpy()


def _engine_frames(vp, n=6, seed=0):
    chunks = list(vp.frames(PROMPT, n, seed=seed, progress=False))
    return torch.cat([c.frames for c in chunks], 1), torch.cat([c.latents for c in chunks], 1)


@pytest.fixture(scope="module")
def tiny():
    return DeepForcingPipeline.tiny(0, latent_size=LAT)


def _original_folder(root):
    """A tiny original-layout Wan2.1 folder (random Wan2.1_VAE.pth and umT5 .pth, a word-level tokenizer in
    google/umt5-xxl/) and a Self-Forcing training checkpoint of a random tiny DiT ("generator", "model." names)."""
    o = root / "Wan2.1-tiny"
    write_tiny_original_folder(o)
    dit = CausalWanModel(WanConfig.tiny())
    dit.init_weights(generator=torch.Generator().manual_seed(5), zero_head=False)
    ckpt = root / "self_forcing_dmd.pt"
    torch.save({"generator": {"model." + k: v for k, v in dit.state_dict().items()}, "step": 100}, ckpt)
    return o, ckpt, dit


def test_import_loads_neither_diffusers_nor_transformers():
    code = ("import sys, deepforcing_kernels, deepforcing_kernels.pipeline, deepforcing_kernels.cli; "
            "before = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "deepforcing_kernels.pipeline.DeepForcingPipeline; "
            "print(before, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] True"  # nothing before; the pipeline itself does load diffusers (the check can fail)


def test_convert_then_from_pretrained_gives_the_engines_frames(tmp_path):
    """deepforcing convert (original folder + Self-Forcing checkpoint) -> from_pretrained -> frames equal to
    VideoPipeline.from_weights on the same inputs, bit for bit in fp32; latents too."""
    from deepforcing_kernels.video import t5, vae

    o, ckpt, dit = _original_folder(tmp_path)
    out = tmp_path / "hub"
    assert main(["convert", "--weights", str(o), "--checkpoint", str(ckpt), "--model", "tiny", "--dtype", "float32",
                 "--policy", "deep_forcing", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "transformer", "vae"]
    assert not list(tmp_path.glob(".tmp-*"))
    pipe = DeepForcingPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in pipe.transformer.state_dict().items())
    vp = VideoPipeline.from_weights(o, ckpt, model=WanConfig.tiny(), dtype=torch.float32, latent_size=LAT,
                                    vae_config=vae.TINY_VAE_CONFIG, text_config=t5.TINY_T5_CONFIG)
    ref, ref_lat = _engine_frames(vp)
    g = torch.Generator().manual_seed(0)
    got = pipe(PROMPT, num_frames=6, height=32, width=32, generator=g, progress=False)
    assert got.frames.shape == (1, 21, 32, 32, 3) and got.frames.dtype == np.float32
    assert np.array_equal(got.frames, _np(ref))
    lat = pipe(PROMPT, 6, height=32, width=32, generator=g, output_type="latent", progress=False).frames
    assert torch.equal(lat, ref_lat)
    other = pipe(PROMPT, 6, height=32, width=32, generator=torch.Generator().manual_seed(1), output_type="latent",
                 progress=False).frames
    assert not torch.equal(other, ref_lat)  # the seed reaches the rollout


def test_convert_merges_a_longlive_lora(tmp_path):
    o, ckpt, dit = _original_folder(tmp_path)
    sd = dit.state_dict()
    w = "blocks.0.self_attn.q.weight"
    a, b = torch.randn(4, sd[w].shape[1]), torch.randn(sd[w].shape[0], 4)
    torch.save({"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": a,
                                   "base_model.model.blocks.0.self_attn.q.lora_B.weight": b}}, tmp_path / "lora.pt")
    out = tmp_path / "hub"
    assert main(["convert", "--weights", str(o), "--checkpoint", str(ckpt), "--lora", str(tmp_path / "lora.pt"),
                 "--model", "tiny", "--dtype", "float32", "--out", str(out)]) == 0
    got = DeepForcingPipeline.from_pretrained(out, torch_dtype=torch.float32).transformer.state_dict()
    assert torch.equal(got[w], (sd[w].float() + b @ a).to(sd[w].dtype))
    assert torch.equal(got["blocks.1.self_attn.q.weight"], sd["blocks.1.self_attn.q.weight"])


def test_save_pretrained_round_trip_is_exact(tiny, tmp_path):
    from deepforcing_kernels import CachePolicy

    pipe = DeepForcingPipeline.from_video_pipeline(VideoPipeline.tiny(1, latent_size=LAT,
                                                                      policy=CachePolicy.deep_sink(sink_frames=6)))
    pipe.save_pretrained(tmp_path / "hub")
    back = DeepForcingPipeline.from_pretrained(tmp_path / "hub", torch_dtype=torch.float32)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert type(getattr(back, name)) is type(getattr(pipe, name))
    for name in ("transformer", "vae", "scheduler"):
        ca = {k: v for k, v in getattr(pipe, name).config.items() if not k.startswith("_")}
        cb = {k: v for k, v in getattr(back, name).config.items() if not k.startswith("_")}
        assert ca == cb, name
    assert back.transformer.wan_config == pipe.transformer.wan_config
    assert back.config.policy == pipe.config.policy and back.config.policy["sink_frames"] == 6
    assert back.engine().policy == CachePolicy.deep_sink(sink_frames=6)
    assert back.tokenizer(["a red fox"]).input_ids == pipe.tokenizer(["a red fox"]).input_ids
    g = torch.Generator().manual_seed(3)
    assert np.array_equal(pipe(PROMPT, 6, generator=g, progress=False).frames,
                          back(PROMPT, 6, generator=g, progress=False).frames)


def test_a_causal_forcing_pp_recipe_survives_the_hub_layout(tmp_path):
    """Frame-wise blocks and the 4-step first block of Causal Forcing++ 2-step are saved (the policy's block size,
    the scheduler's first_block_steps) and sample the same frames after from_pretrained."""
    from deepforcing_kernels.presets import make_policy, recipe

    r = recipe("causal_forcing_pp_2step")
    vp = VideoPipeline.tiny(2, latent_size=LAT, policy=make_policy("deep_forcing", block_frames=r["block_frames"]),
                            denoising_steps=r["denoising_steps"], first_block_steps=r["first_block_steps"])
    ref, _ = _engine_frames(vp, 4, seed=1)
    DeepForcingPipeline.from_video_pipeline(vp).save_pretrained(tmp_path / "hub")
    back = DeepForcingPipeline.from_pretrained(tmp_path / "hub", torch_dtype=torch.float32)
    assert back.scheduler.config.first_block_steps == r["first_block_steps"]
    eng = back.engine()
    assert eng.policy.block_frames == 1 and eng.first_block_steps == tuple(r["first_block_steps"])
    got, _ = _engine_frames(eng, 4, seed=1)
    assert torch.equal(got, ref)
    plain, _ = _engine_frames(VideoPipeline.tiny(2, latent_size=LAT, policy=eng.policy,
                                                 denoising_steps=r["denoising_steps"]), 4, seed=1)
    assert not torch.equal(plain, ref)  # the first block's own steps made a difference


def test_the_folder_loads_with_diffusers_and_transformers(tiny, tmp_path):
    """vae/ with diffusers' AutoencoderKLWan, text_encoder/ and tokenizer/ with transformers' from_pretrained, and
    the DiT's safetensors as an original-names checkpoint of the engine's loader."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from deepforcing_kernels.models.checkpoints import load_checkpoint
    from deepforcing_kernels.video import ByteTokenizer

    tiny.save_pretrained(tmp_path / "hub")
    h = tmp_path / "hub"
    v = AutoencoderKLWan.from_pretrained(h / "vae")
    assert all(torch.equal(p, tiny.vae.state_dict()[k]) for k, p in v.state_dict().items())
    assert list(v.config.latents_mean) == list(tiny.vae.config.latents_mean)
    e = UMT5EncoderModel.from_pretrained(h / "text_encoder")
    assert all(torch.equal(p, tiny.text_encoder.state_dict()[k]) for k, p in e.state_dict().items())
    tok = AutoTokenizer.from_pretrained(h / "tokenizer")
    ids, mask = ByteTokenizer(16)(["a red fox", "ünïcode and a long prompt past the end"])
    hf = tok(["a red fox", "ünïcode and a long prompt past the end"], padding="max_length", truncation=True,
             max_length=16, return_tensors="pt")
    assert torch.equal(hf.input_ids, ids) and torch.equal(hf.attention_mask, mask)
    dit = CausalWanModel(WanConfig.tiny(latent_size=LAT))
    info = load_checkpoint(dit, h / "transformer" / "diffusion_pytorch_model.safetensors")
    assert info.layout == "safetensors"
    assert all(torch.equal(p, tiny.transformer.state_dict()[k]) for k, p in dit.state_dict().items())


def test_output_folders_are_never_overwritten(tiny, tmp_path, capsys, monkeypatch):
    o, ckpt, _ = _original_folder(tmp_path)
    out = tmp_path / "hub"
    args = ["convert", "--weights", str(o), "--checkpoint", str(ckpt), "--model", "tiny", "--out", str(out)]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_index.json" in err and "--force" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="model_index.json"):
        tiny.save_pretrained(out)
    tiny.save_pretrained(out, force=True)  # replaced whole: the tiny pipeline's DiT now
    back = DeepForcingPipeline.from_pretrained(out)
    assert torch.equal(back.transformer.head.head.weight, tiny.transformer.head.head.weight)
    # an interruption while writing leaves neither the folder nor a temporary
    import diffusers

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusers.AutoencoderKLWan, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny.save_pretrained(tmp_path / "cut")
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".tmp-*"))


def test_convert_bad_input_is_one_line(tmp_path, capsys):
    o, ckpt, dit = _original_folder(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    small = {k: v for k, v in dit.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save({"generator": small}, tmp_path / "one_block.pt")
    cases = [(["--weights", str(tmp_path / "nope"), "--checkpoint", str(ckpt)], "--weights"),
             (["--weights", str(o), "--checkpoint", str(tmp_path / "nope.pt")], "--checkpoint"),
             (["--weights", str(o), "--checkpoint", str(tmp_path / "garbage.pt")], "garbage.pt"),
             (["--weights", str(o), "--checkpoint", str(tmp_path / "one_block.pt")], "missing"),
             (["--weights", str(o), "--checkpoint", str(ckpt), "--model", "wan_1_3b"], "UMT5Encoder")]
    for extra, word in cases:
        capsys.readouterr()
        assert main(["convert", "--model", "tiny", *extra, "--out", str(tmp_path / "hub")]) == 1  # last wins
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "hub").exists()


def test_output_types_callback_stream_and_export_to_video(tiny, tmp_path):
    av = pytest.importorskip("av")
    pytest.importorskip("imageio")
    from diffusers.utils import export_to_video
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    ref, ref_lat = _engine_frames(VideoPipeline.tiny(0, latent_size=LAT), 9)
    seen = []
    out = tiny(PROMPT, 9, generator=g, progress=False,
               callback_on_step_end=lambda p, i, t, kw: seen.append((i, t, kw["latents"].shape[1])) or {})
    assert seen == [(0, 0, 3), (1, 3, 3), (2, 6, 3)] and np.array_equal(out.frames, _np(ref))
    assert g.initial_seed() == 0 and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    pt = tiny(PROMPT, 9, generator=g, output_type="pt", progress=False).frames
    assert torch.equal(pt, (ref * 0.5 + 0.5).clamp(0, 1))
    pil = tiny(PROMPT, 9, generator=g, output_type="pil", progress=False, return_dict=False)[0]
    assert len(pil) == 1 and len(pil[0]) == 33 and isinstance(pil[0][0], Image.Image) and pil[0][0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[0][5]), (out.frames[0, 5] * 255).round().astype(np.uint8))
    chunks = list(tiny.stream(PROMPT, 9, generator=g, progress=False))
    assert torch.equal(torch.cat([c.frames for c in chunks], 1), ref)

    def stop(pipe, i, t, kw):
        pipe._interrupt = True
        return {}
    short = tiny(PROMPT, 9, generator=g, callback_on_step_end=stop, progress=False).frames
    assert short.shape[1] == 9 and np.array_equal(short, out.frames[:, :9])
    path = export_to_video(out.frames[0], str(tmp_path / "fox.mp4"), fps=16)
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 33 and frames[0].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="output_type"):
        tiny(PROMPT, 9, output_type="mp4")
    with pytest.raises(ValueError, match="height"):
        tiny(PROMPT, 9, height=36)


def test_offload_changes_where_weights_wait_not_the_frames(tmp_path):
    """enable_model_cpu_offload on CPU runs the same code path: the text encoder is lent for encoding, the VAE
    for each block's decode, the DiT stays; with kv_cache=True each layer's slots are lent for its own passes
    only; the frames are unchanged bit for bit and the report names every component."""
    pipe = DeepForcingPipeline.tiny(0, latent_size=LAT)
    g = torch.Generator().manual_seed(0)
    plain = pipe(PROMPT, 9, generator=g, progress=False).frames
    plain_report = pipe.memory_report()
    pipe.enable_model_cpu_offload(device="cpu", kv_cache=True)
    s = pipe.stream(PROMPT, 9, generator=g, progress=False)
    kv = s.rollout.kv_offload
    kv.same = False  # count lends and bytes as a GPU run would (host and device are both the CPU here)
    got = np.concatenate([(c.frames * 0.5 + 0.5).clamp(0, 1).permute(0, 1, 3, 4, 2).numpy() for c in s], 1)
    assert np.array_equal(got, plain)
    rep = pipe.memory_report()
    comps = rep["components"]
    assert comps["text_encoder"]["offloaded"] and comps["vae"]["offloaded"] and not comps["transformer"]["offloaded"]
    assert comps["text_encoder"]["uses"] == 1 and comps["vae"]["uses"] == 3
    assert all(comps[n]["resident_peak_bytes"] == comps[n]["bytes"] > 0 for n in comps)
    assert rep["peak_resident_bytes"] == comps["transformer"]["bytes"] + max(comps["text_encoder"]["bytes"],
                                                                             comps["vae"]["bytes"])
    assert plain_report["peak_resident_bytes"] == sum(comps[n]["bytes"] for n in comps)
    events = pipe._last_offload.events
    assert events[:2] == [("text_encoder", "on"), ("text_encoder", "off")] and events[2:] == [("vae", "on"),
                                                                                             ("vae", "off")] * 3
    k = rep["kv_cache"]
    layers = pipe.transformer.wan_config.num_layers
    assert k["lends"] == 3 * 5 * layers  # 3 blocks x 5 passes x layers
    assert k["peak_device_bytes"] * layers == k["slot_bytes"] and k["bytes_moved"] > 0


def test_offload_bench_reports_each_component():
    """bench.offload's per-process measurement (run in this process here): RSS figures and the accounting."""
    from deepforcing_kernels.bench.offload import _child

    r = _child("model+kv", 3, 4, "cpu")
    c = r["components"]
    assert r["rss_peak"] > 0 and r["rss_before"] > 0
    assert r["peak_resident_bytes"] == c["transformer"]["bytes"] + max(c["text_encoder"]["bytes"], c["vae"]["bytes"])
    assert c["vae"]["offloaded"] and r["kv_cache"]["slot_bytes"] > 0
