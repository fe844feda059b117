"""VideoPipeline: prompt -> tiny umT5 -> tiny DiT rollout -> streaming decode -> mp4 (frame counts, image / video
prefixes, prompt switches, bad input, the frames() iterator and its resume)."""
from pathlib import Path

import pytest
import torch
from support import write_tiny_original_folder

pytest.importorskip("diffusers")
av = pytest.importorskip("av")

from deepforcing_kernels.pipeline import (  # noqa: E402
    FrameChunk,
    VideoPipeline,
    _valid_prefix_frames,
    parse_switch,
    prefix_from_pixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")
LAT = (4, 4)  # latent size -> 32 x 32 video


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.tiny(0, latent_size=LAT)


def _read(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _files(d):
    return sorted(p.name for p in Path(d).iterdir())


def test_mp4_has_1_plus_4_f_minus_1_frames_of_8x_the_latent_size(pipe, tmp_path):
    out = tmp_path / "fox.mp4"
    seen = []
    res = pipe.write(out, "a red fox", 9, seed=0, progress=False, on_block=lambda c, run: seen.append(c))
    got = _read(out)
    assert len(got) == 1 + 4 * (9 - 1) == res.frames
    assert got[0].shape == (8 * LAT[0], 8 * LAT[1], 3)
    assert res.paths == [out] and res.latent_frames == 9 and res.bytes == out.stat().st_size
    # the chunks tile the stream: latent [0, 1, ..] blocks of 3, video frames 9 then 12 each
    assert [(c.latent_start, c.latent_end, c.frame_start, c.frame_end) for c in seen] == \
        [(0, 3, 0, 9), (3, 6, 9, 21), (6, 9, 21, 33)]
    assert _files(tmp_path) == ["fox.mp4"]  # no temporary left
    # the file holds the streamed frames (lossy codec: right frame much closer than another one)
    frames = torch.cat([c.frames for c in seen], 1)[0]
    want = ((frames + 1) * 127.5).round().permute(0, 2, 3, 1)
    luma = torch.tensor([0.299, 0.587, 0.114])
    f = torch.from_numpy(got[14]).float() @ luma
    assert (f - want[14] @ luma).abs().mean() < 0.5 * (f - want[25] @ luma).abs().mean()


def test_frames_iterator_equals_one_shot_decode_and_resumes_bit_for_bit(pipe):
    chunks = list(pipe.frames("a red fox", 12, seed=3, progress=False))
    assert all(isinstance(c, FrameChunk) for c in chunks)
    lat = torch.cat([c.latents for c in chunks], 1)
    frames = torch.cat([c.frames for c in chunks], 1)
    assert frames.shape == (1, 1 + 4 * 11, 3, 32, 32)
    assert torch.equal(frames, pipe.vae.decode(lat))
    # stop after two chunks, save (weights_only round trip), resume: the rest is identical
    s = pipe.frames("a red fox", 12, seed=3, progress=False)
    first = [next(s), next(s)]
    import io
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest = list(pipe.frames("a red fox", 12, seed=3, progress=False, resume=state))
    assert [c.latent_start for c in first + rest] == [c.latent_start for c in chunks]
    for a, b in zip(first + rest, chunks):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)


def test_image_to_video_through_the_pipeline(pipe, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g)  # another size and aspect
    png = tmp_path / "start.png"
    PIL.fromarray(img.numpy()).save(png)
    out = tmp_path / "i2v.mp4"
    seen = []
    res = pipe.write(out, "a red fox", 7, seed=0, image=png, progress=False, on_block=lambda c, r: seen.append(c))
    assert res.info["prefix_frames"] == 1 and len(_read(out)) == 1 + 4 * 6
    # the first block is the image alone (one latent frame, its own block), returned unchanged
    assert seen[0].latents.shape[1] == 1 and seen[0].frames.shape[1] == 1
    want, info = prefix_from_pixels(pipe.vae, img.permute(2, 0, 1)[None], pipe.pixel_size, 3, what="image")
    assert info == {"frames_in": 1, "frames_used": 1, "prefix_frames": 1}
    assert torch.equal(seen[0].latents, want.to(seen[0].latents.dtype))
    # a tensor image gives the same latents as its file
    s = pipe.frames("a red fox", 4, seed=0, image=img.permute(2, 0, 1), progress=False)
    assert torch.equal(next(s).latents, seen[0].latents)


def test_video_continuation_keeps_the_last_frames_of_a_valid_prefix(pipe, tmp_path):
    assert [_valid_prefix_frames(n, 3) for n in range(1, 9)] == [1, 1, 3, 4, 4, 6, 7, 7]
    g = torch.Generator().manual_seed(1)
    vid = torch.rand(14, 3, 32, 32, generator=g) * 2 - 1  # 14 frames -> 1 + 13 // 4 = 4 latent frames: valid
    s = pipe.frames("a red fox", 7, seed=0, video=vid, progress=False)
    assert s.info["prefix_frames"] == 4 and s.info["frames_used"] == 13 and s.info["frames_in"] == 14
    chunks = list(s)
    want = pipe.vae.encode(vid[1:][None])  # the first frame is the one dropped
    lat = torch.cat([c.latents for c in chunks], 1)
    assert torch.equal(lat[:, :4], want)
    # 10 frames -> 3 latent frames (a whole block); a file path works too
    from deepforcing_kernels.video import VideoWriter
    with VideoWriter(tmp_path / "in.mp4") as w:
        w.write(vid[:10])
    s = pipe.frames("a red fox", 6, seed=0, video=tmp_path / "in.mp4", progress=False)
    assert s.info["prefix_frames"] == 3 and s.info["frames_used"] == 9


def test_a_switch_keeps_the_past_and_changes_the_future(pipe):
    base = list(pipe.frames("a red fox", 9, seed=0, progress=False))
    sw = list(pipe.frames("a red fox", 9, seed=0, switches=[(6, "a blue whale")], progress=False))
    sched = list(pipe.frames([(0, "a red fox"), (6, "a blue whale")], 9, seed=0, progress=False))
    for a, b in zip(base[:2], sw[:2]):
        assert torch.equal(a.frames, b.frames)
    assert not torch.equal(base[2].latents, sw[2].latents)
    for a, b in zip(sw, sched):  # switches= and a schedule are the same thing
        assert torch.equal(a.frames, b.frames)
    assert parse_switch("6:a blue whale") == (6, "a blue whale")
    strs = list(pipe.frames("a red fox", 9, seed=0, switches=["6:a blue whale"], progress=False))
    assert torch.equal(strs[2].frames, sw[2].frames)
    rc = list(pipe.frames("a red fox", 9, seed=0, switches=[(6, "a blue whale")], recache=True, progress=False))
    assert torch.equal(rc[1].frames, base[1].frames) and rc[2].frames.shape == sw[2].frames.shape


def test_prompts_are_encoded_once_each(pipe, monkeypatch):
    calls = []
    real = pipe.text_encoder

    def counting(prompts):
        calls.append(list(prompts))
        return real(prompts)

    monkeypatch.setattr(pipe, "text_encoder", counting)
    pipe.frames([(0, "a"), (3, "b"), (6, "a")], 9, seed=0, progress=False)
    assert calls == [["a", "b"]]


@pytest.mark.parametrize("kw, err, match", [
    (dict(prompt=[]), ValueError, "prompt is an empty list"),
    (dict(prompt="  "), ValueError, "prompt is empty"),
    (dict(switches=[(4, "b")]), ValueError, "not a block boundary"),
    (dict(prompt=[(0, "a"), (6, "b"), (3, "c")]), ValueError, "increasing frame order"),
    (dict(switches=["x:b"]), ValueError, "FRAME must be an int"),
    (dict(switches=[(3, "")]), ValueError, "is empty"),
    (dict(image=torch.zeros(4, 32, 32)), ValueError, "3 \\(RGB\\) channels"),
    (dict(prefix_latents=torch.zeros(1, 1, 4, 5, 5)), ValueError, "prefix_latents must be"),
    (dict(prefix_latents=torch.zeros(1, 1, 3, 4, 4)), ValueError, "prefix_latents must be"),
    (dict(image=torch.zeros(3, 8, 8), video=torch.zeros(1, 3, 8, 8)), ValueError, "not image and video"),
    (dict(num_frames=8), ValueError, "multiple of the policy's block_frames"),
])
def test_bad_input_is_one_clear_error_and_no_file(pipe, tmp_path, kw, err, match):
    kw = dict(dict(prompt="a red fox", num_frames=9), **kw)
    with pytest.raises(err, match=match):
        pipe.write(tmp_path / "x.mp4", kw.pop("prompt"), kw.pop("num_frames"), 0, progress=False, **kw)
    assert _files(tmp_path) == []


def test_unreadable_or_missing_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    with pytest.raises(ValueError, match="bad.png.*cannot be read"):
        pipe.write(tmp_path / "x.mp4", "a", 7, 0, image=bad, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipe.write(tmp_path / "x.mp4", "a", 7, 0, image=tmp_path / "nope.png", progress=False)
    with pytest.raises(ValueError, match="bad.png.*cannot be read"):
        pipe.write(tmp_path / "x.mp4", "a", 7, 0, video=bad, progress=False)
    with pytest.raises(FileNotFoundError, match="no_dir"):
        pipe.write(tmp_path / "no_dir" / "x.mp4", "a", 9, 0, progress=False)
    assert _files(tmp_path) == ["bad.png"]


def test_interrupt_leaves_a_playable_partial_file(pipe, tmp_path):
    def stop(chunk, run):
        if chunk.latent_start == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.write(tmp_path / "x.mp4", "a", 9, 0, progress=False, on_block=stop)
    assert _files(tmp_path) == ["x.partial.mp4"]
    assert len(_read(tmp_path / "x.partial.mp4")) == 21


def test_from_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoPipeline.from_weights(tmp_path / "missing")
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        VideoPipeline.from_weights(tmp_path)
    d = tmp_path / "diff"
    for sub in ("vae", "text_encoder"):
        (d / sub).mkdir(parents=True)
        (d / sub / "config.json").write_text("{}")
    (d / "tokenizer").mkdir()
    with pytest.raises(ValueError, match="transformer.*checkpoint="):
        VideoPipeline.from_weights(d)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        VideoPipeline.from_weights(d, tmp_path / "nope.pt")
    o = tmp_path / "orig"
    (o / "google" / "umt5-xxl").mkdir(parents=True)
    (o / "Wan2.1_VAE.pth").write_bytes(b"")
    (o / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        VideoPipeline.from_weights(o)


def test_from_weights_original_folder_and_checkpoint(pipe, tmp_path):
    """A tiny original-layout folder (random Wan2.1_VAE.pth, umT5 .pth, a tokenizer, the DiT safetensors) and a
    Self-Forcing-style checkpoint: the pipeline loads each piece and writes an mp4."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from deepforcing_kernels.models import WanConfig
    from deepforcing_kernels.video import t5, vae

    o = tmp_path / "Wan2.1-tiny"
    write_tiny_original_folder(o)
    own = {k: v.contiguous() for k, v in pipe.model.state_dict().items()}
    save_file(own, str(o / "diffusion_pytorch_model.safetensors"))
    kw = dict(model=WanConfig.tiny(latent_size=LAT), dtype=torch.float32, vae_config=vae.TINY_VAE_CONFIG,
              text_config=t5.TINY_T5_CONFIG, policy="sliding")
    p = VideoPipeline.from_weights(o, **kw)
    assert all(torch.equal(v, own[k]) for k, v in p.model.state_dict().items())
    assert p.text_encoder.text_len == 16 and p.policy.kind == "sliding"
    res = p.write(tmp_path / "o.mp4", "a red fox", 6, seed=0, progress=False)
    assert len(_read(tmp_path / "o.mp4")) == 21 and res.paths == [tmp_path / "o.mp4"]
    # checkpoint= wins over the folder's DiT: a Self-Forcing training checkpoint ("generator", "model." prefixes)
    other = {k: v + 1 for k, v in own.items()}
    torch.save({"generator": {"model." + k: v for k, v in other.items()}}, tmp_path / "sf.pt")
    p2 = VideoPipeline.from_weights(o, tmp_path / "sf.pt", **kw)
    assert all(torch.equal(v, other[k]) for k, v in p2.model.state_dict().items())


def test_progress_bar_shows_generation_and_decoding_rates(pipe, tmp_path, capsys):
    pipe.write(tmp_path / "p.mp4", "a", 6, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "21/21" in err and "gen=" in err and "dec=" in err and "f/s" in err
