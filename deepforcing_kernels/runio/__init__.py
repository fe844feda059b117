"""The run store of ``deepforcing generate``: latents appended block by block, resume state on a time budget.

Its parts: :mod:`.files` (atomic writes), :mod:`.host` (host snapshots of state), :mod:`.layout` (the layout below
and :func:`load_run`), :mod:`.writers` (the writer thread and the state saver), :mod:`.store` (one run's files).

On-disk layout of ``--out run.pt`` (every file holds only tensors and plain values, so
``torch.load(path, weights_only=True)`` reads each one)::

    run.pt                        manifest: {"format": "deepforcing-run/2", "settings": {...}, "frames": target,
                                  "block_frames": 3, "batch_size": B, "parts": "run.pt.d", "complete": bool,
                                  "frames_done": frames on disk when it was written}
    run.pt.d/latents-00000000.pt  one file per block: {"format": "deepforcing-run-block/1", "start_frame": f0,
    run.pt.d/latents-00000003.pt    "latents": [B, block_frames, C, h, w]}; written once, never rewritten
    ...
    run.pt.d/state.pt             {"format": "deepforcing-run-state/1", "frames_done": n,
                                  "rollout": Rollout.state_dict()}: the resume point, replaced at most every
                                  ``--save-every-s`` seconds, on SIGINT / SIGTERM and at the end

Every file is written atomically: a temporary ``.tmp-<name>-<random>`` beside it (created with mode 0666 minus
the umask), ``fsync``, ``os.replace``, then an ``fsync`` of the directory; temporaries of the same run left by a
killed process are removed when the run starts again. A run's latents grow by one small file per block, whatever
the stream's length; the cache state (6 GB at the Wan-1.3B geometry in bf16) is written once per save, in a
background thread from a host snapshot, so generation waits only for the snapshot.

:func:`load_run` reads this layout and the single-file output of earlier versions
(``{"latents", "settings", "frames_done", "complete", "state"}`` in one ``.pt``).
"""
from __future__ import annotations

import torch  # noqa: F401  (tests patch runio.torch.save to fail a write)

from ..formats import RUN_BLOCK_FORMAT, RUN_FORMAT, RUN_STATE_FORMAT
from .files import RunError, atomic_save, check_parent_writable
from .host import limit_malloc_arenas, retain_freed_host_memory, return_freed_host_memory, to_cpu
from .layout import STATE_NAME, load_run, parts_dir
from .store import RunStore
from .writers import BackgroundWriter, StateSaver

__all__ = ["RUN_FORMAT", "RUN_BLOCK_FORMAT", "RUN_STATE_FORMAT", "RunStore", "StateSaver", "BackgroundWriter", "load_run",
           "atomic_save", "parts_dir", "RunError", "to_cpu", "retain_freed_host_memory", "limit_malloc_arenas",
           "return_freed_host_memory", "check_parent_writable",
           "STATE_NAME"]
