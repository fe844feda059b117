"""`deepforcing generate --prompt ... --out run.mp4`: the command line of the video front end."""
import os
import signal
import subprocess
import sys
import time

import pytest

av = pytest.importorskip("av")

from deepforcing_kernels.cli import main  # noqa: E402

GEN = ["generate", "--model", "tiny", "--no-progress"]


def _frames(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for _ in c.decode(s)), s.width, s.height


def test_prompt_to_mp4_has_every_frame(tmp_path):
    out = tmp_path / "fox.mp4"
    assert main(GEN + ["--prompt", "a red fox", "--frames", "12", "--out", str(out)]) == 0
    assert _frames(out) == (1 + 4 * 11, 64, 64)
    assert not os.path.exists(str(out) + ".state.pt")  # complete: nothing left to resume


def test_prompt_file_one_video_each_and_switches(tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red fox\n\n# a comment\na blue whale\n")
    out = tmp_path / "p.mp4"
    assert main(GEN + ["--prompt-file", str(pf), "--frames", "6", "--out", str(out)]) == 0
    assert [_frames(tmp_path / f"p_{i:03d}.mp4")[0] for i in range(2)] == [21, 21]
    seg = tmp_path / "s.mp4"
    assert main(GEN + ["--prompt", "a", "--switch", "6:b", "--recache", "--frames", "12", "--segment-frames", "20",
                       "--out", str(seg)]) == 0
    assert [_frames(tmp_path / f"s_{i:05d}.mp4")[0] for i in range(3)] == [20, 20, 5]


def test_image_to_video(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 90, 3)) * 255).astype("uint8")).save(img)
    out = tmp_path / "i2v.mp4"
    assert main(GEN + ["--prompt", "a", "--image", str(img), "--frames", "7", "--out", str(out)]) == 0
    assert _frames(out) == (1 + 4 * 6, 64, 64)


@pytest.mark.parametrize("args,culprit", [
    (["--prompt-file", "{d}/empty.txt"], "--prompt-file"),
    (["--prompt-file", "{d}/missing.txt"], "--prompt-file"),
    (["--weights", "{d}/nowhere"], "--weights"),
    (["--weights", "{d}/emptydir"], "emptydir"),
    (["--image", "{d}/bad.png"], "bad.png"),
    (["--image", "{d}/missing.png"], "--image"),
    (["--switch", "4:b"], "frame 4"),
    (["--switch", "nonsense"], "--switch"),
    (["--out", "{d}/ro/x.mp4"], "ro"),
    (["--out", "{d}/x.mov"], "--out"),
    (["--model", "wan_1_3b"], "--weights"),
    (["--text-embeds", "{d}/t.pt"], "--text-embeds"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, args, culprit):
    d = str(tmp_path)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    args = [a.format(d=d) for a in args]
    if "--prompt-file" not in args:
        args = ["--prompt", "a"] + args
    if not any(a.startswith("--out") for a in args):
        args += ["--out", f"{d}/out.mp4"]
    if os.geteuid() == 0 and culprit == "ro":
        pytest.skip("root writes into read-only folders")
    try:
        rc = main(GEN + ["--frames", "6"] + args)
    except SystemExit as e:  # an argparse error: the console script exits with its code
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 1 and culprit in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(f"{d}/out.mp4")  # nothing written as if complete


FRAMES = 60


def test_sigint_leaves_a_playable_file_and_resume_completes(tmp_path):
    # 60 frames: the run saves its state after every block (--save-every-s 0), so the signal lands half a second
    # after the first block's state, with some 50 frames still to go (the tiny model makes ~10-20 frames a second
    # here); the resume in this process then makes the rest
    out = tmp_path / "long.mp4"
    cmd = [sys.executable, "-m", "deepforcing_kernels"] + GEN + ["--prompt", "a", "--frames", str(FRAMES), "--out",
                                                                 str(out), "--save-every-s", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = str(out) + ".state.pt"
    t0 = time.time()
    while not os.path.exists(state) and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 130 and "--resume" in err
    partial = tmp_path / "long.partial.mp4"
    assert partial.exists() and not out.exists()  # what was written plays, and is not named as complete
    n, w, h = _frames(partial)
    assert n > 0 and (w, h) == (64, 64)
    assert main(GEN + ["--prompt", "a", "--frames", str(FRAMES), "--out", str(out), "--resume"]) == 0
    assert _frames(out) == (1 + 4 * (FRAMES - 1), 64, 64) and not os.path.exists(state)
