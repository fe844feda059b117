"""Shared helpers for tests that run Triton kernels under TRITON_INTERPRET=1 on CPU tensors.

docs/spec.md section 7: the interpreter is not the compiler. One more difference than the SPEC lists: the interpreter
(Triton 3.x) casts fp32 to bf16 by truncation (round toward zero; ``fp_downcast_rounding="rtne"`` is ignored),
where the GPU's ``cvt`` rounds to nearest even. The kernels round P to bf16 for the P V product, so under the
interpreter P is biased low and about 8% of random tiny bf16 cases miss the budget (up to 4x err_torch); with
round-to-nearest casts none do (worst 1.46x, as the C++ kernel). ``gpu_like_bf16_casts`` makes the interpreter
round like the GPU.
"""
import os

# Triton and a kernel's interpret mode are fixed when they are imported / decorated: import triton, the package's
# kernels and the probe kernel below under the interpreter, then restore the variable so the rest of the session
# does not run interpreted. Test modules import this module before anything Triton; fixtures set
# TRITON_INTERPRET=1 again around each test, and the kernels rebuild themselves if the mode changed since
# (attention._ensure_kernel_mode).
_PREV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import deepforcing_kernels.triton.attention  # noqa: E402,F401
import deepforcing_kernels.triton.mass  # noqa: E402,F401


@triton.jit
def _cast_bf16(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, tl.load(X + o).to(tl.bfloat16))


def _patch_lang_once_per_launch() -> None:
    """Apply the interpreter's language patch once per kernel launch, not again at every device-function call.

    The interpreter patches ``triton.language`` (every builtin, found with ``inspect.getmembers``) when a launch
    starts and restores it when the launch ends, and calls the same patch again each time a ``@triton.jit``
    device function is called inside the kernel (a scope it never restores). Inside a launch that has patched the
    same language modules, that second patch finds nothing left to wrap and only re-sets the same helpers: the
    kernels run the same code, but the search was a fifth of the interpreter tests' time (cProfile of
    test_triton_key_bias.py: 13.8k patches for 103 launches, 44 s of 200 s). The same holds for the language
    modules a launch's device functions patched (Triton's own ``@jit`` helpers ``tl.zeros``, ``tl.max``,
    ``tl.sum``, ``tl.cdiv`` see ``triton.language.core``, which the kernels' own patch of ``triton.language`` does
    not cover): a device function's patch is never restored, so once one has patched ``core`` inside a launch
    the next ones only re-set the same helpers; they are skipped too (cProfile of test_methods_recency[triton]:
    2.9k patches for 200 launches, 7.7 s of 36 s). Skipped when this Triton has no such function."""
    import inspect
    import threading

    from triton.runtime import interpreter

    real_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None or getattr(real_patch, "_once_per_launch", False):
        return
    real_call = executor.__call__
    # per thread, each launch in progress, innermost last: [the language modules patched in it, whether the
    # launch's own patch has run]
    launches = threading.local()

    def langs_of(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class _Nothing:
        def restore(self):
            pass

    def patch_lang(fn):
        stack = getattr(launches, "stack", None)
        launch = stack[-1] if stack else None
        if launch is None:
            return real_patch(fn)
        langs = langs_of(fn)
        if launch[1] and langs <= launch[0]:
            return _Nothing()  # a device function inside a launch that has patched its modules already
        scope = real_patch(fn)
        if not launch[1]:
            launch[1] = True  # the launch's own patch (the first inside it), restored by the launch
        launch[0] |= langs  # (a device function's patch: never restored, it holds to the launch's end)
        return scope

    def call(self, *args, **kwargs):
        launches.stack = getattr(launches, "stack", [])
        launches.stack.append([langs_of(self.fn), False])
        try:
            return real_call(self, *args, **kwargs)
        finally:
            launches.stack.pop()

    patch_lang._once_per_launch = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


_patch_lang_once_per_launch()

if _PREV is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV


def interpreter_rounds_bf16() -> bool:
    """Whether the interpreter's fp32 -> bf16 cast rounds to nearest even, as the GPU does."""
    x = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 1.0
    y = torch.empty(64, dtype=torch.bfloat16)
    _cast_bf16[(1,)](x, y, 64)
    return torch.equal(y, x.to(torch.bfloat16))


@pytest.fixture
def gpu_like_bf16_casts(monkeypatch):
    """Make the interpreter's fp32 -> bf16 casts round to nearest even, like the GPU (see the module docstring)."""
    import numpy as np
    from triton.runtime import interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the probe kernel launches under the interpreter
    if interpreter_rounds_bf16():
        return  # a Triton whose interpreter already rounds like the GPU: nothing to patch
    if not hasattr(getattr(interpreter, "InterpreterBuilder", None), "cast_impl"):
        pytest.skip("this Triton's interpreter truncates fp32 -> bf16 and has no cast_impl to patch")
    real = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return real(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


#: the small launch configs the interpreter tests use: 32-wide query and plain key tiles, 16-wide re-phased key
#: tiles, 16 x 16 mass tiles, so a test's small shapes run every multi-tile path
SMALL_FWD_TILES = (32, 32, 4, 1, 16)
SMALL_MASS_TILES = (16, 16, 4, 1)


@pytest.fixture
def small_tiles(monkeypatch, gpu_like_bf16_casts):
    """Under the interpreter, with the kernels' launch configs replaced by the small ones above (after the kernel
    mode check: a rebuild would drop the patches). Yields ``(fwd_config, mass_config)``."""
    from deepforcing_kernels.triton import attention as triton_attention
    from deepforcing_kernels.triton import mass as triton_mass
    from deepforcing_kernels.triton.configs import FwdConfig

    fwd = FwdConfig(*SMALL_FWD_TILES[:4], BLOCK_N_ROT=SMALL_FWD_TILES[4])
    mass = FwdConfig(*SMALL_MASS_TILES)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_attention._ensure_kernel_mode()
    monkeypatch.setattr(triton_attention, "fwd_config", lambda *a: fwd)
    monkeypatch.setattr(triton_mass, "mass_config", lambda *a: mass)
    yield fwd, mass

