"""Every edge of the command line ends in one clear line naming the flag or file, exit code 1, no traceback
(issue 14, "The edges"). In process for speed; one case also through a real subprocess."""
import os
import subprocess
import sys

import pytest
import torch

import deepforcing_kernels.commands.bench as bench_cmd
from deepforcing_kernels.cli import build_parser, main
from deepforcing_kernels.models import CausalWanModel, WanConfig
from deepforcing_kernels.runio import STATE_NAME, load_run, parts_dir

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--device", "cpu"]
PLOT_HINT = 'pip install "deepforcing_kernels[plot]"'


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``deepforcing argv``, as the console script would exit."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *culprits):
    assert code == 1, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert "Traceback" not in out + err
    for c in culprits:
        assert c in lines[0], f"{c!r} not named in {lines[0]!r}"


def _read_only_dir(tmp_path):
    """A directory this process cannot write in (root ignores mode bits: then a read-only /sys, if any)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return str(d)
    try:
        probe = open("/sys/.deepforcing-probe", "w")
    except OSError:
        return "/sys"
    probe.close()
    pytest.skip("no read-only directory available (root, writable /sys)")


# ---------------------------------------------------------------------------------------------- generate --out
def _out_cases(tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("x")
    return {
        "read-only dir": ([os.path.join(_read_only_dir(tmp_path), "x.pt")], "cannot write"),
        "below a file": ([str(f / "x.pt")], "is a file"),
        "directory": ([str(tmp_path)], "is a directory"),
        "directory --force": ([str(tmp_path), "--force"], "is a directory"),
        "empty": ([""], "is empty"),
    }


@pytest.mark.parametrize("case", ["read-only dir", "below a file", "directory", "directory --force", "empty"])
def test_generate_bad_out(case, tmp_path, capsys):
    (out, *rest), words = _out_cases(tmp_path)[case]
    code, so, se = run_cli(GEN + ["--frames", "3", "--out", out] + rest, capsys)
    assert_one_line_error(code, so, se, "--out", words)


# ---------------------------------------------------------------------------------------------- generate options
OPTION_CASES = [
    ("batch 0", ["--batch-size", "0"], ["--batch-size"]),
    ("batch -1", ["--batch-size", "-1"], ["--batch-size"]),
    ("latent 0 0", ["--latent-size", "0", "0"], ["--latent-size"]),
    ("latent 7 7", ["--latent-size", "7", "7"], ["--latent-size"]),
    ("latent -2 -2", ["--latent-size", "-2", "-2"], ["--latent-size"]),
    ("device bogus", ["--device", "bogus"], ["--device", "bogus"]),
    ("device meta", ["--device", "meta"], ["--device"]),
    ("frames 4", ["--frames", "4"], ["--frames"]),
    ("frames 0", ["--frames", "0"], ["--frames"]),
    ("threads 0", ["--threads", "0"], ["--threads"]),
    ("save-every-s -1", ["--save-every-s", "-1"], ["--save-every-s"]),
    ("save-every-s nan", ["--save-every-s", "nan"], ["--save-every-s"]),
    ("max-save-overhead 1", ["--max-save-overhead", "1"], ["--max-save-overhead"]),
    ("score on sliding", ["--policy", "sliding", "--score", "mass"], ["--score"]),
    ("policy bogus", ["--policy", "bogus"], ["--policy"]),
    ("frames not an int", ["--frames", "x"], ["--frames"]),
    ("resume and force", ["--resume", "--force"], ["--resume", "--force"]),
]


@pytest.mark.parametrize("argv,culprits", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_generate_bad_options(argv, culprits, tmp_path, capsys):
    code, so, se = run_cli(GEN + ["--frames", "3", "--out", str(tmp_path / "o.pt")] + argv, capsys)
    assert_one_line_error(code, so, se, *culprits)
    assert not os.path.exists(tmp_path / "o.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_generate_cuda_without_gpu(tmp_path, capsys):
    for dev in ("cuda", "cuda:0"):
        code, so, se = run_cli(GEN + ["--frames", "3", "--out", str(tmp_path / "o.pt"), "--device", dev], capsys)
        assert_one_line_error(code, so, se, "--device", "no CUDA GPU")


def test_generate_triton_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, so, se = run_cli(GEN + ["--frames", "3", "--out", str(tmp_path / "o.pt"), "--backend", "triton"], capsys)
    assert_one_line_error(code, so, se, "--backend", "triton", "cpu")


# ---------------------------------------------------------------------------------------------- input files
def _tiny_sd(dim=None):
    cfg = WanConfig.tiny()
    if dim is not None:
        cfg = WanConfig(**{**cfg.to_dict(), "dim": dim}) if hasattr(WanConfig, "to_dict") else cfg
    m = CausalWanModel(cfg)
    return m.state_dict()


def _write_input(kind, path, flag):
    if kind == "missing":
        return
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00not a torch file at all" * 10)
    elif kind == "directory":
        path.mkdir()
    elif flag == "--text-embeds":
        shape = {"wrong width": (7, 31), "wrong rank": (1, 1, 7, 32), "rank 1": (32,), "no rows": (0, 32),
                 "too many prompts": (3, 7, 32)}[kind]
        torch.save(torch.randn(shape), path)
    elif kind == "wrong width":  # a checkpoint of another model width
        sd = {k: torch.zeros([s + 1 for s in v.shape]) for k, v in _tiny_sd().items()}
        torch.save(sd, path)
    elif kind == "wrong rank":
        sd = _tiny_sd()
        k = next(k for k in sd if k.endswith("q.weight"))
        sd[k] = sd[k][None]
        torch.save(sd, path)
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)


INPUT_CASES = [(flag, kind) for flag in ("--checkpoint", "--text-embeds")
               for kind in ("missing", "empty", "garbage", "directory", "wrong width", "wrong rank")] + \
              [("--text-embeds", k) for k in ("rank 1", "no rows", "too many prompts")] + [("--checkpoint", "a tensor")]


@pytest.mark.parametrize("flag,kind", INPUT_CASES, ids=[f"{f[2:]}-{k}" for f, k in INPUT_CASES])
def test_generate_bad_input_files(flag, kind, tmp_path, capsys):
    path = tmp_path / "input.pt"
    _write_input(kind, path, flag)
    code, so, se = run_cli(GEN + ["--frames", "3", "--out", str(tmp_path / "o.pt"), flag, str(path)], capsys)
    assert_one_line_error(code, so, se, flag, str(path))
    assert not os.path.exists(tmp_path / "o.pt")


def test_nan_text_embeds_are_blamed_on_the_text(tmp_path, capsys):
    t = torch.randn(5, 32)
    t[2, 3] = float("nan")
    path = tmp_path / "text.pt"
    torch.save({"prompt_embeds": t}, path)
    code, so, se = run_cli(GEN + ["--frames", "3", "--out", str(tmp_path / "o.pt"), "--text-embeds", str(path)],
                           capsys)
    assert_one_line_error(code, so, se, "--text-embeds", str(path), "NaN")
    assert "q, k, v" not in se


# ---------------------------------------------------------------------------------------------- --resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    out = str(d / "run.pt")
    assert main(GEN + ["--frames", "6", "--seed", "2", "--out", out, "--save-every-s", "0"]) == 0
    return out


def _copy_run(src, dst_dir):
    import shutil

    dst = os.path.join(dst_dir, "run.pt")
    shutil.copy(src, dst)
    shutil.copytree(parts_dir(src), parts_dir(dst))
    return dst


def _corrupt_run(out, how):
    d = parts_dir(out)
    if how == "manifest without settings":
        m = torch.load(out, weights_only=True)
        del m["settings"]
        torch.save(m, out)
        return out
    if how == "manifest garbage":
        with open(out, "wb") as f:
            f.write(b"garbage")
        return out
    if how == "manifest complete, blocks missing":
        m = torch.load(out, weights_only=True)
        m["frames"] = 30
        torch.save(m, out)
        return d
    if how == "a block missing in the middle":
        os.unlink(os.path.join(d, "latents-00000000.pt"))
        return "latents-00000000.pt"
    if how == "block of another shape":
        p = os.path.join(d, "latents-00000003.pt")
        b = torch.load(p, weights_only=True)
        b["latents"] = b["latents"][..., :2]
        torch.save(b, p)
        return p
    sp = os.path.join(d, STATE_NAME)
    st = torch.load(sp, weights_only=True)
    if how == "bad generator state":
        st["rollout"]["generator"] = torch.zeros(7, dtype=torch.uint8)
    elif how == "state beyond the latents":
        st["frames_done"] = st["rollout"]["frames_done"] = 15
    elif how == "state without settings":
        del st["rollout"]["settings"]
    elif how == "state of another format":
        st["format"] = "something else"
    elif how == "state frames_done not an int":
        st["frames_done"] = "6"
    torch.save(st, sp)
    return sp


RESUME_CASES = ["manifest without settings", "manifest garbage", "manifest complete, blocks missing",
                "a block missing in the middle", "block of another shape", "bad generator state",
                "state beyond the latents", "state without settings", "state of another format",
                "state frames_done not an int"]


@pytest.mark.parametrize("how", RESUME_CASES)
def test_resume_of_a_corrupt_run(how, finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, str(tmp_path))
    culprit = _corrupt_run(out, how)
    code, so, se = run_cli(GEN + ["--frames", "12", "--seed", "2", "--out", out, "--resume"], capsys)
    assert_one_line_error(code, so, se, "--resume" if False else "resume", os.path.basename(culprit))


def test_legacy_single_file_with_frames_done_not_matching_latents(tmp_path, capsys):
    """Today's bug: 6 latent frames labelled frames_done=15 were accepted (the result held 21 latents labelled 30)."""
    out = tmp_path / "old.pt"
    torch.save({"latents": torch.zeros(6, 16, 4, 4), "settings": {"model": "tiny", "seed": 2, "batch_size": 1},
                "frames_done": 15, "complete": False, "state": {"frames_done": 15}}, out)
    code, so, se = run_cli(GEN + ["--frames", "30", "--seed", "2", "--out", str(out), "--resume"], capsys)
    assert_one_line_error(code, so, se, str(out), "frames_done")


