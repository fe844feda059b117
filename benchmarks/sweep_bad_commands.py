"""Bad-command sweep (issue 26): run many bad or unlucky ``deepforcing`` command lines in one process and
check each ends cleanly: exit code 1 (a user error) or 2 (argparse usage error, the project's convention for a
malformed flag), exactly one non-empty stderr line, no traceback, no pre-existing file changed.

    python benchmarks/sweep_bad_commands.py [--json PATH] [--only N]
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--device", "cpu", "--frames", "3"]


def _hash_tree(root: str) -> Dict[str, str]:
    """sha256 of every file under root (the pre-existing files a bad command must leave alone)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def make_scratch(root: str) -> Dict[str, str]:
    """Pre-existing files the cases point at; returns named paths."""
    paths = {k: os.path.join(root, k) for k in ("afile.txt", "o.pt", "seg.mp4", "seg_00001.mp4", "run.pt",
                                                "ro", "empty_dir", "garbage.pt", "prompts.txt")}
    for k in ("afile.txt", "o.pt", "seg_00001.mp4", "run.pt", "garbage.pt"):
        with open(paths[k], "wb") as f:
            f.write(b"not a tensor file " + k.encode())
    os.makedirs(os.path.join(root, "o.pt.d"), exist_ok=True)
    with open(os.path.join(root, "o.pt.d", "part0"), "wb") as f:
        f.write(b"companion")
    os.makedirs(paths["empty_dir"], exist_ok=True)
    open(paths["prompts.txt"], "w").close()
    os.makedirs(paths["ro"], exist_ok=True)
    os.chmod(paths["ro"], 0o555)
    return paths


