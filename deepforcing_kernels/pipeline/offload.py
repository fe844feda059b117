"""Components on the accelerator only while they are used, and what each held there: :class:`ComponentOffload`.

:class:`~deepforcing_kernels.pipeline.VideoPipeline` asks ``offload.use(name)`` around every use of a component
(``"text_encoder"`` while prompts are encoded, ``"vae"`` while a block is decoded or a prefix encoded). An
offloaded component waits on the offload device (the CPU) and is moved to the execution device for that span,
then back; a component that is not offloaded stays where it is. On a CPU run both devices are the CPU: the same
calls are made and nothing moves.

Each component's resident peak is recorded per use: its parameter and buffer bytes on the execution device and,
on CUDA, the allocator's peak during the use (``torch.cuda.max_memory_allocated``, which counts everything
allocated then: weights, activations, the KV cache), so ``report()`` says what each part costs on the device.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = ["ComponentOffload", "module_bytes", "lend"]


def module_bytes(module: Any, device: Optional[torch.device] = None) -> int:
    """Bytes of ``module``'s parameters and buffers (those on ``device`` only, when given)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen or (device is not None and t.device != device):
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    return n


class ComponentOffload:
    """Lend the ``offloaded`` components to ``device`` only while they are used.

    Args:
        components: name -> module (``torch.nn.Module``; anything else is left alone).
        device: the execution device.
        offloaded: the names kept on ``offload_device`` between uses (e.g. ``("text_encoder", "vae")``).
        offload_device: where they wait (default the CPU).

    ``use(name)`` is re-entrant (a nested use of the same component moves nothing). ``events`` lists
    ``(name, "on" | "off")`` in order, ``report()`` the per-component figures, ``peak_resident_bytes`` the most
    component bytes the execution device held at once.
    """

    def __init__(self, components: Mapping[str, Any], device: Union[str, torch.device],
                 offloaded: Sequence[str] = (), offload_device: Union[str, torch.device] = "cpu") -> None:
        unknown = [n for n in offloaded if n not in components]
        if unknown:
            raise ValueError(f"offloaded names {unknown} are not components ({', '.join(components)})")
        self.components = dict(components)
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.offloaded = tuple(offloaded)
        self.events: list = []
        self._depth: Dict[str, int] = {}
        self._stats: Dict[str, Dict[str, Any]] = {
            n: {"offloaded": n in self.offloaded, "bytes": module_bytes(m), "uses": 0, "seconds_on_device": 0.0,
                "resident_peak_bytes": 0 if n in self.offloaded else module_bytes(m),
                "cuda_peak_bytes": None} for n, m in self.components.items()}
        for n in self.offloaded:
            self._place(n, self.offload_device)
        #: most component bytes on the execution device at once so far
        self.peak_resident_bytes = self.resident_bytes()

    def _place(self, name: str, device: torch.device) -> None:
        m = self.components[name]
        if isinstance(m, torch.nn.Module):
            # nn.Module.to: diffusers' ModelMixin.to and transformers' would warn or re-dispatch; a plain move
            torch.nn.Module.to(m, device=device)

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Component ``name`` on the execution device for the duration of the block."""
        st = self._stats.get(name)
        if st is None:
            yield
            return
        d = self._depth.get(name, 0)
        self._depth[name] = d + 1
        st["uses"] += d == 0
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        t0 = time.perf_counter()
        if d == 0 and name in self.offloaded:
            self._place(name, self.device)
            self.events.append((name, "on"))
        if d == 0:
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes())
        if d == 0 and cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self._depth[name] = d
            if d == 0:
                st["resident_peak_bytes"] = max(st["resident_peak_bytes"], module_bytes(self.components[name]))
                if cuda:
                    peak = int(torch.cuda.max_memory_allocated(self.device))
                    st["cuda_peak_bytes"] = max(st["cuda_peak_bytes"] or 0, peak)
                st["seconds_on_device"] += time.perf_counter() - t0
                if name in self.offloaded:
                    self._place(name, self.offload_device)
                    self.events.append((name, "off"))

    def resident_bytes(self) -> int:
        """Bytes of the components the execution device holds now: those not offloaded and those in use (counted
        the same way when both devices are the CPU, where nothing moves)."""
        return sum(module_bytes(m) for n, m in self.components.items()
                   if n not in self.offloaded or self._depth.get(n, 0))

    def report(self) -> Dict[str, Dict[str, Any]]:
        """Per component: ``offloaded``, ``bytes`` (its weights), ``uses``, ``seconds_on_device``,
        ``resident_peak_bytes`` (its weights' bytes on the execution device at most: 0 for an offloaded
        component never used, its size otherwise), ``cuda_peak_bytes`` (the allocator's peak during its uses, on
        CUDA; None elsewhere)."""
        return {n: dict(st) for n, st in self._stats.items()}


def lend(offload: Optional[ComponentOffload], name: str):
    """``offload.use(name)``, or a no-op context without an offload."""
    return nullcontext() if offload is None else offload.use(name)
