"""The one registered op: ``torch.ops.deepforcing.sink_attention``.

Schema (tables precomputed by :func:`deepforcing_kernels.rotation.rotation_tables`)::

    sink_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, int rot_len, bool interleaved,
                   float softmax_scale, bool return_mass, int mass_start, int mass_end, Tensor? key_bias=None)
        -> (Tensor out, Tensor lse, Tensor mass)

``key_bias``: None, or a contiguous float32 ``[B or 1, Hq or 1, Lk]`` added to the scaled logits
(``softmax_scale * q . k + key_bias``) before the softmax; lse and mass are those of the biased softmax.

``out [B, Lq, Hq, D]`` in q's dtype, ``lse [B, Hq, Lq]`` float32, ``mass [B, Hkv, Lk]`` float32 (shape ``[0]``
when ``return_mass`` is False: ops cannot return None). Implementations:

* CUDA: the Triton kernels, registered through ``torch.library.triton_op`` so ``torch.compile`` and CUDA graphs
  see the kernel launches (:mod:`deepforcing_kernels.triton.op`);
* CPU: the C++ kernel of ``deepforcing_kernels._C``, itself wrapped as the opaque op
  ``deepforcing::sink_attention_cpu`` so compiled graphs keep it as one node;
* a fake (meta) implementation that gives the output shapes;
* one autograd rule for every device: the backward recomputes the attention in PyTorch maths (float32) from the
  saved inputs and differentiates that (q, k, v and the key bias get gradients; the rotation tables and the mass
  do not).

Defining the op imports neither triton nor the extension: the CUDA path imports the Triton module on its first
call (a clear error when triton is missing), and the backend registry never routes CPU calls to an unbuilt
extension.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _ext
from .rotation import rotate_keys

__all__ = ["OP_NAME", "sink_attention_op", "attention_maths"]

OP_NAME = "deepforcing::sink_attention"
Result = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("deepforcing::sink_attention_cpu", mutates_args=(), device_types="cpu")
def _cpu_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_len: int,
            interleaved: bool, softmax_scale: float, return_mass: bool, mass_start: int, mass_end: int,
            key_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ kernel as an opaque op (what the public op calls for CPU tensors; compiled graphs keep it whole)."""
    return _ext.require().sink_attention_fwd(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass,
                                             mass_start, mass_end, key_bias)


def _shapes(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_start, mass_end,
            key_bias=None) -> Result:
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    out = q.new_empty((B, Lq, Hq, D))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    mass = q.new_empty((B, Hkv, Lk) if return_mass else (0,), dtype=torch.float32)
    return out, lse, mass


_cpu_op.register_fake(_shapes)


def _sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rot_len: int, interleaved: bool, softmax_scale: float, return_mass: bool, mass_start: int,
                    mass_end: int, key_bias: Optional[torch.Tensor] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sink attention over precomputed rotation tables (see the module docstring)."""
    if q.device.type == "cuda":
        try:
            from .triton.op import sink_attention_cuda
        except ImportError as e:
            raise RuntimeError("deepforcing::sink_attention on CUDA needs the triton package, which cannot be "
                               f"imported here ({e}): pip install triton") from None
        return sink_attention_cuda(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass,
                                   mass_start, mass_end, key_bias)
    if q.device.type == "cpu":
        return torch.ops.deepforcing.sink_attention_cpu(q, k, v, cos, sin, rot_len, interleaved, softmax_scale,
                                                        return_mass, mass_start, mass_end, key_bias)
    if q.device.type == "meta":
        return _shapes(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_start, mass_end)
    raise RuntimeError(f"deepforcing::sink_attention has no kernel for {q.device.type} tensors "
                       "(use backend='reference')")


def _define():
    # triton_op makes the Triton launches visible to torch.compile / CUDA graphs on CUDA; it runs the function
    # itself as the fake implementation, so the function must (and does) work on fake tensors of any device.
    if hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(OP_NAME, _sink_attention, mutates_args=())
    op = torch.library.custom_op(OP_NAME, _sink_attention, mutates_args=())
    op.register_fake(_shapes)
    return op


sink_attention_op = _define()


# ---------------------------------------------------------------------------------------------- autograd
def attention_maths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rot_len: int, interleaved: bool, softmax_scale: float,
                    key_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable float32 maths of the op: ``(out float32 [B, Lq, Hq, D], lse [B, Hq, Lq])``.

    Used by the backward (recomputation) only; the forward of every device runs its kernel."""
    Hq, Hkv = q.shape[2], k.shape[2]
    kf = rotate_keys(k, cos, sin, rot_len, interleaved)
    qf, vf = q.float(), v.float()
    if Hq != Hkv:  # contiguous head groups share a KV head (flash-attn convention)
        kf = kf.repeat_interleave(Hq // Hkv, dim=2)
        vf = vf.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * softmax_scale
    if key_bias is not None:
        s = s + key_bias.float()[:, :, None, :]
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vf), lse


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, rot_len, interleaved, softmax_scale = inputs[:8]
    key_bias = inputs[11] if len(inputs) > 11 else None
    ctx.save_for_backward(q, k, v, cos, sin, key_bias)
    ctx.rot_len, ctx.interleaved, ctx.softmax_scale = rot_len, interleaved, softmax_scale


