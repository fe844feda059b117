"""``deepforcing trace`` refuses, before any work, a trace too large for this machine's memory: one line with
the estimate, exit code 1 (it used to grow until the out-of-memory killer ended it)."""
import pytest

from deepforcing_kernels.cli import main


@pytest.mark.parametrize("args", [["--frames", "999999999"], ["--frames", str(3 * 10**19)],
                                  ["--frames", "30", "--prefix", "3000000"]])
def test_huge_trace_is_refused_before_allocating(capsys, args):
    assert main(["trace", "--no-plot", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB" in err and "available" in err and err.startswith(
        "deepforcing trace: error: --frames"), err


def test_a_small_trace_still_runs(capsys):
    assert main(["trace", "--no-plot", "--frames", "30"]) == 0
