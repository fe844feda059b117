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


def _flip_a_tensor_bit(path):
    """Flip one bit inside the largest tensor's storage of a saved state (the zip entry ``data/N``)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
        big = max(infos, key=lambda i: i.file_size)
        offset = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
    with open(path, "r+b") as f:
        f.seek(offset + big.file_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("route", ["pt", "mp4"])
def test_a_flipped_bit_in_a_saved_state_is_refused(tmp_path, capsys, monkeypatch, route):
    import deepforcing_kernels.driver as driver
    from deepforcing_kernels.commands.generate.common import state_path

    out = tmp_path / f"o.{route}"
    argv = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--frames", "9",
            "--out", str(out), "--save-every-s", "0"] + (["--prompt", "a fox"] if route == "mp4" else [])
    real, calls = driver.Rollout._block, []

    def interrupted(self, f0, *rest):
        calls.append(f0)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, f0, *rest)

    monkeypatch.setattr(driver.Rollout, "_block", interrupted)
    assert main(argv) == 130
    monkeypatch.setattr(driver.Rollout, "_block", real)
    st = state_path(str(out)) if route == "mp4" else str(out) + ".d/state.pt"
    _flip_a_tensor_bit(st)
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0] and st in err[0], err
