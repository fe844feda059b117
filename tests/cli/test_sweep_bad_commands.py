"""A sample of the bad-command sweep (benchmarks/sweep_bad_commands.py, issue 26) through the same function:
each ends with exit code 1, one stderr line, no traceback, no pre-existing file changed."""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "sweep_bad_commands", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sweep_bad_commands.py"))
sweep_mod = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep_mod)

SAMPLE = ["gen unknown flag", "gen --policy unknown", "gen --head-jitter nan", "gen --seed 18446744073709551616",
          "gen --threads 18446744073709551616", "gen --commit-rule 18446744073709551616", "gen --cut beyond frames",
          "gen --checkpoint missing", "gen --out exists", "gen --out under a file", "serve --port -1",
          "trace --policy unknown"]


def test_sweep_sample_is_clean(tmp_path):
    rows = sweep_mod.sweep(str(tmp_path), names=SAMPLE)
    assert len(rows) == len(SAMPLE)
    bad = [(r["name"], r["problems"], r["stderr"]) for r in rows if not r["clean"]]
    assert not bad, bad
    assert all(r["code"] == 1 for r in rows)  # the CLI turns argparse's usage errors into exit code 1 too


def test_huge_threads_and_commit_rule_name_the_flag(tmp_path):
    rows = {r["name"]: r for r in sweep_mod.sweep(str(tmp_path), names=SAMPLE[4:6])}
    assert "--threads" in rows["gen --threads 18446744073709551616"]["stderr"]
    assert "--commit-rule" in rows["gen --commit-rule 18446744073709551616"]["stderr"]