@pytest.mark.parametrize("content", ["tensor", "dict", "garbage"])
def test_resume_of_a_file_that_is_not_a_run(content, tmp_path, capsys):
    out = tmp_path / "x.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), out)
    elif content == "dict":
        torch.save({"latents": torch.zeros(3, 4, 4, 4)}, out)
    else:
        out.write_bytes(b"not a torch file")
    data = out.read_bytes()
    code, so, se = run_cli(GEN + ["--frames", "6", "--out", str(out), "--resume"], capsys)
    assert_one_line_error(code, so, se, str(out))
    assert out.read_bytes() == data


def test_explicit_default_score_resumes_a_run_saved_without_it(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, str(tmp_path))
    code, so, se = run_cli(GEN + ["--frames", "9", "--seed", "2", "--out", out, "--resume", "--score", "mass"], capsys)
    assert code == 0, se
    assert load_run(out)["frames_done"] == 9
    # a different score is a different policy: refused, naming the setting
    code, so, se = run_cli(GEN + ["--frames", "12", "--seed", "2", "--out", out, "--resume", "--score", "logits"],
                           capsys)
    assert_one_line_error(code, so, se, "score", "settings differ")


def test_policy_spellings_are_one_policy(finished_run, tmp_path, capsys):
    """The run was saved as deep_forcing (the default); --policy deep-forcing is the same policy."""
    out = _copy_run(finished_run, str(tmp_path))
    code, so, se = run_cli(GEN + ["--frames", "9", "--seed", "2", "--out", out, "--resume", "--policy", "deep-forcing"],
                           capsys)
    assert code == 0, se
    code, so, se = run_cli(GEN + ["--frames", "12", "--seed", "2", "--out", out, "--resume", "--policy",
                                  "deep_forcing_logits"], capsys)
    assert_one_line_error(code, so, se, "settings differ", "policy")


