"""Ahead-of-time compile of every production Triton variant for sm_80 and sm_90 (no GPU needed).

Runs ``python -m deepforcing_kernels.triton.aot --arch 80 90 --json --strict`` in a subprocess with
TRITON_INTERPRET=0 (this session may have the interpreter on, and the interpreter's kernels cannot be compiled),
then checks the report: every variant compiled, zero spills, shared memory within the arch limit, and the PTX
check: the arch's tensor-core instruction present in every variant (``mma.sync`` on sm_80, ``wgmma.mma_async`` on
sm_90) and no local memory. The configs compiled are the ones the launchers read (``configs.fwd_config`` /
``configs.mass_config``), not a copy.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from triton_interp import interpreter_rounds_bf16  # noqa: E402,F401  (first: triton under the interpreter window)

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.triton

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
EXPECTED = {f"{op}_{dt}_{mode}" for op in ("fwd", "mass") for dt in ("fp16", "bf16")
            for mode in ("none", "sink", "perkey", "sink_bias")}  # sink_bias: key_bias with a re-phased sink


@functools.lru_cache(maxsize=None)
def _aot_command() -> subprocess.CompletedProcess:
    """The one run of the command in this session. Cached here, not only in the module fixture: pytest tears a
    module fixture down whenever the next test on the worker is from another module, and under xdist the
    module's tests have come interleaved with others, so the fixture was built twice (56 s + 39 s)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.run([sys.executable, "-m", "deepforcing_kernels.triton.aot", "--arch", *map(str, ARCHS),
                           "--json", "--strict"], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")  # module-scoped: tests/conftest.py then keeps the module's tests on one worker
def aot_report():
    proc = _aot_command()
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
        assert set(row) == {"kernel", "arch", "registers", "spills", "shared_bytes", "tensor_core_op",
                            "tensor_core_count", "local_memory"}
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


def test_ptx_tensor_cores_and_no_local_memory(aot_report):
    proc, rows = aot_report
    for r in rows:
        assert r["tensor_core_op"] == {80: "mma", 90: "wgmma"}[r["arch"]], r
        assert r["tensor_core_count"] > 0, f"{r['kernel']} sm_{r['arch']}: no {r['tensor_core_op']} in the PTX"
        assert r["local_memory"] == 0, f"{r['kernel']} sm_{r['arch']}: local memory in the PTX"


def test_ptx_check_parses_what_it_claims():
    from deepforcing_kernels.triton.aot import ptx_check

    ptx = "\n".join(["\t.local .align 4 .b8 \t__local_depot0[28];", "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16",
                     "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", "\tst.local.u32 [%rd1], %r2;",
                     "\t// ld.local in a comment does not count", "\tld.global.v4.b32 {%r1}, [%rd2];"])
    assert ptx_check(ptx, 80) == ("mma", 1, 2)
    assert ptx_check(ptx, 90) == ("wgmma", 1, 2)
    assert ptx_check("\tld.global.b32 %r1, [%rd1];", 90) == ("wgmma", 0, 0)


def test_launchers_read_the_tables():
    from deepforcing_kernels.triton import attention, configs, mass

    assert attention.fwd_config is configs.fwd_config and mass.mass_config is configs.mass_config
    for arch in (80, 90):
        for mode in configs.MODES:
            cfg, reason = configs.lookup("fwd", 128, torch.bfloat16, arch, mode)
            assert cfg == configs.fwd_config(128, torch.bfloat16, arch, mode) and reason
