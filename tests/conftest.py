import importlib.util
import os
import sys

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: on a shared 2-core machine a second thread only spins
    (about 50x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
