"""Keep the K/V of the layers not in use off the accelerator: :func:`offload_layers`.

A model runs its layers one at a time, and each layer's cache slots are read only by that layer's attention
pass. With ``offload_layers(cache, "cpu")`` every layer's slot tensors (K, V, source frames and the per-slot
extras of :class:`~.storage.LayerStorage`) live on the host; a layer's are copied to the cache's device just
before its pass (``attend`` / ``recompute``) and back right after, so the accelerator holds one layer's slots
instead of all of them. The arithmetic is untouched (the same tensors, moved whole), so the results equal a
resident cache's bit for bit. The cost is two copies of a layer's slots per pass: at Wan 1.3B's geometry (24
frames of capacity x 1560 tokens x 12 heads x 128, bf16, with the source frames and Top-C extras) 231 MB per
layer-pass, 30 x 5 = 150 layer-passes per block; it trades PCIe bandwidth for memory, for GPUs too small for the resident cache. When host and device are the same
(a CPU run), nothing is copied and the code path is the same.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Union

import torch

__all__ = ["LayerOffload", "offload_layers"]


def _slot_bytes(storage: Any) -> int:
    return sum(t.numel() * t.element_size() for t in storage.per_slot())


def _move(storage: Any, device: torch.device) -> None:
    """Move every per-slot tensor of one layer's storage to ``device`` (a no-op where it already is)."""
    storage.k = storage.k.to(device)
    storage.v = storage.v.to(device)
    storage.frames = storage.frames.to(device)
    storage.extra = {n: t.to(device) for n, t in storage.extra.items()}
    storage.device = device  # where a `full` cache's growth allocates while the layer is lent


class LayerOffload:
    """What :func:`offload_layers` installed on a cache: the layers' slots on ``host``, lent to ``device`` one
    layer at a time.

    Attributes:
        device, host: the cache's device and where idle layers' slots wait.
        lends: layer passes run so far; ``bytes_moved``: bytes copied both ways (0 when host == device).
        peak_device_bytes: most slot bytes held on ``device`` at once (one layer's, when host != device).
    """

    def __init__(self, cache: Any, host: Union[str, torch.device]) -> None:
        self.cache = cache
        self.device = torch.device(cache.layers[0].ctx.device)
        self.host = torch.device(host)
        self.same = self.device == self.host
        self.lends = 0
        self.bytes_moved = 0
        self._on_device = 0
        self._peak = 0
        for layer in cache.layers:
            _move(layer.storage, self.host)
            attend, recompute = layer.attend, layer.recompute
            layer.attend = self._lent(layer, attend)  # instance attributes: the class stays untouched
            layer.recompute = self._lent(layer, recompute)

    @contextmanager
    def lend(self, layer: Any) -> Iterator[None]:
        """Layer ``layer``'s slots on the device for the duration of the block."""
        self.lends += 1
        if self.same:
            yield
            return
        _move(layer.storage, self.device)
        n = _slot_bytes(layer.storage)
        self._on_device += n
        self._peak = max(self._peak, self._on_device)
        try:
            yield
        finally:
            n = _slot_bytes(layer.storage)  # a `full` cache may have grown during the pass
            _move(layer.storage, self.host)
            self._on_device -= n
            self.bytes_moved += 2 * n

    def _lent(self, layer: Any, fn: Any) -> Any:
        def run(*args: Any, **kw: Any) -> Any:
            with self.lend(layer):
                return fn(*args, **kw)
        run.__doc__ = fn.__doc__
        return run

    @property
    def peak_device_bytes(self) -> int:
        """Most slot bytes on the device at once: one layer's when lending, all of them when host == device."""
        return self.host_bytes() if self.same else self._peak

    def host_bytes(self) -> int:
        """Slot bytes of every layer (held on the host between passes)."""
        return sum(_slot_bytes(layer.storage) for layer in self.cache.layers)

    def report(self) -> Dict[str, Any]:
        """Plain values: device, host, lends, bytes_moved, peak_device_bytes, total slot bytes."""
        return {"device": str(self.device), "host": str(self.host), "lends": self.lends,
                "bytes_moved": self.bytes_moved, "peak_device_bytes": self.peak_device_bytes,
                "slot_bytes": self.host_bytes()}


def offload_layers(cache: Any, host: Union[str, torch.device] = "cpu") -> LayerOffload:
    """Keep ``cache``'s layer slots on ``host`` and lend each layer's to the cache's device only during its pass
    (see the module docstring). Returns the :class:`LayerOffload` (its :meth:`~LayerOffload.report` says what
    moved). Install it before the first pass or between blocks; the cache's state dict and resume are unchanged.
    """
    layers: List[Any] = list(getattr(cache, "layers", ()))
    if not layers or not all(hasattr(layer, "storage") for layer in layers):
        raise TypeError(f"cache must be a StreamingKVCache, got {type(cache).__name__}")
    return LayerOffload(cache, host)
