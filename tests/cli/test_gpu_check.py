"""``deepforcing gpu-check --dry-run``: every step at tiny sizes on CPU (Triton under the interpreter); the JSON has
every field of ``docs/gpu_check_schema.md`` and the markdown summary is written. Also: the command's one-line
errors (no GPU without --dry-run, --out a file)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# no triton import here: a module collected before the interpreter tests must not import triton outside the
# interpreter window of tests/triton_interp.py (the command runs in subprocesses)
if importlib.util.find_spec("triton") is None:
    pytest.skip("gpu-check needs the triton package", allow_module_level=True)

ENV_KEYS = {"python", "torch", "triton", "cuda_runtime", "platform", "device", "gpu_name", "capability",
            "memory_bytes", "driver", "clocks_mhz"}
CASE_KEYS = {"case", "dtype", "mass", "shape", "variant", "errors", "error", "wall_s", "ok"}
ROLLOUT_KEYS = {"policy", "dtype", "blocks", "blocks_planned", "passes_per_block", "tokens_per_frame",
                "max_abs_diff", "tol", "frames_equal", "ok"}
OP_ROW_KEYS = {"case", "kv_frames", "Lq", "Lk", "impl", "ms", "tflops", "ratio_to_triton", "error"}
MODEL_ROW_KEYS = {"policy", "compile", "blocks", "per_block_s", "per_block_s_median", "fps", "fps_with_vae",
                  "peak_memory_bytes", "error"}


def _run(args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the command sets it itself for --dry-run
    return subprocess.run([sys.executable, "-m", "deepforcing_kernels", "gpu-check", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(["--dry-run", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "gpu_check.json") as f:
        result = json.load(f)
    return proc, result, (out / "gpu_check.md").read_text()


def test_every_top_level_field(dry_run):
    _, r, _ = dry_run
    assert set(r) == {"schema", "mode", "env", "correctness", "op_timing", "model", "budget_s", "section_wall_s",
                      "wall_s"}
    assert r["schema"] == "deepforcing_kernels.gpu_check/1" and r["mode"] == "dry-run"
    assert set(r["env"]) == ENV_KEYS and r["env"]["device"] == "cpu"
    assert set(r["section_wall_s"]) == {"correctness", "op_timing", "model"}
    assert r["wall_s"] > 0


def test_correctness_section(dry_run):
    _, r, _ = dry_run
    c = r["correctness"]
    assert c["error"] is None, c["error"]
    assert set(c) == {"cases", "rollout", "truncated", "ok", "error"}
    assert not c["truncated"]
    variants = {(x["variant"], x["dtype"], x["mass"]) for x in c["cases"]}
    for v in ("none", "sink", "perkey"):  # every Triton variant, both 16-bit dtypes, with and without the mass
        for dt in ("float16", "bfloat16"):
            assert (v, dt, False) in variants and (v, dt, True) in variants
    for x in c["cases"]:
        assert set(x) == CASE_KEYS and x["error"] is None
        assert set(x["errors"]) == ({"out", "lse", "mass"} if x["mass"] else {"out", "lse"})
        for e in x["errors"].values():
            assert set(e) == {"err", "err_torch", "budget"} and e["err"] >= 0
        assert x["ok"], x
    assert any(x["case"].startswith("production") for x in c["cases"])
    ro = c["rollout"]
    assert set(ro) == ROLLOUT_KEYS
    assert ro["blocks"] == ro["blocks_planned"] >= 8 and ro["frames_equal"] and ro["ok"]
    assert c["ok"]


def test_op_timing_section(dry_run):
    _, r, _ = dry_run
    o = r["op_timing"]
    assert o["error"] is None, o["error"]
    assert set(o) == {"shape", "flops_rule", "peers", "rows", "truncated", "error"}
    assert {"sdpa_flash", "sdpa_cudnn"} <= set(o["peers"])
    cases = {(x["case"], x["impl"]) for x in o["rows"]}
    for case in ("plain", "rephased", "rephased_mass"):
        assert (case, "triton") in cases
    assert ("plain", "sdpa_flash") in cases and ("rephased", "sdpa_cudnn") in cases
    for x in o["rows"]:
        assert set(x) == OP_ROW_KEYS
        assert x["error"] is None and x["ms"] > 0 and x["tflops"] > 0
        if x["impl"] == "triton":
            assert x["ratio_to_triton"] == 1.0


def test_model_section(dry_run):
    _, r, _ = dry_run
    m = r["model"]
    assert m["error"] is None, m["error"]
    assert set(m) == {"model", "dtype", "latent_size", "compile_backend", "tokens_per_frame", "passes_per_block",
                      "fps_rule", "vae", "rows", "truncated", "error"}
    assert "4 video frames per latent frame" in m["fps_rule"]
    assert set(m["vae"]) == {"block_s", "latent_size", "error"}
    seen = {(x["policy"], x["compile"]) for x in m["rows"]}
    assert seen == {(p, c) for p in ("sliding", "deep_forcing", "release") for c in (False, True)}
    for x in m["rows"]:
        assert set(x) == MODEL_ROW_KEYS
        assert x["error"] is None, x["error"]
        assert x["blocks"] >= 1 and x["per_block_s_median"] > 0
        assert x["fps"] == pytest.approx(12 / x["per_block_s_median"])
        if m["vae"]["block_s"] is not None:
            assert x["fps_with_vae"] < x["fps"]


def test_markdown_summary(dry_run):
    _, _, md = dry_run
    for heading in ("# gpu-check (dry-run)", "## Correctness", "## Op timing", "## Model"):
        assert heading in md


def test_needs_a_gpu_without_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = _run(["--quick", "--out", str(tmp_path)], timeout=120)
    assert proc.returncode == 1
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = _run(["--dry-run", "--out", str(f)], timeout=120)
    assert proc.returncode == 1
    assert "--out" in proc.stderr and "Traceback" not in proc.stderr
