"""`deepforcing generate`, `trace` and `demo` on tiny sizes."""
import os

import pytest
import torch

import deepforcing_kernels.driver as driver
from deepforcing_kernels.cli import main
from deepforcing_kernels.models import CausalWanModel, WanConfig
from deepforcing_kernels.runio import load_run, parts_dir

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")



def _load(path):
    for d, _, files in os.walk(os.path.dirname(path)):  # the safe default must read every file we write
        for f in files:
            if f.endswith(".pt"):
                torch.load(os.path.join(d, f), weights_only=True)
    return load_run(path)


def test_generate_writes_plain_pt(tmp_path):
    out = str(tmp_path / "a.pt")
    assert main(GEN + ["--frames", "6", "--policy", "deep-forcing", "--score", "logits", "--out", out]) == 0
    d = _load(out)
    assert d["latents"].shape == (6, 4, 4, 4) and torch.isfinite(d["latents"]).all()
    assert d["complete"] is True and d["frames_done"] == 6
    assert d["settings"]["policy"] == "deep_forcing" and d["settings"]["score"] == "logits"  # canonical spelling
    assert not [f for f in os.listdir(tmp_path) + os.listdir(parts_dir(out)) if f.startswith(".tmp-")]
    # an existing output is not clobbered by accident
    assert main(GEN + ["--frames", "6", "--out", out]) == 1
    assert torch.equal(_load(out)["latents"], d["latents"])
    assert main(GEN + ["--frames", "6", "--out", out, "--force", "--seed", "1"]) == 0
    assert (_load(out)["latents"] - d["latents"]).abs().max() > 0.1


def test_generate_interrupted_then_resumed_matches_a_straight_run(tmp_path, monkeypatch):
    straight, broken = str(tmp_path / "straight.pt"), str(tmp_path / "broken.pt")
    args = ["--frames", "12", "--policy", "deep-sink", "--seed", "4"]
    assert main(GEN + args + ["--out", straight]) == 0

    real_block, calls = driver.Rollout._block, []

    def interrupted(self, f0, *rest):
        calls.append(f0)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C during the third block
        return real_block(self, f0, *rest)

    monkeypatch.setattr(driver.Rollout, "_block", interrupted)
    assert main(GEN + args + ["--out", broken]) == 130
    part = _load(broken)
    assert part["frames_done"] == 6 and part["latents"].shape[0] == 6 and part["complete"] is False
    monkeypatch.setattr(driver.Rollout, "_block", real_block)

    assert main(GEN + ["--frames", "12", "--policy", "deep-sink", "--seed", "5", "--out", broken, "--resume"]) == 1
    assert main(GEN + args + ["--out", broken, "--resume"]) == 0
    done, ref = _load(broken), _load(straight)
    assert done["complete"] is True and done["frames_done"] == 12
    assert torch.equal(done["latents"], ref["latents"])
    # a finished run can also be extended
    assert main(GEN + ["--frames", "15", "--policy", "deep-sink", "--seed", "4", "--out", broken, "--resume"]) == 0
    assert _load(broken)["latents"].shape[0] == 15


def test_generate_with_checkpoint_and_text_embeds(tmp_path):
    m = CausalWanModel(WanConfig.tiny())
    m.init_weights(generator=torch.Generator().manual_seed(9), zero_head=False)
    ckpt, txt = str(tmp_path / "ckpt.pt"), str(tmp_path / "text.pt")
    torch.save({"generator": {"model." + k: v for k, v in m.state_dict().items()}}, ckpt)
    torch.save({"prompt_embeds": torch.randn(7, 32)}, txt)
    out = str(tmp_path / "c.pt")
    assert main(GEN + ["--frames", "3", "--checkpoint", ckpt, "--text-embeds", txt, "--policy", "full",
                       "--out", out]) == 0
    assert _load(out)["latents"].shape == (3, 4, 4, 4)
    bad = str(tmp_path / "bad.pt")
    torch.save({"blocks.0.nonsense": torch.zeros(1)}, bad)
    assert main(GEN + ["--frames", "3", "--checkpoint", bad, "--out", str(tmp_path / "d.pt")]) == 1


def test_generate_bad_options(tmp_path, capsys):
    assert main(GEN + ["--frames", "7", "--out", str(tmp_path / "x.pt")]) == 1
    assert "multiple of 3" in capsys.readouterr().err
    assert main(GEN + ["--frames", "3", "--policy", "sliding", "--score", "mass", "--out", str(tmp_path / "x.pt")]) == 1
    assert "score" in capsys.readouterr().err


def _png_ok(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 20_000


def test_trace_draws_a_png(tmp_path, capsys):
    png = str(tmp_path / "trace.png")
    assert main(["trace", "--policy", "deep-forcing", "--score", "logits", "--frames", "45", "--plot", png]) == 0
    assert _png_ok(png)
    text = capsys.readouterr().out
    assert "f0=  21" in text and "topc" in text and "Top-C selection frequency" in text
    # docs/spec.md section 2 (DS+PC, S=10, N=16): after the compression at f0 = 21 the sink sits at 5..14
    line21 = next(line for line in text.splitlines() if "f0=  21" in line)
    assert line21.split(":", 1)[1].strip().startswith("0@5..9@14")


def test_trace_deep_sink_matches_the_release_traces(tmp_path, capsys):
    png = str(tmp_path / "ds.png")
    assert main(["trace", "--policy", "deep-sink", "--frames", "30", "--tokens-per-frame", "1", "--lines", "20",
                 "--plot", png]) == 0
    lines = {int(line.split("f0=")[1].split()[0]): line.split(":", 1)[1].strip()
             for line in capsys.readouterr().out.splitlines() if "f0=" in line}
    # docs/spec.md section 2, DS only, S = 14 (the block in brackets)
    assert lines[21] == "0@0..13@13 | 17@17..20@20 | [21@21..23@23]"
    assert lines[24] == "0@3..13@16 | 20@20..23@23 | [24@24..26@26]"
    assert lines[27] == "0@6..13@19 | 23@23..26@26 | [27@27..29@29]"


def test_trace_sliding_has_no_topc(tmp_path, capsys):
    png = str(tmp_path / "s.png")
    assert main(["trace", "--policy", "sliding", "--frames", "30", "--tokens-per-frame", "1", "--plot", png]) == 0
    assert _png_ok(png)
    assert "Top-C selection frequency" not in capsys.readouterr().out


def test_demo_small(tmp_path, capsys):
    assert main(["demo", "--frames", "30", "--no-compare", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "frames/s" in out and "cache frames after each block" in out
    assert _png_ok(str(tmp_path / "trace.png"))
