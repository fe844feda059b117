"""Steering a running stream: Rollout.add_switch, VideoRun.switch / stop and LiveStream (switch at the next block
boundary, pause / resume / stop between blocks, the cache picture)."""
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")

from deepforcing_kernels.driver import generate  # noqa: E402
from deepforcing_kernels.pipeline import VideoPipeline  # noqa: E402
from deepforcing_kernels.presets import make_policy  # noqa: E402
from deepforcing_kernels.steering import LiveStream, cache_picture  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LAT = (4, 4)


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.tiny(0, latent_size=LAT)


def _frames(chunks):
    return torch.cat([c.frames for c in chunks], 1)


def _count(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


# ---------------------------------------------------------------------------------------------- the driver
@pytest.mark.parametrize("recache", [False, True])
def test_add_switch_equals_the_scheduled_switch_and_keeps_the_past(pipe, recache):
    """A switch added between blocks is the scheduled switch at that frame, bit for bit; the blocks before it are
    an unswitched run's."""
    a, b = pipe.encode_prompts(["a red fox"]), pipe.encode_prompts(["a blue whale"])
    kw = dict(num_frames=15, policy=make_policy("deep_forcing"), seed=4, progress=False, latent_size=LAT)
    plain = generate(pipe.model, a, **kw).run()
    sched = generate(pipe.model, None, text_schedule=[(0, a), (6, b)], recache=recache, **kw).run()
    live = generate(pipe.model, a, steerable=True, **kw)
    blocks = [next(live), next(live)]
    assert live.add_switch(b, recache=recache) == 6
    blocks += list(live)
    got = torch.cat(blocks, 1)
    assert torch.equal(got[:, :6], plain[:, :6])
    assert torch.equal(got, sched)
    assert not torch.equal(got[:, 6:], plain[:, 6:])
    assert live.state_dict()["settings"]["recache_frames"] == ([6] if recache else [])


def test_add_switch_bad_input_and_replacement(pipe):
    a, b, c = (pipe.encode_prompts([t]) for t in ("a", "b", "c"))
    kw = dict(num_frames=9, policy=make_policy("deep_forcing"), seed=0, progress=False, latent_size=LAT)
    r = generate(pipe.model, a, **kw)
    next(r)
    with pytest.raises(ValueError, match="steerable=True"):
        r.add_switch(b, recache=True)  # its clean latents were not kept
    with pytest.raises(ValueError, match="width"):
        r.add_switch(torch.zeros(1, 4, 7))
    with pytest.raises(ValueError, match="NaN"):
        r.add_switch(torch.full_like(b, float("nan")))
    r.add_switch(b)
    r.add_switch(c)  # before the next block: replaces the switch to b
    rest = torch.cat(list(r), 1)
    want = generate(pipe.model, None, text_schedule=[(0, a), (3, c)], **kw).run()
    assert torch.equal(rest, want[:, 3:])
    with pytest.raises(ValueError, match="finished"):
        r.add_switch(b)


def test_a_live_switched_state_resumes_with_the_same_schedule(pipe):
    a, b = pipe.encode_prompts(["a"]), pipe.encode_prompts(["b"])
    kw = dict(num_frames=12, policy=make_policy("deep_forcing"), seed=2, progress=False, latent_size=LAT)
    r = generate(pipe.model, a, steerable=True, **kw)
    next(r)
    r.add_switch(b, recache=True)
    next(r)
    state = r.state_dict()
    rest = torch.cat(list(r), 1)
    again = generate(pipe.model, None, text_schedule=[(0, a), (3, b)], recache=True, steerable=True,
                     resume_from=state, **kw)
    assert torch.equal(torch.cat(list(again), 1), rest)
    with pytest.raises(ValueError, match="recache"):  # the same switches without the re-cache: refused
        generate(pipe.model, None, text_schedule=[(0, a), (3, b)], steerable=True, resume_from=state, **kw)


# ---------------------------------------------------------------------------------------------- LiveStream
def test_live_stream_frames_before_a_switch_equal_an_unswitched_run(pipe, tmp_path):
    plain = list(pipe.frames("a red fox", 15, seed=1, progress=False))
    live = LiveStream(pipe, "a red fox", 15, seed=1, path=tmp_path / "live.mp4")
    got = []
    for block in live:
        got.append(block)
        if block.latent_end == 6:
            live.switch("a blue whale", recache=True)
    assert [b.switched for b in got] == [None, None, ("a blue whale", True), None, None]
    assert [b.prompt for b in got][1:3] == ["a red fox", "a blue whale"]
    assert all(torch.equal(g.frames, p.frames) for g, p in zip(got[:2], plain[:2]))
    assert not torch.equal(got[2].frames, plain[2].frames)
    sched = list(pipe.frames("a red fox", 15, seed=1, switches=[(6, "a blue whale")], recache=True,
                             progress=False))
    assert torch.equal(_frames(got), _frames(sched))  # a live switch is the scheduled one
    assert live.state == "done" and live.schedule() == [(0, "a red fox", False), (6, "a blue whale", True)]
    assert _count(tmp_path / "live.mp4") == 1 + 4 * 14
    with pytest.raises(ValueError, match="done"):
        live.switch("late")


def test_live_stream_pause_resume_stop_between_blocks(pipe, tmp_path):
    path = tmp_path / "s.mp4"
    live = LiveStream(pipe, "a red fox", 60, seed=0, path=path)
    seen, paused_at = [], threading.Event()

    def on_block(block):
        seen.append(block)
        if len(seen) == 2:
            live.pause()
            paused_at.set()

    ended = threading.Event()
    live.start(on_block, lambda s: ended.set())
    assert paused_at.wait(30)
    time.sleep(0.3)  # paused: no block runs however long we wait
    assert len(seen) == 2 and live.state == "paused" and live.frames_done == 6
    live.resume()
    while len(seen) < 4:
        time.sleep(0.01)
    live.stop()
    assert ended.wait(30) and live.wait(5)
    assert live.state == "stopped" and 12 <= live.frames_done < 60 and live.frames_done % 3 == 0
    assert live.paths == [path]  # the final name: a playable file of the frames made
    n = _count(path)
    assert n == 1 + 4 * (live.frames_done - 1) == seen[-1].frame_end
    assert not list(tmp_path.glob("*partial*"))


def test_stop_while_paused_and_bad_input(pipe, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        LiveStream(pipe, "  ", 9, path=tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="num_frames"):
        LiveStream(pipe, "a", 10, path=tmp_path / "x.mp4")  # not whole blocks
    assert not list(tmp_path.iterdir())  # nothing written for refused input
    live = LiveStream(pipe, "a", 9, path=tmp_path / "p.mp4")
    next(live)
    with pytest.raises(ValueError, match="empty"):
        live.switch("")
    live.pause()
    t = threading.Thread(target=lambda: list(live))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # held by the pause
    live.stop()
    t.join(10)
    assert not t.is_alive() and live.state == "stopped" and _count(tmp_path / "p.mp4") == 9


def test_cache_picture_names_each_slot_kind_frame_and_position(pipe, tmp_path):
    live = LiveStream(pipe, "a", 33, seed=0, path=tmp_path / "c.mp4")
    pics = [b.cache for b in live]
    pic, lay = pics[-1], live.rollout.cache.layers[0]
    n = pic["tokens_per_frame"]
    assert n == live.rollout.tokens_per_frame and len(pic["slots"]) * n == lay.frames().shape[1]
    kinds = [s["kind"] for s in pic["slots"]]
    p = live.rollout.policy
    assert kinds == ["sink"] * p.sink_frames + ["topc"] * p.topc_frames + ["recent"] * (len(kinds) - p.sink_frames -
                                                                                    p.topc_frames)
    sink = pic["slots"][:p.sink_frames]
    assert [s["frames"] for s in sink] == [[f] for f in range(p.sink_frames)]
    shift = int(lay.shifts()[0, 0])
    assert shift > 0 and [s["positions"] for s in sink] == [[f + shift] for f in range(p.sink_frames)]
    recent = pic["slots"][-1]
    assert recent["frames"] == [32] and recent["positions"] == [32]
    topc = [s for s in pic["slots"] if s["kind"] == "topc"]
    first_recent = min(f for s in pic["slots"] if s["kind"] == "recent" for f in s["frames"])
    assert topc and all(p.sink_frames <= min(s["frames"]) and max(s["frames"]) < first_recent for s in topc)
    assert cache_picture(live.rollout) == pic


@pytest.mark.parametrize("segment_frames", [None, 10])
def test_write_ahead_writes_the_same_files_and_stop_drains_it(pipe, tmp_path, segment_frames):
    names = {}
    for ahead in (False, True):
        d = tmp_path / str(ahead)
        d.mkdir()
        run = pipe.open(d / "v.mp4", "a red fox", 15, seed=0, progress=False, resumable=False,
                        segment_frames=segment_frames, write_ahead=ahead)
        for chunk in run:
            if chunk.latent_end == 9:
                run.switch("a blue whale")
            if chunk.latent_end == 12:
                run.stop()  # the writer thread's blocks are written first
        names[ahead] = {p.name: p.read_bytes() for p in d.iterdir()}
    assert names[True] == names[False] and len(names[True]) == (1 if segment_frames is None else 5)
    assert sum(_count(tmp_path / "True" / n) for n in names[True]) == 1 + 4 * 11


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_write_ahead_writer_thread_runs_below_the_caller(pipe, tmp_path):
    """The writer thread is lowered by WRITER_NICE; the thread that generates keeps its priority."""
    import os

    from deepforcing_kernels.runio import host

    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    run = pipe.open(tmp_path / "v.mp4", "a red fox", 6, seed=0, progress=False, resumable=False, write_ahead=True)
    with run:
        seen = run._bg.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        for _ in run:
            pass
    assert seen == min(19, me + host.WRITER_NICE) and seen > me
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
