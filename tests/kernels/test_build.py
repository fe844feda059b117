"""The build path is real: the extension imports and reports how it was built; both builds share one source list."""
import re
from pathlib import Path

import pytest

import deepforcing_kernels
from deepforcing_kernels import _ext

ROOT = Path(__file__).resolve().parents[2]


def test_extension_reports_build_facts():
    from conftest import require_cpp

    require_cpp()
    c = _ext.require()
    assert c.version() == deepforcing_kernels.__version__
    assert isinstance(c.has_openmp(), bool)
    assert c.max_threads() >= 1


def test_source_list_is_shared_and_complete():
    listed = [ln.strip() for ln in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")]
    assert "python/bindings.cpp" in listed
    for src in listed:
        assert (ROOT / src).is_file(), f"{src} is listed in csrc/sources.txt but missing"
    # every .cpp under csrc/ is compiled by both builds
    for cpp in (ROOT / "csrc").glob("*.cpp"):
        assert f"csrc/{cpp.name}" in listed, f"{cpp.name} is not in csrc/sources.txt"
    assert "sources.txt" in (ROOT / "setup.py").read_text()
    assert "sources.txt" in (ROOT / "CMakeLists.txt").read_text()


def test_missing_extension_gives_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(_ext, "load", lambda: None)
    with pytest.raises(ValueError, match="backend=.cpp.*not built"):
        deepforcing_kernels.sink_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8),
                                           torch.randn(1, 2, 1, 8), backend="cpp")


def test_versions_agree():
    setup_version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert setup_version == deepforcing_kernels.__version__


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_frame_sums_matches_torch(dtype):
    """The cache's per-pass query sums (C++, one thread) equal a float32-accumulating torch sum."""
    import torch
    from conftest import require_cpp

    require_cpp()
    from deepforcing_kernels.backends import _cpp_frame_sums as _frame_sums

    q = torch.randn(2, 3 * 7, 4, 16).to(getattr(torch, dtype))
    want = q.reshape(2, 3, 7, 4, 16).sum(dim=2, dtype=torch.float32)
    torch.testing.assert_close(_frame_sums(q, 3), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(_frame_sums(q.transpose(0, 1).contiguous().transpose(0, 1), 3), want,
                               atol=1e-5, rtol=1e-6)  # non-contiguous: the torch path
