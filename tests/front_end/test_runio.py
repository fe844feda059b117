"""The run store (deepforcing_kernels.runio): atomic writes that honour the umask, stale temporaries, the lock,
the background state writer, and load_run over both on-disk layouts (and their damage)."""
import os
import stat

import pytest
import torch

import deepforcing_kernels.runio as runio
from deepforcing_kernels.runio import RUN_BLOCK_FORMAT, STATE_NAME, RunError, RunStore, atomic_save, load_run, parts_dir


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_save_honours_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        p = str(tmp_path / "x.pt")
        n = atomic_save({"a": torch.arange(3)}, p)
    finally:
        os.umask(old)
    assert _mode(p) == 0o666 & ~umask  # not mkstemp's 0600
    assert n == os.path.getsize(p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.arange(3))
    assert os.listdir(tmp_path) == ["x.pt"]


def test_atomic_save_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = str(tmp_path / "x.pt")
    atomic_save({"v": 1}, p)

    def broken(obj, f, *a, **k):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runio.torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"v": 2}, p)
    monkeypatch.undo()
    assert torch.load(p, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_stale_temporaries_of_the_same_run_are_removed(tmp_path):
    out = str(tmp_path / "run.pt")
    store = RunStore(out)
    os.makedirs(store.dir)
    mine = [tmp_path / ".tmp-run.pt-dead", os.path.join(store.dir, ".tmp-state.pt-beef"),
            os.path.join(store.dir, ".tmp-latents-00000003.pt-0000")]
    others = [tmp_path / ".tmp-other.pt-dead", tmp_path / "run.pt.txt"]
    for p in mine + others:
        open(p, "wb").close()
    removed = store.clean_temporaries()
    assert sorted(map(str, removed)) == sorted(map(str, mine))
    assert all(os.path.exists(p) for p in others)


def test_a_second_writer_is_refused(tmp_path):
    out = str(tmp_path / "run.pt")
    a, b = RunStore(out), RunStore(out)
    a.lock()
    try:
        with pytest.raises(RunError, match="another process"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def _write_run(out, blocks, batch=1, bf=3, complete=True, state_at=None, frames=None):
    store = RunStore(out)
    store.lock()
    store.write_manifest({"seed": 0}, frames=frames or bf * len(blocks), block_frames=bf, batch_size=batch,
                         frames_done=bf * len(blocks), complete=complete)
    for i, b in enumerate(blocks):
        store.write_block(i * bf, b)
    if state_at is not None:
        saver = store.state_saver()
        saver.save(state_at, lambda: {"frames_done": state_at, "x": torch.ones(4)})
        saver.close()
    store.unlock()
    return store


@pytest.mark.parametrize("batch", [1, 2])
def test_load_run_reads_the_block_layout(batch, tmp_path):
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(batch, 3, 4, 2, 2, generator=g) for _ in range(4)]
    out = str(tmp_path / "run.pt")
    store = _write_run(out, blocks, batch=batch, state_at=6)
    run = load_run(out)
    want = torch.cat(blocks, dim=1)
    assert torch.equal(run["latents"], want[0] if batch == 1 else want)
    assert run["frames_done"] == 12 and run["complete"] and run["layout"] == "blocks"
    assert run["state_frames"] == 6 and "state" not in run
    assert load_run(out, with_state=True)["state"]["x"].tolist() == [1.0] * 4
    # every byte written was counted; each file is its own torch.load(weights_only=True)
    total = sum(os.path.getsize(os.path.join(store.dir, f)) for f in os.listdir(store.dir)) + os.path.getsize(out)
    assert store.bytes_written == total
    for f in os.listdir(store.dir):
        torch.load(os.path.join(store.dir, f), weights_only=True)


def test_load_run_reads_a_single_file_run_of_earlier_versions(tmp_path):
    out = str(tmp_path / "old.pt")
    lat = torch.randn(6, 4, 2, 2)
    torch.save({"latents": lat, "settings": {"batch_size": 1, "frames": 12}, "frames_done": 6, "complete": False,
                "state": {"frames_done": 6}}, out)
    run = load_run(out)
    assert torch.equal(run["latents"], lat) and run["layout"] == "single-file" and run["frames_done"] == 6
    assert run["frames"] == 12 and not run["complete"] and run["state_frames"] == 6


def _damage(out, how):
    d = parts_dir(out)
    if how == "gap":
        os.unlink(os.path.join(d, "latents-00000003.pt"))
        return "latents-00000003.pt"
    if how == "wrong start":
        p = os.path.join(d, "latents-00000006.pt")
        torch.save({"format": RUN_BLOCK_FORMAT, "start_frame": 3, "latents": torch.zeros(1, 3, 4, 2, 2)}, p)
        return p
    if how == "nan block":
        p = os.path.join(d, "latents-00000006.pt")
        torch.save({"format": RUN_BLOCK_FORMAT, "start_frame": 6, "latents": torch.full((1, 3, 4, 2, 2), float("nan"))},
                   p)
        return p
    if how == "other width":
        p = os.path.join(d, "latents-00000006.pt")
        torch.save({"format": RUN_BLOCK_FORMAT, "start_frame": 6, "latents": torch.zeros(1, 3, 4, 2, 3)}, p)
        return p
    if how == "truncated block":
        p = os.path.join(d, "latents-00000000.pt")
        with open(p, "r+b") as f:
            f.truncate(100)
        return p
    if how == "complete but short":
        m = torch.load(out, weights_only=True)
        m["frames"] = 30
        torch.save(m, out)
        return out
    if how == "state beyond latents":
        p = os.path.join(d, STATE_NAME)
        torch.save({"format": runio.RUN_STATE_FORMAT, "frames_done": 15, "rollout": {"frames_done": 15}}, p)
        return p
    if how == "manifest batch 0":
        m = torch.load(out, weights_only=True)
        m["batch_size"] = 0
        torch.save(m, out)
        return out
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["gap", "wrong start", "nan block", "other width", "truncated block",
                                 "complete but short", "state beyond latents", "manifest batch 0"])
