"""`deepforcing serve` over HTTP, without a browser: bad input is one message and the server keeps serving; it
binds 127.0.0.1 by default; no path from the page reaches the file system; --max-streams queues the other tabs;
a closed client stops its stream and frees its session; the frames pushed are the pipeline's; the mp4 of a run
(switches and Stop included) is the file `deepforcing generate` writes for the same choices."""
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")
pytest.importorskip("PIL")

from serve_support import LAT, Events, decode_blocks, request, start_server, wait_for  # noqa: E402
from support import sigint_default  # noqa: E402

from deepforcing_kernels.cli import build_parser, main  # noqa: E402
from deepforcing_kernels.pipeline import VideoPipeline  # noqa: E402
from deepforcing_kernels.video.writer import frames_to_uint8  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server():
    made = []

    def make(**kw):
        made.append(start_server(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close_all()


def _blocks_until_end(ev):
    blocks = []
    while True:
        k, d = ev.read()
        if k == "block":
            blocks.append(d)
        elif k == "end":
            return blocks, d


def test_bad_input_is_one_message_and_the_server_keeps_serving(server):
    srv = server()
    ev = Events(srv)
    bad = [({"prompt": "", "frames": 9}, "prompt is empty"),
           ({"prompt": "a", "frames": 10}, "multiple of 3"),
           ({"prompt": "a", "frames": 0}, "multiple of 3"),
           ({"prompt": "a", "frames": 9, "policy": "nope"}, "unknown policy"),
           ({"prompt": "a", "frames": 9, "seed": "x"}, "seed must be a whole number"),
           ({"prompt": "a", "frames": 99999}, "--max-frames"),
           ({"prompt": "a" * 5000, "frames": 9}, "characters")]
    for body, words in bad:
        status, ans = ev.post(srv, "start", **body)
        assert status == 400 and words in ans["error"] and "\n" not in ans["error"], (body, ans)
    assert request(srv, "POST", "/api/start", raw=b"{not json")[1] == {"error": "the request is not JSON"}
    assert request(srv, "POST", "/api/start", raw=b"[1]")[0] == 400
    assert request(srv, "POST", "/api/start", raw=b"x" * (70 * 1024))[0] == 400
    assert "unknown session" in request(srv, "POST", "/api/start", {"session": "nope", "prompt": "a",
                                                                    "frames": 9})[1]["error"]
    assert "no stream" in ev.post(srv, "switch", prompt="b")[1]["error"]
    # and then a good one runs to the end
    assert ev.post(srv, "start", prompt="a red fox", frames=9, seed=1) == (200, {"run": 1, "queued": 0})
    blocks, end = _blocks_until_end(ev)
    assert end["state"] == "done" and len(blocks) == 3 and end["frames"] == 33
    assert "already running" not in str(end)
    ev.close()
    assert srv.app.errors == 0 and srv.logs == []


def test_binds_127_0_0_1_by_default_and_stops_cleanly_on_ctrl_c(tmp_path):
    assert build_parser("serve").parse_args(["serve"]).host == "127.0.0.1"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "deepforcing_kernels", "serve", "--port", "0", "--latent-size", "4",
                          "4"], stderr=subprocess.PIPE, env=env, text=True, preexec_fn=sigint_default)
    try:
        line = p.stderr.readline()
        assert line.startswith("deepforcing serve: http://127.0.0.1:"), line
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
    assert not list(tmp_path.glob("deepforcing-serve-*"))
    r = subprocess.run([sys.executable, "-m", "deepforcing_kernels", "serve", "--max-streams", "0"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--max-streams" in r.stderr


def test_no_path_from_the_page_reaches_the_file_system(server, tmp_path, monkeypatch):
    # the working folder the run must leave as it was is this test's own (another test running beside it under
    # pytest -n may write into the repository's), holding the repository's files the paths below aim at
    for name in ("setup.py", "README.md"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    srv = server()
    secret = (ROOT / "setup.py").read_bytes()[:40]
    for path in ["/setup.py", "/../setup.py", "/%2e%2e/setup.py", "/api/video?session=../../setup.py",
                 "/api/video?session=" + str(ROOT / "setup.py"), "/api/events/../../setup.py", "//etc/passwd",
                 "/api/../../../../etc/passwd", "/README.md"]:
        status, body = request(srv, "GET", path)
        assert status == 404 and secret not in (body if isinstance(body, bytes) else str(body).encode()), path
    ev = Events(srv)
    folder = srv.app.sessions[ev.sid].folder
    before = set(os.listdir(Path.cwd()))
    ev.post(srv, "start", prompt="../../x", frames=3, seed=0, path="/tmp/evil.mp4", out="evil.mp4")
    _blocks_until_end(ev)
    assert set(os.listdir(Path.cwd())) == before and not Path("/tmp/evil.mp4").exists()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["video.mp4"]  # everything the run wrote is in its own folder
    status, data = request(srv, "GET", f"/api/video?session={ev.sid}")
    assert status == 200 and data == files[0].read_bytes()
    ev.close()
    assert wait_for(lambda: not folder.exists())  # the session's folder goes with its tab


def test_max_streams_queues_the_other_tabs(server):
    srv = server(max_streams=1)
    a, b = Events(srv), Events(srv)
    assert a.post(srv, "start", prompt="a", frames=60)[1]["queued"] == 0
    assert a.next("block")["index"] == 0
    assert b.post(srv, "start", prompt="b", frames=6)[1] == {"run": 1, "queued": 1}
    assert b.next("queued", until=("block",))["position"] == 1
    assert srv.app.health()["active"] == 1 and srv.app.health()["waiting"] == 1
    a.post(srv, "stop")
    assert a.next("end")["state"] == "stopped"
    blocks, end = _blocks_until_end(b)  # b starts once a's slot is free
    assert end["state"] == "done" and len(blocks) == 2
    kinds = [k for k, _ in b.seen]
    assert kinds.index("queued") < kinds.index("started") < kinds.index("block")
    a.close(), b.close()
    srv2 = server(max_streams=2)
    c, d = Events(srv2), Events(srv2)
    assert c.post(srv2, "start", prompt="c", frames=30)[1]["queued"] == 0
    assert d.post(srv2, "start", prompt="d", frames=30)[1]["queued"] == 0
    c.close(), d.close()
    assert srv.app.errors == srv2.app.errors == 0


def test_a_closed_client_stops_its_stream_and_frees_its_session(server):
    srv = server()
    ev = Events(srv)
    s = srv.app.sessions[ev.sid]
    ev.post(srv, "start", prompt="a long one", frames=900)
    ev.next("block")
    live = s.live
    ev.close()
    assert wait_for(lambda: srv.app.health()["sessions"] == 0 and srv.app.health()["active"] == 0, 20)
    assert live.state == "stopped" and live.frames_done < 900
    assert wait_for(lambda: not s.folder.exists(), 10)
    assert s.live is None and not s.events  # its rollout and frames are dropped
    assert wait_for(lambda: srv.app.health()["launchers"] == 0, 20)  # and its thread is gone, memory handed back
    # the next tab gets the slot at once
    ev2 = Events(srv)
    assert ev2.post(srv, "start", prompt="b", frames=3)[1]["queued"] == 0
    assert _blocks_until_end(ev2)[1]["state"] == "done"
    ev2.close()
    assert srv.app.errors == 0


def test_frames_switch_and_stop_give_the_pipelines_pixels_and_the_clis_file(server, tmp_path):
    """The pushed frames are the pipeline's own (decoded PNG == its uint8 pixels); frames before a switch equal
    an unswitched run's; the mp4 after Stop is byte for byte what the command in the end event writes."""
    srv = server()
    ev = Events(srv)
    ev.post(srv, "start", prompt="a red fox", frames=60, seed=3, policy="deep_forcing")
    got = [ev.next("block")]
    assert ev.post(srv, "switch", prompt="a blue whale", recache=True)[0] == 200
    while not got[-1]["switched"]:
        got.append(ev.next("block"))
    sw = got[-1]["latent_start"]
    got.append(ev.next("block"))
    ev.post(srv, "stop")
    rest, end = _blocks_until_end(ev)
    got += rest
    latent = end["latent_frames"]
    assert end["state"] == "stopped" and sw < latent < 60 and got[-1]["latent_end"] == latent
    pixels = decode_blocks(got)
    pipe = VideoPipeline.tiny(3, latent_size=LAT)
    plain = torch.cat([c.frames for c in pipe.frames("a red fox", latent, seed=3, progress=False)], 1)
    cut = 1 + 4 * (sw - 1)
    assert (pixels[:cut] == frames_to_uint8(plain)[:cut]).all()
    assert not (pixels[cut:] == frames_to_uint8(plain)[cut:]).all()
    sched = torch.cat([c.frames for c in pipe.frames("a red fox", latent, seed=3, switches=[(sw, "a blue whale")],
                                                     recache=True, progress=False)], 1)
    assert (pixels == frames_to_uint8(sched)).all()
    status, mp4 = request(srv, "GET", f"/api/video?session={ev.sid}")
    with av.open(__import__("io").BytesIO(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == end["frames"] == len(pixels)
    argv = shlex.split(end["command"])
    assert argv[:2] == ["deepforcing", "generate"] and f"{sw}:a blue whale" in argv and "--recache" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.mp4")
    assert main(argv[1:] + ["--no-progress"]) == 0
    assert (tmp_path / "cli.mp4").read_bytes() == mp4
    ev.close()
    assert srv.app.errors == 0
