"""The autotune entry: on a machine without CUDA it says so and exits 1; its candidates are launchable shapes."""
import pytest
import torch
from triton_interp import interpreter_rounds_bf16  # noqa: E402,F401  (first: triton under the interpreter window)

triton = pytest.importorskip("triton")
from deepforcing_kernels.triton import autotune  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the sweep would run")
def test_needs_cuda(capsys):
    assert autotune.main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bad_arguments_exit_1(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert autotune.main(["--modes", "sideways"]) == 1
    assert "sideways" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["none", "sink", "perkey"])
def test_candidates_are_valid_tiles(mode):
    for bm, bn, rot, w, st in autotune.fwd_candidates(mode) + autotune.mass_candidates(mode):
        assert bm % 16 == 0 and bn % 16 == 0 and rot % 16 == 0 and rot <= bn  # tl.dot needs >= 16
        assert w in (4, 8) and 1 <= st <= 4
    assert all(c[2] == 0 for c in autotune.fwd_candidates("none"))
    assert len(autotune.fwd_candidates(mode)) >= 12