def test_load_run_names_the_damaged_file(how, tmp_path):
    out = str(tmp_path / "run.pt")
    _write_run(out, [torch.randn(1, 3, 4, 2, 2) for _ in range(3)], state_at=3)
    culprit = _damage(out, how)
    with pytest.raises(RunError) as e:
        load_run(out)
    msg = str(e.value)
    assert os.path.basename(culprit) in msg and "\n" not in msg


@pytest.mark.parametrize("how", ["frames_done", "state frames_done", "batch"])
def test_load_run_refuses_a_damaged_single_file(how, tmp_path):
    out = str(tmp_path / "old.pt")
    d = {"latents": torch.zeros(6, 4, 2, 2), "settings": {"batch_size": 1}, "frames_done": 6,
         "state": {"frames_done": 6}}
    if how == "frames_done":
        d["frames_done"] = 15  # 6 latent frames labelled 15
    elif how == "state frames_done":
        d["state"]["frames_done"] = 15
    else:
        d["settings"]["batch_size"] = 2
    torch.save(d, out)
    with pytest.raises(RunError, match="old.pt"):
        load_run(out)


def test_background_state_write_and_its_failure(tmp_path):
    store = RunStore(str(tmp_path / "run.pt"))
    store.lock()
    saver = store.state_saver()
    big = torch.randn(1 << 18)
    saver.save(3, lambda: {"frames_done": 3, "t": big})
    saver.save(6, lambda: {"frames_done": 6, "t": big + 1})  # waits for the first, then writes the second
    saver.close()
    st = torch.load(saver.path, weights_only=True)
    assert st["frames_done"] == 6 and torch.equal(st["rollout"]["t"], big + 1)
    assert saver.writes == 2 and saver.bytes_written > 2 * big.numel() * 4
    # a write that fails in the background is raised by the next call, as OSError naming the file
    saver.path = str(tmp_path / "no-such-dir" / STATE_NAME)
    saver.save(9, lambda: {"frames_done": 9})
    with pytest.raises(OSError, match="no-such-dir"):
        saver.close()
    store.unlock()


def test_remove_leaves_foreign_files(tmp_path):
    out = str(tmp_path / "run.pt")
    store = _write_run(out, [torch.zeros(1, 3, 4, 2, 2)], state_at=3)
    keep = os.path.join(store.dir, "notes.txt")
    open(keep, "w").close()
    store.remove()
    assert not os.path.exists(out) and os.listdir(store.dir) == ["notes.txt"]


def test_save_interval_keeps_the_snapshot_under_its_share():
    from deepforcing_kernels.commands.generate import save_interval

    assert save_interval(60.0, 0.02, 0.5) == 60.0  # 0.5 s every 60 s is under 2 %
    assert save_interval(60.0, 0.02, 3.0) == pytest.approx(150.0)  # stretched: 3 s per 150 s = 2 %
    assert save_interval(60.0, 0.0, 30.0) == 60.0  # never stretched
    assert save_interval(0.0, 0.02, 5.0) == 0.0  # 0 = after every block, as asked
