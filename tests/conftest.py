import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is not None:
    # Triton's interpreter mode is fixed when triton is first imported; anything in the session may import it
    # (torch's compiler stack does, when a test compiles or defines the triton_op), so import it first, inside the
    # interpreter window of triton_interp, before any test module runs.
    import triton_interp  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cpp_available() -> bool:
    from deepforcing_kernels import available_backends

    return "cpp" in available_backends("cpu")


def require_cpp():
    """Skip when the C++ kernel is not built, unless the run demands it (make test sets DEEPFORCING_REQUIRE_CPP=1,
    so a broken build fails CI instead of silently skipping the fast backend)."""
    if cpp_available():
        return
    if os.environ.get("DEEPFORCING_REQUIRE_CPP") == "1":
        pytest.fail("the C++ extension is required (DEEPFORCING_REQUIRE_CPP=1) but is not built")
    pytest.skip("C++ extension not built")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: on a shared 2-core machine a second thread only spins
    (about 50x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
