"""pytest-benchmark set-up for ``benchmarks/``: ``pytest benchmarks/ --benchmark-only``.

* Files here are named ``bench_<kernel>.py`` (STYLE.md), which pytest does not collect by default: collect them.
* ``pyproject.toml`` adds ``--benchmark-disable`` so the test suite never times anything; ``--benchmark-only``
  (or ``--benchmark-enable``) given on the command line turns timing back on instead of clashing with it.
* OpenMP spin-waiting is ruinous on a shared 2-core machine (10x slower rollouts measured under load), so the
  passive wait policy is the default here; it must be set before torch is imported, hence at the top.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself; only add the ones found by directory walk
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if getattr(config.option, "benchmark_only", False):
        config.option.benchmark_enable = True  # overrides the --benchmark-disable of pyproject's addopts


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