def test_settings_that_differ_are_named(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, str(tmp_path))
    code, so, se = run_cli(GEN + ["--frames", "9", "--seed", "3", "--out", out, "--resume"], capsys)
    assert_one_line_error(code, so, se, "seed", out)


def test_existing_out_without_resume_or_force(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, str(tmp_path))
    code, so, se = run_cli(GEN + ["--frames", "6", "--out", out], capsys)
    assert_one_line_error(code, so, se, "--out", "--resume", "--force")


# ---------------------------------------------------------------------------------------------- plots
def _block_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


@pytest.mark.parametrize("argv", [["trace", "--frames", "9", "--plot", "{d}/t.png"],
                                  ["demo", "--frames", "3", "--no-compare", "--out-dir", "{d}"],
                                  ["bench", "--tiny", "--plot", "{d}/b.png"]], ids=["trace", "demo", "bench"])
def test_plot_without_matplotlib_says_how_to_install_it(argv, tmp_path, capsys, monkeypatch):
    _block_matplotlib(monkeypatch)
    monkeypatch.setattr(bench_cmd, "run_bench", lambda *a, **k: pytest.fail("bench ran before checking --plot"))
    code, so, se = run_cli([a.format(d=tmp_path) for a in argv], capsys)
    assert_one_line_error(code, so, se, "matplotlib", PLOT_HINT)
    assert not os.listdir(tmp_path)


