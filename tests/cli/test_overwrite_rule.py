"""The one overwrite rule (deepforcing_kernels.runio.claims): every file a run may write is checked before any is
written; a refused command leaves every pre-existing file byte-identical; --force replaces them all."""
import os
import random

import pytest

from deepforcing_kernels.cli import main
from deepforcing_kernels.runio.claims import OutputLock, RunError, check_claims, latents_claims, video_claims

GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--frames", "3"]


def _snapshot(folder):
    return {p: open(os.path.join(dp, p), "rb").read() for dp, _, fs in os.walk(folder) for p in fs}


def test_claims_list_every_companion(tmp_path):
    out = tmp_path / "o.mp4"
    names = ["o_00001.mp4", "o.partial.mp4", "o_00002.partial.mp4", "o.mp4.state.pt"]
    unrelated = ["o_1.mp4", "oo_00001.mp4", "o_00001.mp4.txt", ".o.mp4.lock"]
    for n in names + unrelated:
        (tmp_path / n).write_bytes(b"x")
    assert sorted(p.name for p in video_claims(out)) == sorted(names)
    with pytest.raises(RunError, match="exists .*pass --force"):
        check_claims(video_claims(out), force=False)
    assert check_claims(video_claims(out), force=False, own=video_claims(out)) == []
    (tmp_path / "r.pt.d").mkdir()
    (tmp_path / "r.pt.d" / "state.pt").write_bytes(b"y")
    assert [p.name for p in latents_claims(tmp_path / "r.pt")] == ["state.pt"]


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    with OutputLock(tmp_path / "o.mp4"):
        with pytest.raises(RunError, match="being written by another process"):
            OutputLock(tmp_path / "o.mp4").__enter__()
    with OutputLock(tmp_path / "o.mp4"):  # released: free again
        pass
    assert not (tmp_path / ".o.mp4.lock").exists()


@pytest.mark.parametrize("seed", range(6))
def test_refused_commands_leave_companions_byte_identical(tmp_path, capsys, seed):
    """Random pre-existing names a run could write; the command is refused (exit 1, one line naming a file) and
    every file is unchanged; with --force the run succeeds and none of the old companions survives beside it."""
    rng = random.Random(seed)
    mp4 = rng.random() < 0.5
    out = tmp_path / ("o.mp4" if mp4 else "o.pt")
    pool = (["o_00000.mp4", "o_00001.mp4", "o_00007.mp4", "o.partial.mp4", "o_00000.partial.mp4",
             "o.mp4.state.pt"] if mp4 else ["o.pt.d/state.pt", "o.pt.d/latents-00000000.pt", "o.pt.d/notes.txt"])
    for n in rng.sample(pool, rng.randint(1, len(pool))):
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(os.urandom(rng.randint(1, 64)))
    before = _snapshot(tmp_path)
    argv = GEN + ["--out", str(out)] + (["--prompt", "a fox", "--segment-frames", "8"] if mp4 else [])
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--force" in err[0], err
    assert _snapshot(tmp_path) == before
    assert main(argv + ["--force"]) == 0
    after = _snapshot(tmp_path)
    assert all(after.get(n) != b for n, b in before.items()), "an old companion survived a forced run"
