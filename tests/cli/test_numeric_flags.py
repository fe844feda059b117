"""Numeric extremes and settings that cannot take effect are one line (exit 1 or 2), never a traceback or a
silently ignored flag, and nothing is written."""
import pytest

from deepforcing_kernels.cli import main

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--frames", "3"]


@pytest.mark.parametrize("extra, needle", [
    (["--fps", "inf"], "--fps"), (["--fps", "nan"], "--fps"), (["--fps", "1e9"], "--fps"), (["--fps", "0"], "--fps"),
    (["--seed", str(2 ** 64 - 1)], "--seed"), (["--seed", "-1"], "--seed"), (["--seed", "1e3"], "--seed"),
    (["--latent-size", "100000", "100000"], "--latent-size"),
    (["--switch", "999:a cat"], "--switch"),
    (["--dist-timeout", "5"], "--dist-timeout"), (["--dist-timeout", "inf", "--parallel", "sequence"], "--dist-timeout"),
])
def test_bad_numbers_are_one_line(tmp_path, capsys, extra, needle):
    out = tmp_path / "o.mp4"
    try:
        rc = main(GEN + ["--prompt", "a fox", "--out", str(out)] + extra)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []
