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
changed since (:func:`.common.ensure_kernel_mode`).
"""
