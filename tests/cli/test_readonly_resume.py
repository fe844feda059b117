"""``--resume`` of a run whose folder (or blocks folder) has become read-only: one line naming --out and the
folder, exit code 1, no traceback, nothing on disk changed.

Root writes anywhere, so as root the commands run with CAP_DAC_OVERRIDE dropped (``setpriv``): permissions then
apply to root as to anyone."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from deepforcing_kernels.cli import main

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")] if p))


def _prefix():
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: read-only folders do not stop root")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


GEN = ["generate", "--model", "tiny", "--no-progress", "--policy", "sliding"]


def _gen(*args, prefix=()):
    cmd = [*prefix, sys.executable, "-m", "deepforcing_kernels", *GEN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read())
            .hexdigest() for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("frozen", ["folder", "blocks"])
def test_resume_into_a_read_only_folder_is_one_line(tmp_path, frozen):
    prefix = _prefix()
    run = tmp_path / "run"
    run.mkdir()
    out = run / "o.pt"
    assert main(GEN + ["--frames", "6", "--out", str(out)]) == 0  # in process: only the resume drops capabilities
    locked = run if frozen == "folder" else run / "o.pt.d"
    before = _snapshot(run)
    os.chmod(locked, 0o555)
    try:
        res = _gen("--frames", "12", "--out", str(out), "--resume", prefix=prefix)
    finally:
        os.chmod(locked, 0o755)
    err = res.stderr.strip()
    assert res.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("deepforcing generate: error: --out ") and str(locked.name) in err and "Permission" in err
    assert _snapshot(run) == before