def test_trace_and_demo_without_plot_need_no_matplotlib(tmp_path, capsys, monkeypatch):
    _block_matplotlib(monkeypatch)
    code, so, se = run_cli(["trace", "--frames", "9", "--no-plot"], capsys)
    assert code == 0 and "f0=" in so
    code, so, se = run_cli(["demo", "--frames", "3", "--no-compare", "--no-plot", "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and "frames/s" in so


@pytest.mark.parametrize("where", ["below a file", "directory", "read-only", "empty"])
@pytest.mark.parametrize("cmd", ["trace", "bench"])
def test_unwritable_plot_path_fails_before_the_run(cmd, where, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    path = {"below a file": str(f / "p.png"), "directory": str(tmp_path), "empty": "",
            "read-only": os.path.join(_read_only_dir(tmp_path), "p.png")}[where]
    monkeypatch.setattr(bench_cmd, "run_bench", lambda *a, **k: pytest.fail("bench ran before checking --plot"))
    argv = ["trace", "--frames", "9", "--plot", path] if cmd == "trace" else ["bench", "--tiny", "--plot", path]
    code, so, se = run_cli(argv, capsys)
    assert_one_line_error(code, so, se, "--plot")
    assert "f0=" not in so  # nothing ran


def test_demo_out_dir_that_is_a_file_fails_before_the_rollouts(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, so, se = run_cli(["demo", "--frames", "3", "--no-compare", "--out-dir", str(f)], capsys)
    assert_one_line_error(code, so, se, "--out-dir", str(f))
    assert "frames/s" not in so


def test_extensionless_plot_path_is_written_exactly(tmp_path, capsys):
    path = str(tmp_path / "name")
    code, so, se = run_cli(["trace", "--frames", "9", "--plot", path], capsys)
    assert code == 0, se
    assert os.listdir(tmp_path) == ["name"], "wrote another path than the one given"
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path} (PNG)" in so


def test_pdf_plot_path_is_a_pdf(tmp_path, capsys):
    path = str(tmp_path / "t.pdf")
    code, so, se = run_cli(["trace", "--frames", "9", "--plot", path], capsys)
    assert code == 0, se
    with open(path, "rb") as fh:
        assert fh.read(4) == b"%PDF"


# ---------------------------------------------------------------------------------------------- trace --lines
@pytest.mark.parametrize("lines", ["0", "-5"])
def test_trace_lines_below_one(lines, capsys):
    code, so, se = run_cli(["trace", "--frames", "9", "--no-plot", "--lines", lines], capsys)
    assert_one_line_error(code, so, se, "--lines")


@pytest.mark.parametrize("lines", [1, 2, 3, 5])
def test_trace_lines_shows_that_many_blocks(lines, capsys):
    code, so, se = run_cli(["trace", "--frames", "30", "--no-plot", "--lines", str(lines)], capsys)
    assert code == 0
    shown = [line for line in so.splitlines() if "f0=" in line]
    assert len(shown) == lines
    assert "f0=  27" in shown[-1]  # the last block is always described
    assert len(set(shown)) == len(shown)  # no block twice


# ---------------------------------------------------------------------------------------------- bench
BENCH_CASES = [
    ("policies unknown", ["--policies", "sliding,nonsense"], ["--policies", "nonsense", "deep_forcing_logits"]),
    ("policies empty", ["--policies", ""], ["--policies"]),
    ("sections unknown", ["--sections", "ops,nope"], ["--sections", "nope"]),
    ("frames 0", ["--frames", "0"], ["--frames"]),
    ("frames 4", ["--frames", "4"], ["--frames"]),
    ("tokens-per-frame 0", ["--tokens-per-frame", "0"], ["--tokens-per-frame"]),
    ("backend bogus", ["--backend", "bogus"], ["--backend", "bogus"]),
    ("threads -1", ["--threads", "-1"], ["--threads"]),
    ("threads 0", ["--threads", "0"], ["--threads"]),
    ("json a directory", ["--json", "{d}"], ["--json"]),
    ("json below a file", ["--json", "{d}/afile/x.json"], ["--json"]),
]


@pytest.mark.parametrize("argv,culprits", [c[1:] for c in BENCH_CASES], ids=[c[0] for c in BENCH_CASES])
def test_bench_bad_options_fail_before_the_run(argv, culprits, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(bench_cmd, "run_bench", lambda *a, **k: pytest.fail("bench ran before checking options"))
    code, so, se = run_cli(["bench", "--tiny"] + [a.format(d=tmp_path) for a in argv], capsys)
    assert_one_line_error(code, so, se, *culprits)


def test_bench_triton_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bench_cmd, "run_bench", lambda *a, **k: pytest.fail("bench ran before checking options"))
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    code, so, se = run_cli(["bench", "--tiny", "--backend", "triton"], capsys)
    assert_one_line_error(code, so, se, "--backend", "triton")


def test_bench_help_lists_policy_names(capsys):
    from deepforcing_kernels.bench.rollout import POLICY_NAMES
    from deepforcing_kernels.presets import POLICY_NAMES as PRESET_NAMES

    assert bench_cmd.BENCH_POLICIES == POLICY_NAMES == PRESET_NAMES  # the spelled-out list stays the table's
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(POLICY_NAMES) in out


# ---------------------------------------------------------------------------------------------- help text
def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


@pytest.mark.parametrize("command", ["generate", "trace", "demo", "bench"])
def test_every_option_has_help(command):
    import argparse

    sub = _subparsers(build_parser())[command]
    missing = [a.option_strings[0] for a in sub._actions
               if a.option_strings and a.help is not argparse.SUPPRESS and not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("flag", ["--seed", "--batch-size", "--device", "--backend"])
def test_generate_help_names_the_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    line = next(line for line in help_text.splitlines() if line.strip().startswith(flag))
    idx = help_text.index(line)
    assert len(help_text[idx:idx + 400].split()) > 4  # the flag is followed by a description


# ---------------------------------------------------------------------------------------------- a real process
def test_console_exit_code_and_one_line(tmp_path):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "deepforcing_kernels", "generate", "--batch-size", "0", "--out",
                        str(tmp_path / "o.pt")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "--batch-size" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "deepforcing_kernels", "bench", "--backend", "bogus"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "--backend" in p.stderr
