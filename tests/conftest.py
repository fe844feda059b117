import importlib.util
import os
import sys
from typing import Optional

import pytest
import torch

# The suite is grouped in folders by the package's parts; the shared helpers (support.py, triton_interp.py) sit
# here, beside this file, and every folder imports them by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("triton") is not None:
    # Triton's interpreter mode is fixed when triton is first imported; anything in the session may import it
    # (torch's compiler stack does, when a test compiles or defines the triton_op), so import it first, inside the
    # interpreter window of triton_interp, before any test module runs.
    import triton_interp  # noqa: F401

from support import cpp_available, require_cpp  # noqa: E402,F401  (after triton: support imports the package)

# One intra-op thread for the whole session: the suite's tensors are tiny, and on a 2-core machine a second
# thread only spins (the tiny model's rollouts run 2-3x slower with two threads on a quiet machine, 20-40x when
# another process holds a core). Tests about threads set their own counts (the C++ kernel at 1 and 2 threads in
# test_cpp_attention and test_reliability_op_fuzz, two streams from two threads in test_reliability_threads) and
# restore this one.
torch.set_num_threads(1)
# ... and the commands the tests start as subprocesses (the CLI's entry point, serve, gpu-check) the same
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module, whatever a test before it left set (the session's default is one too, see
    above). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------- pytest-xdist scheduling
#: run together on one worker: the multi-process tests (each starts 2-3 ranks with their own process groups and
#: ports; two such tests at once on a 2-core machine would only time each other out)
ONE_WORKER_FOLDERS = ("distributed",)


def _xdist_group(item) -> Optional[str]:
    """The worker group of ``item`` under ``--dist loadgroup``: its folder's for ``ONE_WORKER_FOLDERS``, its module's
    when it uses a module- or class-scoped fixture defined in its module (built once per worker: the module's tests
    on one worker build it once), else None (scheduled test by test)."""
    rel = item.path.relative_to(os.path.dirname(os.path.abspath(__file__)))
    if rel.parts[0] in ONE_WORKER_FOLDERS:
        return rel.parts[0]
    module = item.nodeid.split("::", 1)[0]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        if defs and defs[-1].scope in ("module", "class") and defs[-1].baseid.split("::", 1)[0] == module:
            return module
    return None


@pytest.hookimpl(wrapper=True)  # around xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    _group_suffix(config, items)
    return result


def _group_suffix(config, items) -> None:
    """Give ``--dist loadgroup`` its ``@group`` node-id suffix where xdist's own write did nothing.

    xdist (3.8) groups by suffixing each grouped item's node id (``item._nodeid = nodeid + "@group"``), and its
    scheduler reads the group back from that suffix. Since pytest 9 a node's id is ``item._id`` (a structured
    ``NodeId``) and ``_nodeid`` is ignored: no test was grouped, so a module fixture was built once per worker
    that drew one of its tests (test_compile compiled twice, gpu-check's dry run ran twice, the Triton AOT build
    ran twice) and the ``distributed`` tests could run two at a time. Skipped when the id already has the suffix
    (a pytest or xdist that handles it)."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's _nodeid write works
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix) and isinstance(getattr(item, "_id", None), NodeId):
            item._id = NodeId.parse(item.nodeid + suffix)  # the string is kept verbatim (NodeId._str_cache)