def cases(p: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    """(name, argv) of every case."""
    c: List[Tuple[str, List[str]]] = []
    add = lambda name, argv: c.append((name, argv))  # noqa: E731
    add("no command flag", ["--nope"])
    add("unknown command", ["frobnicate"])
    add("gen unknown flag", GEN + ["--bogus"])
    for flag in ("--policy", "--recipe", "--model", "--dtype", "--cache-dtype", "--backend", "--score",
                 "--parallel", "--device"):
        add(f"gen {flag} unknown", GEN + [flag, "nonsense_value"])
    for flag in ("--frames", "--batch-size", "--block-frames", "--seed", "--head-jitter", "--head-jitter-seed",
                 "--save-every-s", "--max-save-overhead", "--threads", "--fps", "--segment-frames", "--cut",
                 "--commit-rule", "--dist-timeout"):
        for v in ("nan", "inf", "-1", str(2 ** 64), "1e9", "abc"):
            if flag == "--save-every-s" and v in (str(2 ** 64), "1e9"):
                continue  # a huge save interval is a valid request (save only at the end), not a bad command
            add(f"gen {flag} {v}", GEN + [flag, v])
    for v in ("0 0", "-4 4", "nan 4", "1e9 1e9"):
        add(f"gen --latent-size {v}", GEN[:4] + ["--no-progress", "--device", "cpu", "--latent-size"] + v.split())
    add("gen --steps bad", GEN + ["--steps", "a,b"])
    add("gen --steps empty", GEN + ["--steps", ""])
    add("gen --first-block-steps neg", GEN + ["--first-block-steps", "-5"])
    add("gen --switch no colon", GEN + ["--switch", "hello"])
    add("gen --switch bad frame", GEN + ["--switch", "x:hello"])
    add("gen --cut beyond frames", GEN + ["--cut", "999"])
    add("gen --policy recency_forcing bad jitter", GEN + ["--policy", "recency_forcing", "--head-jitter", "nan"])
    add("gen --checkpoint missing", GEN + ["--checkpoint", "/nonexistent/x.pt"])
    add("gen --checkpoint garbage", GEN + ["--checkpoint", p["garbage.pt"]])
    add("gen --checkpoint dir", GEN + ["--checkpoint", p["empty_dir"]])
    add("gen --text-embeds missing", GEN + ["--text-embeds", "/nonexistent/e.pt"])
    add("gen --text-embeds garbage", GEN + ["--text-embeds", p["garbage.pt"]])
    add("gen --prompt-file missing", GEN + ["--prompt-file", "/nonexistent/p.txt"])
    add("gen --prompt-file empty", GEN + ["--prompt-file", p["prompts.txt"]])
    add("gen --weights missing", GEN + ["--weights", "/nonexistent/w"])
    add("gen --weights empty dir", GEN + ["--weights", p["empty_dir"], "--prompt", "a cat"])
    add("gen --image missing", GEN + ["--image", "/nonexistent/i.png"])
    add("gen --video missing", GEN + ["--video", "/nonexistent/v.mp4"])
    add("gen --out read-only dir", GEN + ["--out", os.path.join(p["ro"], "x.pt")])
    add("gen --out is a dir", GEN + ["--out", p["empty_dir"]])
    add("gen --out under a file", GEN + ["--out", os.path.join(p["afile.txt"], "x.pt")])
    add("gen --out exists", GEN + ["--out", p["o.pt"]])
    add("gen --out segments exist", GEN + ["--out", p["seg.mp4"], "--segment-frames", "1"])
    add("gen --resume garbage", GEN + ["--out", p["garbage.pt"], "--resume"])
    add("gen --resume and --force", GEN + ["--out", p["run.pt"], "--resume", "--force"])
    add("gen --ema and --no-ema", GEN + ["--ema", "--no-ema"])
    add("gen --recache without switch", GEN + ["--recache"])
    for sub in ("trace", "serve", "convert", "bench", "inspect"):
        add(f"{sub} unknown flag", [sub, "--bogus-flag"])
    add("trace --policy unknown", ["trace", "--policy", "nope"])
    add("trace --frames nan", ["trace", "--frames", "nan"])
    add("serve --port -1", ["serve", "--port", "-1"])
    add("serve --port 2**64", ["serve", "--port", str(2 ** 64)])
    add("serve --port abc", ["serve", "--port", "abc"])
    add("serve --host bad + port huge", ["serve", "--port", "70000"])
    add("convert missing folder", ["convert", "--weights", "/nonexistent/folder", "--out", "/tmp/df-none-out"])
    add("convert empty folder", ["convert", "--weights", p["empty_dir"], "--out", os.path.join(p["empty_dir"], "o")])
    add("convert missing checkpoint", ["convert", "--weights", p["empty_dir"], "--checkpoint", "/nonexistent/c.pt",
                                       "--out", os.path.join(p["empty_dir"], "o")])
    add("convert out exists", ["convert", "--weights", p["empty_dir"], "--out", p["empty_dir"]])
    add("gen --force + bad flag keeps o.pt, o.pt.d", GEN + ["--out", p["o.pt"], "--frames", "nan", "--force"])
    add("gen mp4 segments exist", GEN + ["--prompt", "a cat", "--out", p["seg.mp4"], "--segment-frames", "3"])
    add("trace --tokens-per-frame 0", ["trace", "--tokens-per-frame", "0", "--no-plot"])
    add("trace --lines 0", ["trace", "--lines", "0", "--no-plot"])
    add("trace --prefix -1", ["trace", "--prefix", "-1", "--no-plot"])
    add("trace --frames 4", ["trace", "--frames", "4", "--no-plot"])
    add("trace --plot read-only", ["trace", "--frames", "6", "--plot", os.path.join(p["ro"], "t.png")])
    add("trace --commit-rule 0", ["trace", "--commit-rule", "0", "--no-plot"])
    add("convert no args", ["convert"])
    return c


# Root ignores mode bits: cases that need a read-only folder run in a subprocess without CAP_DAC_OVERRIDE
# (as tests/cli/test_readonly_resume.py does).
NEEDS_NO_DAC = ("read-only",)


def _run_sub(argv: List[str]) -> Tuple[int, str, str]:
    import shutil
    import subprocess
    cmd = [sys.executable, "-m", "deepforcing_kernels"] + argv
    if os.geteuid() == 0 and shutil.which("setpriv"):
        cmd = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def run_case(argv: List[str], name: str = "") -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``deepforcing argv`` in process; a crash counts as exit code -1."""
    if any(k in name for k in NEEDS_NO_DAC):
        return _run_sub(argv)
    from deepforcing_kernels.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a raw crash is exactly what the sweep looks for
            import traceback
            traceback.print_exc(file=err)
            code = -1
    return code, out.getvalue(), err.getvalue()


def sweep(root: str, only: Optional[int] = None, names: Optional[List[str]] = None) -> List[dict]:
    """Run the cases (all, the first ``only`` ones, or those named) in scratch folder root; one row each."""
    paths = make_scratch(root)
    todo = cases(paths)
    if names is not None:
        todo = [t for t in todo if t[0] in names]
    if only is not None:
        todo = todo[:only]
    rows = []
    here = os.getcwd()
    os.chdir(root)  # default outputs (out/latents.pt) land in the scratch folder, never the caller's
    try:
        for name, argv in todo:
            rows.append(_one(root, name, argv))
    finally:
        os.chdir(here)
    return rows


def _one(root: str, name: str, argv: List[str]) -> dict:
    """Run one case and judge it."""
    if True:
        before = _hash_tree(root)
        code, out, err = run_case(argv, name)
        after = _hash_tree(root)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        changed = sorted(k for k in before if after.get(k) != before[k])
        problems = []
        if code not in (1, 2):
            problems.append(f"exit {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if "Traceback" in out + err:
            problems.append("traceback")
        if changed:
            problems.append("changed " + ",".join(os.path.basename(x) for x in changed))
        for k in set(after) - set(before):  # tidy new files so the next case sees the same scratch
            os.remove(k)
        return {"name": name, "argv": argv, "code": code, "stderr": lines[-1] if lines else "",
                "clean": not problems, "problems": problems}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, metavar="PATH", help="write the table as JSON")
    ap.add_argument("--only", type=int, default=None, help="run the first N cases")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="df-sweep-") as root:
        try:
            rows = sweep(root, a.only)
        finally:
            os.chmod(os.path.join(root, "ro"), 0o755)
    for r in rows:
        print(f"{'ok ' if r['clean'] else 'BAD'} {r['code']:>3} {r['name']:<45} {r['stderr'][:90]}"
              + ("" if r["clean"] else "  <- " + "; ".join(r["problems"])))
    clean = sum(r["clean"] for r in rows)
    print(f"clean {clean} / total {len(rows)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"clean": clean, "total": len(rows), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
