"""Triton GPU path of the fused sink attention.

* :mod:`.attention` — :func:`~.attention.sink_attention_triton`: forward kernel (online softmax, LSE, temporal
  RoPE re-phasing of sink keys in registers on load), its launch heuristic and the ``@triton.jit`` kernels.
* :mod:`.mass` — the per-key attention mass, a second pass that reuses the forward's LSE.
* :mod:`.aot` — ``python -m deepforcing_kernels.triton.aot --arch 80 90``: compile every production variant
  without a GPU and report registers, spills and shared memory.

Importing this package does not import triton; the submodules do. Kernels are created in the mode that
``TRITON_INTERPRET`` selects when :mod:`.attention` is imported; :func:`~.attention.sink_attention_triton` rebuilds
them if the mode changed since (see ``_ensure_kernel_mode``).
"""
