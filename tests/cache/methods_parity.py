"""Driving a cache with a trace recorded from another method's authors' code (tests/cache/data/*.pt).

A trace holds, per pass, the un-rotated q / k / v the authors' self-attention module was given (bf16 values), its
bf16 output, and the window it attended: per frame slot, the frame whose K/V it held and the temporal position it
was rotated at (identified from the module's cache by value). The traces were made by running each authors'
module on CPU at a tiny size (the repository and commit are in the trace's config and in docs/methods.md); only
these tensors are kept, not their code.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Tuple

import torch

from deepforcing_kernels import RopeSpec, StreamingKVCache
from deepforcing_kernels.rotation import apply_rope

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_trace(name: str) -> Dict:
    return torch.load(os.path.join(DATA, name + ".pt"), weights_only=True)


def rope_of(trace: Dict) -> RopeSpec:
    return RopeSpec.wan(trace["config"]["head_dim"])


def window_of(trace: Dict, i: int) -> List[Tuple[int, int]]:
    """Pass ``i``'s window as ``(frame, position)`` per frame slot."""
    return [(int(f), int(p)) for f, p in trace["window"][i].tolist() if f >= 0]


def window_attention(trace: Dict, i: int, kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor = None,
                     key_bias: torch.Tensor = None) -> torch.Tensor:
    """float64 attention of pass ``i``'s queries (rotated at their absolute frames) over the exact window the
    authors' code attended: each slot's un-rotated K from ``kv`` (frame -> (K, V)) rotated at the slot's position,
    and its V; ``key_bias`` (one float64 per key of the window) is added to the logits. ``q``: pass ``i``'s
    un-rotated queries (default: the trace's)."""
    c = trace["config"]
    F, (h, w) = c["block_frames"], c["grid"]
    rope, f0 = rope_of(trace), (i // len(c["timesteps"])) * F
    q = trace["q"][i] if q is None else q
    ks, vs = [], []
    for f, p in window_of(trace, i):
        ks.append(apply_rope(kv[f][0].double(), rope, frame_offset=p, grid=(1, h, w)))
        vs.append(kv[f][1].double())
    qr = apply_rope(q.double(), rope, frame_offset=f0, grid=(F, h, w))
    K, V = torch.cat(ks, 1), torch.cat(vs, 1)
    s = torch.einsum("bqhd,bkhd->bhqk", qr, K) / c["head_dim"] ** 0.5
    if key_bias is not None:
        s = s + key_bias
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)


def block_kv(trace: Dict, i: int, k: torch.Tensor, v: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """frame -> (K, V) of pass ``i``'s own block, cut from its ``k`` / ``v`` (``[B, F * n, H, D]``)."""
    c = trace["config"]
    n, F = c["tokens_per_frame"], c["block_frames"]
    f0 = (i // len(c["timesteps"])) * F
    return {f0 + j: (k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n]) for j in range(F)}


def reference_output(trace: Dict, i: int, clean: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """:func:`window_attention` of pass ``i`` with ``clean`` (each earlier frame's clean-pass K/V) and this pass's
    own block."""
    return window_attention(trace, i, {**clean, **block_kv(trace, i, trace["k"][i], trace["v"][i])})


def layer_windows(layer, tokens_per_frame: int) -> List[Tuple[int, int]]:
    """A cache layer's window as ``(frame, position)`` per frame slot (compare with :func:`window_of`)."""
    n = tokens_per_frame
    return [(int(f), int(p)) for f, p in zip(layer.frames()[0, ::n].tolist(), layer.positions()[0, ::n].tolist())]


def drive(trace: Dict, cache: StreamingKVCache, start: int = 0, stop: int = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Run passes ``[start, stop)`` of the trace through layer 0 of ``cache`` (q, k rotated at absolute frames in
    float64, cast to the cache's dtype, as the model does); yields ``(pass index, output)``."""
    c = trace["config"]
    F, (h, w) = c["block_frames"], c["grid"]
    rope, P = rope_of(trace), len(c["timesteps"])
    stop = trace["q"].shape[0] if stop is None else stop
    layer = cache.layers[0]
    for i in range(start, stop):
        f0 = (i // P) * F
        q, k, v = (trace[x][i].double() for x in ("q", "k", "v"))
        q = apply_rope(q, rope, frame_offset=f0, grid=(F, h, w)).to(cache.dtype)
        k = apply_rope(k, rope, frame_offset=f0, grid=(F, h, w)).to(cache.dtype)
        yield i, layer.attend(q, k, v.to(cache.dtype), start_frame=f0)


def clean_kv(trace: Dict, upto: int) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """The un-rotated clean-pass K/V of every frame of the blocks before pass ``upto``'s block."""
    c = trace["config"]
    n, F, P = c["tokens_per_frame"], c["block_frames"], len(c["timesteps"])
    out = {}
    for i in range(P - 1, upto, P):
        if i // P >= upto // P:
            break
        f0 = (i // P) * F
        for j in range(F):
            out[f0 + j] = (trace["k"][i][:, j * n:(j + 1) * n], trace["v"][i][:, j * n:(j + 1) * n])
    return out


def use_backend(backend: str, monkeypatch) -> None:
    """Skip or set up a parity test's backend: C++ required when built for CI, Triton under the interpreter."""
    import pytest
    from support import require_cpp

    if backend == "cpp":
        require_cpp()
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
