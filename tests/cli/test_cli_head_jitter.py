"""`deepforcing generate --head-jitter S [--head-jitter-seed N]` (LoL's multi-head RoPE jitter, any policy): the
run differs from one without it, 0 is off bit for bit, the jitter is saved in the run's settings and ``--resume``
refuses another one with one line; bad values and a backend without per-head RoPE tables are one line, exit 1,
nothing written."""
import dataclasses

import pytest
import torch

from deepforcing_kernels.cli import main
from deepforcing_kernels.runio import load_run

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--seed", "4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(out, *extra):
    try:
        return main(GEN + ["--frames", "9", "--policy", "deep-sink", "--out", str(out), *extra])
    except SystemExit as e:  # argparse's refusals (one line, exit 1: cli._Parser)
        return e.code


def test_jitter_changes_the_run_zero_is_off_and_the_settings_hold_it(tmp_path):
    assert _gen(tmp_path / "off.pt") == 0
    assert _gen(tmp_path / "zero.pt", "--head-jitter", "0", "--head-jitter-seed", "3") == 0
    assert _gen(tmp_path / "on.pt", "--head-jitter", "0.8", "--head-jitter-seed", "3") == 0
    off, zero, on = (load_run(str(tmp_path / f"{n}.pt")) for n in ("off", "zero", "on"))
    assert torch.equal(zero["latents"], off["latents"])
    assert (on["latents"] - off["latents"]).abs().max() > 1e-4
    assert on["settings"]["head_jitter"] == [0.8, 3] and off["settings"]["head_jitter"] is None
    assert on["settings"]["policy_config"]["head_jitter"] == 0.8
    assert "head_jitter" not in off["settings"]["policy_config"]  # as runs saved before the option


def test_resume_takes_the_same_jitter_and_refuses_another_in_one_line(tmp_path, capsys):
    straight, part = tmp_path / "straight.pt", tmp_path / "part.pt"
    jit = ["--head-jitter", "0.8", "--save-every-s", "0"]
    assert _gen(straight, *jit) == 0
    assert main(GEN + ["--frames", "3", "--policy", "deep-sink", "--out", str(part), *jit]) == 0
    capsys.readouterr()
    for other in (["--head-jitter", "0.5"], ["--head-jitter", "0.8", "--head-jitter-seed", "1"], []):
        assert _gen(part, "--resume", "--save-every-s", "0", *other) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot resume" in err[0] and "head_jitter" in err[0], err
        assert "policy_config" not in err[0]  # the jitter is all that differs: named alone
    assert load_run(str(part))["frames_done"] == 3  # nothing was touched
    assert _gen(part, "--resume", *jit) == 0
    assert torch.equal(load_run(str(part))["latents"], load_run(str(straight))["latents"])


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "2", "2.5", "abc", ""])
def test_bad_strengths_are_one_line_exit_1(tmp_path, capsys, value):
    assert _gen(tmp_path / "o.pt", "--head-jitter", value) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head-jitter" in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_bad_seed_is_one_line_exit_1(tmp_path, capsys):
    assert _gen(tmp_path / "o.pt", "--head-jitter", "0.5", "--head-jitter-seed", "-1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head-jitter-seed" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_backend_without_per_head_tables_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import deepforcing_kernels.backends as be

    refusing = dataclasses.replace(be._REGISTRY["reference"],
                                   takes=lambda f: "no per-head RoPE tables" if f == "head_rope" else None)
    monkeypatch.setitem(be._REGISTRY, "reference", refusing)
    monkeypatch.setattr(be, "_RESOLVED", {})
    assert _gen(tmp_path / "o.pt", "--head-jitter", "0.5", "--backend", "reference") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head-jitter 0.5" in err[0] and "no per-head RoPE tables" in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert _gen(tmp_path / "o.pt", "--backend", "reference") == 0  # without jitter the backend is fine


def test_help_lists_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--head-jitter S" in out and "--head-jitter-seed N" in out


def test_the_cost_bench_measures_a_rolled_sink(capsys):
    """``python -m deepforcing_kernels.bench.jitter`` times what it says: a full window whose sink is re-phased, the
    jittered side with per-head scales (tiny sizes here; the figures are in docs/methods.md)."""
    import json

    from deepforcing_kernels.bench.jitter import main as bench

    assert bench(["--dim", "96", "--heads", "2", "--layers", "1", "--tokens-per-frame", "4", "--repeats", "1",
                  "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["geometry"]["cache_frames"] == 21 and res["geometry"]["sink_shift"] != 0
    assert res["strength"] == 0.8 and all(s > 0 for s in res["seconds"].values())


def test_a_video_run_takes_the_jitter(tmp_path, monkeypatch):
    """The prompt -> mp4 path builds its cache from the same policy: per-head scales, the strength asked for."""
    pytest.importorskip("av")
    import deepforcing_kernels.driver as drv

    made, real = [], drv.build_cache
    monkeypatch.setattr(drv, "build_cache", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--model", "tiny", "--no-progress", "--prompt", "a red fox", "--frames", "3",
                 "--head-jitter", "0.8", "--head-jitter-seed", "2", "--out", str(out)]) == 0
    assert out.exists() and made and made[0].policy.head_jitter_setting == [0.8, 2]
    scales = made[0].rope.head_scale
    assert scales is not None and abs(max(scales) - min(scales) - 0.8) < 1e-12
