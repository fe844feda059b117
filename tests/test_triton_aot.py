"""Ahead-of-time compile of every production Triton variant for sm_80 and sm_90 (no GPU needed).

Runs ``python -m deepforcing_kernels.triton.aot --arch 80 90 --json --strict`` in a subprocess with
TRITON_INTERPRET=0 (this session may have the interpreter on, and the interpreter's kernels cannot be compiled),
then checks the report: every variant compiled, zero spills, shared memory within the arch limit.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.triton

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
EXPECTED = {f"{op}_{dt}_{mode}" for op in ("fwd", "mass") for dt in ("fp16", "bf16")
            for mode in ("none", "sink", "perkey")}


@pytest.fixture(scope="module")
def aot_report():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "deepforcing_kernels.triton.aot", "--arch", *map(str, ARCHS),
                           "--json", "--strict"], capture_output=True, text=True, env=env, timeout=600)
    try:
        rows = json.loads(proc.stdout)  # the whole of stdout is exactly one JSON list
    except json.JSONDecodeError:
        pytest.fail(f"aot --json did not print one JSON list (rc {proc.returncode}):\nstdout:\n{proc.stdout}\n"
                    f"stderr:\n{proc.stderr[-4000:]}")
    return proc, rows


def test_every_production_variant_compiled(aot_report):
    proc, rows = aot_report
    assert isinstance(rows, list)
    for row in rows:
        assert set(row) == {"kernel", "arch", "registers", "spills", "shared_bytes"}
    seen = {(r["kernel"], r["arch"]) for r in rows}
    assert seen == {(k, a) for k in EXPECTED for a in ARCHS}
    assert len(rows) == len(seen)
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] > 0, r


def test_no_spills_and_shared_memory_fits(aot_report):
    proc, rows = aot_report
    spilled = [r for r in rows if r["spills"] != 0]
    assert not spilled, f"register spills at the production configs: {spilled}"
    over = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not over, f"shared memory over the per-block limit: {over}"
    assert proc.returncode == 0, f"aot --strict failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