def recompute_grads(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, grad_out, grad_lse, needs,
                    key_bias=None):
    """Gradients ``(dq, dk, dv[, dbias])`` (None where not needed; ``dbias`` only when ``needs`` has a fourth
    entry) of ``out`` / ``lse`` by recomputing the attention in float32 PyTorch maths: the one backward every
    backend shares (the mass is a statistic: no gradient)."""
    needs = tuple(needs) + (False,) * (4 - len(needs)) if key_bias is not None else tuple(needs[:3])
    with torch.enable_grad():
        inputs = (q, k, v) if key_bias is None else (q, k, v, key_bias)
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
        bias = leaves[3] if key_bias is not None else None
        out, lse = attention_maths(*leaves[:3], cos, sin, rot_len, interleaved, softmax_scale, bias)
        terms, grads = [], []
        if grad_out is not None:
            terms.append(out)
            grads.append(grad_out.float())
        if grad_lse is not None:
            terms.append(lse)
            grads.append(grad_lse.float())
        wrt = [t for t, n in zip(leaves, needs) if n]
        got = torch.autograd.grad(terms, wrt, grads, allow_unused=True) if terms and wrt else []
    it = iter(got)
    d = [next(it) if n else None for n in needs]
    return tuple((g.to(t.dtype) if g is not None else None) for g, t in zip(d, inputs))


def _backward(ctx, grad_out, grad_lse, grad_mass):
    q, k, v, cos, sin, key_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = recompute_grads(q, k, v, cos, sin, ctx.rot_len, ctx.interleaved, ctx.softmax_scale, grad_out,
                            grad_lse, needs[:3] + (needs[11:12] if key_bias is not None else ()), key_bias)
    dbias = grads[3] if key_bias is not None else None
    return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, dbias


class InterpretedTriton(torch.autograd.Function):
    """The Triton implementation on CPU tensors (``TRITON_INTERPRET=1``, which the dispatcher would route to the
    C++ kernel), with the op's autograd rule, so the interpreter path differentiates like the others."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass, mass_start, mass_end,
                key_bias=None):
        from .triton.op import sink_attention_cuda

        ctx.save_for_backward(q, k, v, cos, sin, key_bias)
        ctx.rot_len, ctx.interleaved, ctx.softmax_scale = rot_len, interleaved, softmax_scale
        out, lse, mass = sink_attention_cuda(q, k, v, cos, sin, rot_len, interleaved, softmax_scale, return_mass,
                                             mass_start, mass_end, key_bias)
        ctx.mark_non_differentiable(mass)
        return out, lse, mass

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_mass):
        return _backward(ctx, grad_out, grad_lse, grad_mass)


sink_attention_op.register_autograd(_backward, setup_context=_setup_context)
