"""`--commit-rule` on the command line: generate (the run's settings, resume), trace, bench rows, bad values."""
import pytest
import torch

from deepforcing_kernels.cli import main
from deepforcing_kernels.runio import load_run

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rc(argv):
    """The exit code, whether main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_generate_with_the_rule_saves_it_and_resumes_only_with_it(tmp_path, capsys):
    out, ref = str(tmp_path / "a.pt"), str(tmp_path / "ref.pt")
    args = ["--policy", "deep-forcing", "--seed", "2", "--save-every-s", "0"]
    assert main(GEN + args + ["--frames", "27", "--commit-rule", "6", "--out", ref]) == 0
    assert main(GEN + args + ["--frames", "15", "--commit-rule", "6", "--out", out]) == 0
    assert load_run(out)["settings"]["policy_config"]["commit_rule"] == 6
    capsys.readouterr()
    assert main(GEN + args + ["--frames", "27", "--out", out, "--resume"]) == 1  # without the rule: another run
    assert "commit_rule" in _one_line(capsys)
    assert main(GEN + args + ["--frames", "27", "--commit-rule", "6", "--out", out, "--resume"]) == 0
    assert torch.equal(load_run(out)["latents"], load_run(ref)["latents"])
    plain = str(tmp_path / "plain.pt")
    assert main(GEN + args + ["--frames", "27", "--out", plain]) == 0
    assert not torch.equal(load_run(plain)["latents"], load_run(ref)["latents"])  # the rule changed the video
    assert "commit_rule" not in load_run(plain)["settings"]["policy_config"]


def test_the_flag_alone_is_the_authors_window(tmp_path):
    out = str(tmp_path / "rs.pt")
    assert main(GEN + ["--policy", "rolling_sink", "--commit-rule", "--frames", "6", "--out", out]) == 0
    assert load_run(out)["settings"]["policy_config"]["commit_rule"] is True


@pytest.mark.parametrize("extra, want", [(["--policy", "full", "--commit-rule"], "--commit-rule reads the policy's window"),
                                         (["--commit-rule", "2"], "--commit-rule=2 frames must hold"),
                                         (["--block-frames", "1", "--commit-rule", "0"], "--commit-rule"),
                                         (["--commit-rule", "six"], "--commit-rule")])
def test_bad_values_are_one_line_naming_the_flag(tmp_path, capsys, extra, want):
    assert _rc(GEN + ["--frames", "6", "--out", str(tmp_path / "x.pt")] + extra) == 1
    assert want in _one_line(capsys)


def test_trace_takes_the_rule(capsys):
    assert main(["trace", "--policy", "rolling_sink", "--commit-rule", "--frames", "30", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "clean pass reads 9..29" in out and "clean pass reads 0..2" in out  # the newest 21 committed frames
    assert main(["trace", "--policy", "tethercache", "--commit-rule", "--frames", "24", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "clean pass reads 17..20" in out and "clean pass reads 20..23" in out  # from the full window on
    assert out.count("clean pass reads") == 2


def test_bench_rows_with_the_rule_are_checked(tmp_path, capsys):
    assert main(["bench", "--sections", "rollout", "--policies", "sliding,nothing+commit", "--json",
                 str(tmp_path / "b.json")]) == 1
    assert "--policies: unknown nothing+commit" in _one_line(capsys)
