"""Triton GPU path of the fused sink attention.

* :mod:`.op` — :func:`~.op.sink_attention_cuda`, the CUDA implementation of ``torch.ops.deepforcing.sink_attention``
  (exactly the op's schema; kernels launched through ``torch.library.wrap_triton``), the keyword entry
  :func:`~.op.sink_attention_triton` and the capability check :func:`~.op.triton_supports`.
* :mod:`.attention` — the forward kernel (online softmax, LSE, temporal RoPE re-phasing of keys in registers).
* :mod:`.mass` — the per-key attention mass, a second pass that reuses the forward's row statistics.
* :mod:`.common` — the ``@triton.jit`` helpers both kernels share (key loader, score dot) and the interpreter switch.
* :mod:`.configs` — launch configurations as per-arch tables (sm_80, sm_90, interpreter), with the reason for each.
* :mod:`.autotune` — ``python -m deepforcing_kernels.triton.autotune``: sweep launch configs on a CUDA GPU and print
  table rows to paste into :mod:`.configs`.
* :mod:`.aot` — ``python -m deepforcing_kernels.triton.aot --arch 80 90``: compile every production variant without
  a GPU and report registers, spills, shared memory and the PTX check (tensor-core instructions, no local memory).

Importing this package does not import triton; the submodules do. Kernels are created in the mode that
``TRITON_INTERPRET`` selects when they are imported; :func:`~.op.sink_attention_cuda` rebuilds them if the mode
changed since (:func:`.common.ensure_kernel_mode`). :func:`interpreting` and :func:`triton_supports` live here, not
in a submodule, so the backend registry can ask them without importing triton.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ..presets import DTYPE_NAMES

__all__ = ["interpreting", "head_dim_problem", "triton_supports"]


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on CPU tensors, read as Triton reads it (its knob is
    re-read from the environment on every access, so this and ``triton.knobs.runtime.interpret`` always agree)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def head_dim_problem(d: int) -> Optional[str]:
    """None if the kernels take head dim ``d`` (a power of two in [16, 256]), else the reason."""
    if d < 16 or d > 256 or d & (d - 1):
        return f"the triton backend needs head_dim a power of two in [16, 256], got {d}"
    return None


def triton_supports(head_dim: int, dtype: Any) -> Optional[str]:
    """None when the Triton kernels take ``(head_dim, dtype)``, else the reason (the backend registry's
    capability check)."""
    problem = head_dim_problem(head_dim)
    if problem is not None:
        return problem
    if dtype is not None and str(dtype).replace("torch.", "") not in DTYPE_NAMES:
        return f"the triton kernels take {', '.join(DTYPE_NAMES)}, got {dtype}"
    return None
