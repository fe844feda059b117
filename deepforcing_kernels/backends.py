"""The backend registry: which implementation of the fused op runs a call, decided once.

Each :class:`Backend` is data: a name, the devices it runs on, an availability check (is its code importable or
built in this process), a capability check (can it take this head_dim / dtype), and its trusted entry point
``run`` (arguments already validated by :func:`deepforcing_kernels.sink_attention`), and a feature check (does it
take the op's optional inputs a call uses, :data:`FEATURES`). ``"auto"`` picks the first backend, in
:data:`PRIORITY` order, whose checks accept the call, so a head_dim the Triton kernel cannot take
falls back to the next one instead of failing; an explicitly named backend that cannot take a call fails with its
reason. :class:`~deepforcing_kernels.StreamingKVCache` resolves its backend once, at construction, and calls
``run`` on every pass; the public op resolves per call.

The compiled extension ``_C`` is reached only from here (and from :mod:`deepforcing_kernels.ops`, the op's CPU
kernel): its host helpers (:meth:`Backend.all_finite`, :meth:`Backend.frame_sums`) come with the backend, so
``backend="reference"`` runs no C++ at all.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar, Union

import torch

from . import _ext
from .presets import BACKEND_NAMES, BACKEND_PRIORITY
from .rotation import rotation_tables
from .triton import interpreting as triton_interpreting
from .triton import triton_supports

__all__ = ["Backend", "BACKEND_NAMES", "PRIORITY", "FEATURES", "get_backend", "resolve", "available_backends",
           "triton_interpreting", "torch_all_finite", "torch_frame_sums", "cpp_pass_ops"]

PRIORITY = BACKEND_PRIORITY
#: the op's optional inputs a backend may or may not take: ``key_bias`` (an additive per-key logit bias) and
#: ``head_rope`` (per-KV-head rotation tables, from a RopeSpec with ``head_scale``)
FEATURES: Tuple[str, ...] = ("key_bias", "head_rope")
Result = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


# ---------------------------------------------------------------------------------------------- host helpers
def torch_all_finite(*tensors: torch.Tensor) -> bool:
    """True when no tensor holds NaN or inf, with one host sync.

    NaN and inf propagate through a sum, so one float32 sum per tensor finds them ~20x faster than
    ``isfinite(t).all()``; only when the total is not finite (or a huge finite tensor overflowed it) does the exact
    elementwise check run."""
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    total = floats[0].sum(dtype=torch.float32)
    for t in floats[1:]:
        total = total + t.sum(dtype=torch.float32)
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floats)


def torch_frame_sums(q: torch.Tensor, frames: int) -> torch.Tensor:
    """float32 ``[B, frames, H, D]``: the sum of each frame's query tokens (no float32 copy of q)."""
    B, L, H, D = q.shape
    return q.reshape(B, frames, L // frames, H, D).sum(dim=2, dtype=torch.float32)


def _cpp_all_finite(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if not (t.is_cpu and t.is_floating_point() and t.is_contiguous()):
            return torch_all_finite(*tensors)
    # a single-threaded exponent-bit scan: on CPU a parallel ATen reduction of a block-sized tensor costs more in
    # fork/join than the scan itself. Eager calls skip the compiler-disable wrapper (a few us a pass).
    if torch.compiler.is_compiling():
        return bool(_ext_all_finite(tensors))
    return bool(_ext.require().all_finite(tensors))


_Fn = TypeVar("_Fn", bound=Callable)


def eager_under_compile(fn: _Fn) -> _Fn:
    """Run ``fn`` eagerly even inside ``torch.compile`` (a graph break around it). The disabled version is made
    on first use under compilation: ``torch.compiler.disable`` imports torch's compiler stack (and triton), which
    a plain ``import deepforcing_kernels`` must not pay for."""
    disabled: List[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# The extension's host helpers run eagerly under torch.compile (a clean graph break, same numbers as eager)
# instead of dynamo trying to trace into a pybind function.
@eager_under_compile
def _ext_all_finite(tensors) -> bool:
    return _ext.require().all_finite(tensors)


@eager_under_compile
def _ext_frame_sums(q: torch.Tensor, frames: int) -> torch.Tensor:
    return _ext.require().frame_sums(q, frames)


def _cpp_frame_sums(q: torch.Tensor, frames: int) -> torch.Tensor:
    if q.device.type == "cpu" and q.is_contiguous():
        return _ext_frame_sums(q, frames)  # one thread: this runs on every pass
    return torch_frame_sums(q, frames)


class CppSlotOps:
    """The extension's slot moves for the cache's storage, on the calling thread (csrc/cache_ops.h): a block's K/V
    is a few hundred KB, and an ATen parallel copy of it waits longer for its threads to wake (~60 us a copy with
    two threads under ``OMP_WAIT_POLICY=PASSIVE``) than it spends copying. Pure data movement: the bytes are the
    ones ``Tensor.copy_`` writes. :meth:`usable` says whether the tensors qualify (contiguous CPU tensors, eager);
    the storage keeps its torch code for everything else."""

    def __init__(self, mod) -> None:
        self.copy = mod.copy_slots
        self.move = mod.move_slots
        self.compact = mod.compact_slots
        self.write_block = getattr(mod, "write_block", None)  # a new block's slots in one call (PASS_API)

    @staticmethod
    def usable(*tensors: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False
        return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _cpp_slot_ops() -> Optional[CppSlotOps]:
    mod = _ext.load()
    return CppSlotOps(mod) if mod is not None and getattr(mod, "SLOT_API", False) else None


def cpp_pass_ops():
    """The extension's whole-pass helpers (``PreparedPass``, ``compress_pass``: csrc/pass_ops.h) when it has
    them, else None: a cache then runs its passes in Python (the oracle of those helpers)."""
    mod = _ext.load()
    return mod if mod is not None and getattr(mod, "PASS_API", False) else None


# ---------------------------------------------------------------------------------------------- entries
_OP = None


def registered_op():
    """``torch.ops.deepforcing.sink_attention.default``, defined on first use (defining it imports triton when
    that is installed, which a CPU-only ``import deepforcing_kernels`` should not pay for)."""
    global _OP
    if _OP is None:
        from . import ops  # noqa: F401  (defines the op)

        _OP = torch.ops.deepforcing.sink_attention.default
    return _OP


def _schema_args(q, k, v, rope, sink_len, sink_shift, key_shift, softmax_scale, return_mass, mass_q_range,
                 key_bias=None) -> tuple:
    """The op's positional arguments (its schema, :mod:`.ops`) for validated shift-level arguments (the bias is
    passed only when given, so calls without it keep the op's short form)."""
    cos, sin, rot_len = rotation_tables(rope, sink_len, sink_shift, key_shift, q.shape[0], k.shape[1], q.device,
                                        k.shape[2])
    args = (q, k, v, cos, sin, rot_len, True if rope is None else rope.interleaved, softmax_scale, return_mass,
            mass_q_range[0], mass_q_range[1])
    return args if key_bias is None else args + (key_bias,)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a call may skip the dispatcher: not being traced and no gradient wanted. The op then adds only
    dispatch cost (about 12 us a call on CPU, several times the kernel at small sizes), so eager inference calls
    the kernel the op would call, directly."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _entry(direct: Callable[..., Tuple[torch.Tensor, ...]], graph: Callable[..., Tuple[torch.Tensor, ...]]):
    """A backend's trusted entry: ``direct(*schema args)`` for eager inference, ``graph(*schema args)`` (the
    registered op, or the interpreter's autograd wrapper) when autograd or tracing must see the call."""

    def run(q, k, v, *, rope, sink_len, sink_shift, key_shift, softmax_scale, return_lse, return_mass,
            mass_q_range, key_bias=None) -> Result:
        args = _schema_args(q, k, v, rope, sink_len, sink_shift, key_shift, softmax_scale, return_mass,
                            mass_q_range, key_bias)
        out, lse, mass = (direct if _eager(q, k, v) else graph)(*args)
        return out, (lse if return_lse else None), (mass if return_mass else None)

    return run


def _op(*args):
    """The registered op (device dispatch by the dispatcher)."""
    return (_OP if _OP is not None else registered_op())(*args)


def _cpp_direct(*args):
    return _ext.require().sink_attention_fwd(*args)


def _triton_direct(*args):
    from .triton.op import sink_attention_cuda

    return sink_attention_cuda(*args)


def _triton_graph(*args):
    if args[0].device.type == "cuda":
        return _op(*args)
    # CPU tensors under TRITON_INTERPRET=1: the dispatcher would route them to the C++ kernel, so the Triton
    # implementation runs under the op's autograd rule directly
    from .ops import InterpretedTriton

    return InterpretedTriton.apply(*args)


_cpp_run = _entry(_cpp_direct, _op)
_triton_run = _entry(_triton_direct, _triton_graph)


def _reference_run(q, k, v, **kw) -> Result:
    from .reference.attention import sink_attention_reference  # the oracle, used only as this backend

    return sink_attention_reference(q, k, v, **kw)


def _triton_available() -> Optional[str]:
    # find_spec, not import: importing triton fixes its interpreter mode for the process (TRITON_INTERPRET is read
    # then), so merely asking whether a backend exists must not do it
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    return None


def _cpp_available() -> Optional[str]:
    mod = _ext.load()
    if mod is None or not hasattr(mod, "sink_attention_fwd"):
        return ("the C++ extension deepforcing_kernels._C is not built; install a C++ compiler and run "
                "`pip install --no-build-isolation -e .`")
    if not getattr(mod, "TABLES_API", False):
        return ("the C++ extension deepforcing_kernels._C is older than this package (no rotation-table "
                "entry); rebuild it with `pip install --no-build-isolation -e .`")
    return None


def _any(head_dim: int, dtype: torch.dtype) -> Optional[str]:
    return None


def _cpp_supports(head_dim: int, dtype: torch.dtype) -> Optional[str]:
    # the kernel walks channels in (re, im) pairs; "auto" then falls back to the reference, which takes any D
    if head_dim < 2 or head_dim % 2:
        return f"the cpp kernel needs an even head_dim >= 2, got {head_dim}"
    return None


def _all_features(feature: str) -> Optional[str]:
    return None if feature in FEATURES else f"unknown feature {feature!r}"


def _cpp_features(feature: str) -> Optional[str]:
    why = _all_features(feature)
    flag = {"key_bias": "KEY_BIAS_API", "head_rope": "HEAD_TABLES_API"}.get(feature)
    if why is None and flag is not None and not getattr(_ext.load(), flag, False):
        why = (f"the C++ extension deepforcing_kernels._C is older than this package (no {feature}); rebuild it "
               "with `pip install --no-build-isolation -e .`")
    return why


@dataclass(frozen=True)
class Backend:
    """One implementation of the fused op.

    Attributes:
        name: ``"triton"``, ``"cpp"`` or ``"reference"``.
        devices: device types it runs on (``"cpu"`` for Triton only under ``TRITON_INTERPRET=1``).
        available: ``() -> None | reason``: whether its code can run in this process.
        supports: ``(head_dim, dtype) -> None | reason``: whether it can take such a call.
        run: trusted entry ``run(q, k, v, *, rope, sink_len, sink_shift, key_shift, softmax_scale, return_lse,
            return_mass, mass_q_range, key_bias=None) -> (out, lse | None, mass | None)`` over validated arguments.
        all_finite, frame_sums: the host helpers the cache uses with this backend.
        takes: ``(feature) -> None | reason``: whether it takes an optional input of :data:`FEATURES`.
        slot_ops: ``() -> CppSlotOps | None``: the host's slot moves for the cache storage (None: torch's copies).
        pass_ops: ``() -> module | None``: the host's whole-pass helpers (:func:`cpp_pass_ops`; None: the cache's
            Python path).
    """

    name: str
    devices: Tuple[str, ...]
    available: Callable[[], Optional[str]]
    supports: Callable[[int, torch.dtype], Optional[str]]
    run: Callable[..., Result]
    all_finite: Callable[..., bool] = torch_all_finite
    frame_sums: Callable[[torch.Tensor, int], torch.Tensor] = torch_frame_sums
    takes: Callable[[str], Optional[str]] = _all_features
    slot_ops: Callable[[], Optional[CppSlotOps]] = lambda: None
    pass_ops: Callable[[], Optional[object]] = lambda: None

    def runs_on(self, device: torch.device) -> bool:
        if self.name == "triton" and device.type == "cpu":
            return triton_interpreting()
        return device.type in self.devices or "any" in self.devices

    def reason_against(self, device: torch.device, head_dim: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None, features: Tuple[str, ...] = ()) -> Optional[str]:
        """None when this backend can run such a call (using ``features``) here, else why not (one line)."""
        if not self.runs_on(device):
            where = "CUDA tensors (or TRITON_INTERPRET=1)" if self.name == "triton" else \
                " / ".join(d.upper() if d == "cpu" else d for d in self.devices) + " tensors"
            return f"backend {self.name!r} needs {where}, got {device.type}"
        why = self.available()
        if why is None and head_dim is not None:
            why = self.supports(head_dim, dtype)
        for f in features:
            if why is None:
                why = self.takes(f)
        return why


_REGISTRY: Dict[str, Backend] = {
    "triton": Backend("triton", ("cuda",), _triton_available, triton_supports, _triton_run),
    "cpp": Backend("cpp", ("cpu",), _cpp_available, _cpp_supports, _cpp_run, _cpp_all_finite, _cpp_frame_sums,
                   _cpp_features, _cpp_slot_ops, cpp_pass_ops),
    "reference": Backend("reference", ("any",), lambda: None, _any, _reference_run),
}
_warned_reference = False


def get_backend(name: str) -> Backend:
    """The registry entry called ``name`` (not ``"auto"``)."""
    return _REGISTRY[name]


def resolve(name: str, device: Union[str, torch.device], head_dim: Optional[int] = None,
            dtype: Optional[torch.dtype] = None, features: Tuple[str, ...] = ()) -> Backend:
    """The backend that runs a call of ``head_dim`` / ``dtype`` on ``device`` using the optional inputs
    ``features`` (names of :data:`FEATURES`).

    ``name="auto"`` takes the first of :data:`PRIORITY` that accepts the call (warning once when a CPU call falls
    back to the reference because the C++ kernel is not built). Raises TypeError / ValueError for an unknown name
    and ValueError with the reason when the named backend cannot take the call.
    """
    # memoised per call signature: availability is fixed for a process, except what tests change on purpose
    # (the extension loader, TRITON_INTERPRET), which is part of the key
    key = (name, device, head_dim, dtype, tuple(features), _ext.load, triton_interpreting())
    try:
        hit = _RESOLVED.get(key)
    except TypeError:  # an unhashable argument: the checks below name it
        hit, key = None, None
    if hit is not None:
        return hit
    b = _resolve(name, device, head_dim, dtype, tuple(features))
    if key is not None and len(_RESOLVED) < 256:
        _RESOLVED[key] = b
    return b


_RESOLVED: Dict[tuple, "Backend"] = {}


def _resolve(name: str, device: Union[str, torch.device], head_dim: Optional[int],
             dtype: Optional[torch.dtype], features: Tuple[str, ...] = ()) -> "Backend":
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    dev = torch.device(device)
    if name != "auto":
        b = _REGISTRY[name]
        why = b.reason_against(dev, head_dim, dtype, features)
        if why is not None:
            raise ValueError(f"backend={name!r} cannot run this call: {why}")
        return b
    for cand in PRIORITY:
        b = _REGISTRY[cand]
        if cand == "triton" and dev.type != "cuda":
            continue  # auto never picks the interpreter
        if b.reason_against(dev, head_dim, dtype, features) is None:
            # warn (once) when the extension is missing or too old, not for a call no build takes (an odd head_dim)
            global _warned_reference
            if cand == "reference" and dev.type == "cpu" and not _warned_reference:
                why_not_cpp = _REGISTRY["cpp"].reason_against(dev, None, None, features)
                if why_not_cpp is not None:
                    _warned_reference = True
                    warnings.warn(f"deepforcing_kernels: using the slower PyTorch reference: {why_not_cpp}",
                                  stacklevel=3)
            return b
    return _REGISTRY["reference"]


def available_backends(device: Union[str, torch.device] = "cpu") -> Tuple[str, ...]:
    """Backends that can run on tensors of ``device`` in this process (``"auto"`` excluded), best first."""
    dev = torch.device(device)
    return tuple(n for n in PRIORITY if _REGISTRY[n].reason_against(dev) is None)
