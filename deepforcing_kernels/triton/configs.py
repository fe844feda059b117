"""Launch configurations of the Triton kernels, as data: one table per arch, read by the kernels' launchers.

Each row: ``(kernel, modes, dtypes, max_head_dim, BLOCK_M, BLOCK_N, BLOCK_N_ROT, num_warps, num_stages, reason)``.

* ``kernel``: ``"fwd"`` (online-softmax forward, :mod:`.attention`) or ``"mass"`` (attention-mass pass, :mod:`.mass`).
* ``modes``: the re-phasing variants the row covers: ``"none"`` (no key moves), ``"sink"`` (keys
  ``[0, rot_len)`` by one table), ``"perkey"`` (one table row per key).
* ``dtypes``: ``"fp32"``, ``"fp16"``, ``"bf16"``.
* ``max_head_dim``: the row covers head dims up to this (head dims are powers of two in [16, 256]).
* forward: ``BLOCK_M`` query rows per program, ``BLOCK_N`` keys per step over keys that do not move,
  ``BLOCK_N_ROT`` keys per step over re-phased tiles (the fp32 rotation needs registers). Mass: ``BLOCK_N`` keys
  owned by one program (kept resident, re-phased once), ``BLOCK_M`` the streamed query tile; ``BLOCK_N_ROT``
  unused (0).

The first row that matches ``(kernel, mode, dtype, head_dim)`` wins. :func:`fwd_config` and :func:`mass_config`
read these tables at every launch (so a test or a user can patch a table or the functions). Arch mapping: the
interpreter (CPU tensors under ``TRITON_INTERPRET=1``) is arch 0; sm_90 and newer read the sm_90 table; everything
else the sm_80 table (sm_86 / sm_89 have 99 KiB of shared memory per block instead of 163 KiB: the sm_80 rows for
16-bit D 128 use at most 96 KiB, see ``python -m deepforcing_kernels.triton.aot``).

How these were chosen. The production call (q 1 x 4680 x 12 x 128, keys 16 to 21 frames x 1560, bf16) is
compute-bound (about 4 * Lq * Lk * D FLOPs per head against 2 * Lk * D * 2 bytes read per query tile), so tiles are
as large as the register file allows without spills: every sm_80 / sm_90 row for D 128 was compiled ahead of time
(``python -m deepforcing_kernels.triton.aot --arch 80 90 --strict``: zero spill bytes, no local memory,
tensor-core instructions present; the register and shared-memory figures in the reasons are from that report,
Triton 3.9). ``python -m deepforcing_kernels.triton.autotune`` sweeps candidates on a real
GPU and prints rows in this format to paste here; until a GPU run replaces them, the rows below are the
spill-free choices, not measured optima.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from ..presets import dtype_name


class FwdConfig(NamedTuple):
    """Launch configuration of one kernel (the forward's fields; the mass kernel ignores ``BLOCK_N_ROT``)."""

    BLOCK_M: int  # query rows per program (mass: query rows per inner step)
    BLOCK_N: int  # keys per inner-loop step over keys that are not re-phased (mass: keys per program)
    num_warps: int
    num_stages: int
    BLOCK_N_ROT: int = 0  # keys per step over re-phased tiles (0: BLOCK_N); the rotation needs registers


LaunchConfig = FwdConfig

MODES = ("none", "sink", "perkey")
MODE_IDS = {"none": 0, "sink": 1, "perkey": 2}  # the kernels' REPHASE constexpr
ALL = ("none", "sink", "perkey")
F16 = ("fp16", "bf16")  # the half dtypes the GPU kernels are compiled and tuned for (presets spellings)

Row = Tuple[str, Sequence[str], Sequence[str], int, int, int, int, int, int, str]

# ------------------------------------------------------------------------------------------------ interpreter
INTERPRETER: List[Row] = [
    # kernel modes dtypes                 maxD  M   N  ROT w  s  reason
    ("fwd", ALL, ("fp32",) + F16, 256, 32, 32, 0, 4, 1,
     "numpy runs one program at a time: fewer, larger programs are faster; tests pass smaller tiles explicitly"),
    ("mass", ALL, ("fp32",) + F16, 256, 32, 32, 0, 4, 1, "as fwd: few programs; 32 keys per program"),
]

# ------------------------------------------------------------------------------------------------ sm_80 (A100)
SM80: List[Row] = [
    ("fwd", ALL, ("fp32",), 256, 64, 32, 0, 4, 2,
     "fp32 tiles are twice the bytes of 16-bit ones: half the key tile; IEEE fp32 dots, no tensor-core speed"),
    ("fwd", ALL, F16, 64, 128, 64, 32, 8, 3,
     "8 warps: with 4 the per-key variant needs 255 registers and spills; rotated tiles 32 keys wide"),
    ("fwd", ("none",), F16, 128, 128, 64, 32, 8, 2,
     "production (compute-bound): 128 x 64 tiles keep the tensor cores fed; 2 stages: 194 regs, 64 KiB, no "
     "spill (3 stages spill on sm_80)"),
    ("fwd", ("sink",), F16, 128, 128, 64, 32, 8, 2,
     "production: plain tiles as 'none'; sink tiles 32 keys wide (at 64 the fp32 rotation passes 255 registers); "
     "255 regs, no spill"),
    ("fwd", ("perkey",), F16, 128, 128, 64, 32, 8, 2,
     "every tile re-phases, 32 keys wide (register limit of the fp32 rotation); 2 stages: 255 regs, 96 KiB"),
    ("fwd", ALL, F16, 256, 64, 32, 0, 8, 2,
     "D 256: a 64 x 256 fp32 accumulator is already 64 registers a thread; small key tiles (not production)"),
    ("mass", ALL, ("fp32",), 256, 32, 64, 0, 4, 2, "fp32: half-size query tiles (twice the bytes)"),
    ("mass", ALL, F16, 64, 64, 128, 0, 4, 3,
     "the key tile (hi + lo halves) stays resident in registers; 4 warps hold 128 x 64 without spills"),
    ("mass", ("none",), F16, 128, 64, 128, 0, 8, 3,
     "production: 128 resident keys, 64-row query tiles streamed; 8 warps hold the 128 x 128 key tile "
     "(164 regs, no spill)"),
    ("mass", ("sink", "perkey"), F16, 128, 64, 128, 0, 8, 3,
     "as 'none': the rotation runs once per program, when the resident tile is loaded (hi + lo halves "
     "resident: 248 regs, 96 KiB, no spill)"),
    ("mass", ALL, F16, 256, 64, 128, 0, 8, 3, "carried over from D 128, not production (not AOT-checked)"),
]

# ------------------------------------------------------------------------------------------------ sm_90 (H100/H200)
SM90: List[Row] = [
    ("fwd", ALL, ("fp32",), 256, 64, 32, 0, 4, 2, "fp32: as sm_80 (no wgmma for IEEE fp32)"),
    ("fwd", ALL, F16, 64, 128, 64, 32, 8, 3, "as sm_80: 8 warps avoid the per-key spill of 4 warps"),
    ("fwd", ("none",), F16, 128, 128, 64, 32, 8, 3,
     "production: 128-row query tiles for wgmma (two warpgroups); 3 stages: 176 regs, 129 KiB of 227"),
    ("fwd", ("sink",), F16, 128, 128, 64, 32, 8, 3,
     "production: plain tiles as 'none'; sink tiles 32 keys wide (at 64 the fp32 rotation spills); 237 regs"),
    ("fwd", ("perkey",), F16, 128, 128, 64, 32, 8, 3,
     "every tile re-phases, 32 keys wide; 3 stages: 185 regs, 153 KiB, no spill"),
    ("fwd", ALL, F16, 256, 64, 32, 0, 8, 2, "D 256: as sm_80 (not production)"),
    ("mass", ALL, ("fp32",), 256, 32, 64, 0, 4, 2, "fp32: as sm_80"),
    ("mass", ALL, F16, 64, 64, 128, 0, 4, 3, "as sm_80"),
    ("mass", ("none",), F16, 128, 64, 128, 0, 8, 3,
     "production: 128 resident keys x 64-row query tiles (wgmma m64); 8 warps hold the key tile: 122 regs"),
    ("mass", ("sink", "perkey"), F16, 128, 64, 128, 0, 8, 3,
     "as 'none': one rotation per program, outside the query loop (170 regs, 117 KiB)"),
    ("mass", ALL, F16, 256, 64, 128, 0, 8, 3, "carried over from D 128, not production (not AOT-checked)"),
]

TABLES: Dict[int, List[Row]] = {0: INTERPRETER, 80: SM80, 90: SM90}


def table_arch(arch: int) -> int:
    """The table an arch reads: 0 (interpreter), 90 (sm_90 and newer) or 80 (everything else)."""
    if arch == 0:
        return 0
    return 90 if arch >= 90 else 80


def lookup(kernel: str, head_dim: int, dtype: torch.dtype, arch: int, mode: str) -> Tuple[FwdConfig, str]:
    """``(config, reason)`` of the first row of ``arch``'s table covering ``(kernel, mode, dtype, head_dim)``.

    Raises:
        ValueError: no row covers the call (a dtype or head dim the kernels do not take).
    """
    if mode not in MODE_IDS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        dt = dtype_name(dtype, short=True)
    except ValueError:
        dt = None
    for row in TABLES[table_arch(arch)]:
        k, modes, dtypes, max_d, bm, bn, rot, warps, stages, reason = row
        if k == kernel and mode in modes and dt in dtypes and head_dim <= max_d:
            return FwdConfig(bm, bn, warps, stages, rot), reason
    raise ValueError(f"no {kernel} launch config for head_dim {head_dim}, dtype {dtype}, arch {arch}, mode {mode}")


def fwd_config(head_dim: int, dtype: torch.dtype, arch: int, mode: str = "sink") -> FwdConfig:
    """Forward launch config for ``(head_dim, dtype, arch, mode)``; ``arch`` is ``major * 10 + minor``
    (0: interpreter). Read from :data:`TABLES` at every launch."""
    return lookup("fwd", head_dim, dtype, arch, mode)[0]


def mass_config(head_dim: int, dtype: torch.dtype, arch: int, mode: str = "sink") -> FwdConfig:
    """Mass-kernel launch config for ``(head_dim, dtype, arch, mode)`` (0: interpreter), from :data:`TABLES`."""
    return lookup("mass", head_dim, dtype, arch, mode)[0]


def format_rows(rows: Sequence[Row]) -> str:
    """Rows as Python source lines in the format of the tables above (what the autotuner prints to paste)."""
    lines = []
    for k, modes, dtypes, max_d, bm, bn, rot, warps, stages, reason in rows:
        lines.append(f"    ({k!r}, {tuple(modes)!r}, {tuple(dtypes)!r}, {max_d}, {bm}, {bn}, {rot}, {warps}, "
                     f"{stages},\n     {reason!r}),")
    return "\n".join(lines)
