"""`deepforcing serve` in a real browser (headless Chromium through selenium), tiny model, one process.

    python benchmarks/bench_serve.py figures [--frames 45] [--repeats 5] [--json out/serve_figures.json]
    python benchmarks/bench_serve.py soak [--minutes 10] [--tabs 3] [--json out/serve_soak.json]
    python benchmarks/bench_serve.py screenshot [--out docs/serve.png]

* ``figures``: time from the Start click to the first frame on the page, and the page's frames per second
  (frames received after the first block / time between the first and the last block) against ``pipe.frames()``
  iterated in this same process with the same arguments (the same rate over its chunks), and the same for the
  event stream read by a plain HTTP client (what a browser on another machine receives: here the browser shares
  the server's cores); interleaved, ``--repeats`` times each, medians of the per-repeat ratios. A new seed's first Start also builds the tiny random model (as
  ``generate --model tiny --seed S`` does): reported apart.
* ``soak``: ``--max-streams 2``, ``--tabs`` browser tabs that open, Start a random length, sometimes switch,
  pause, stop or close mid-stream, and reopen, for ``--minutes``; the server's resident memory is sampled every
  10 s while it runs, and every ``--idle-every`` seconds with every tab closed (the idle probes after the first,
  the warm-up, should stay flat: what a closed tab leaves is what would leak); its error count must stay 0.
* ``screenshot``: the page mid-stream (after a prompt switch), saved by headless Chromium.

Needs chromium + chromedriver (Debian: ``apt-get install chromium chromium-driver``) and selenium
(``pip install "deepforcing_kernels[serve-test]"``).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from deepforcing_kernels.pipeline import VideoPipeline
from deepforcing_kernels.runio import host
from deepforcing_kernels.runio.host import limit_malloc_arenas
from deepforcing_kernels.serve import browser
from deepforcing_kernels.serve.app import rss_mib

LAT = (4, 4)


def chrome(size=(1100, 860)):
    return browser.chrome(size=size)


def serve(max_streams=1, latent_size=LAT):
    srv = browser.start_server(latent_size=latent_size, max_streams=max_streams)
    srv.url += "/"
    return srv


def wait(cond, timeout=120.0, step=0.1):
    v = browser.wait_until(cond, timeout, step)
    if v is None:
        raise TimeoutError("the page did not get there in time")
    return v


def open_page(b, srv):
    browser.open_page(b, srv.url)


start = browser.start_run


def page_run(b, frames, seed):
    start(b, "a red fox", frames, seed)
    # the rates come from the page's own block times: the end can be seen late, and each look at the page is a
    # driver round trip on the cores being measured (50 looks took 0.23 s of Chromium's CPU)
    wait(lambda: b.execute_script("return df.end"), step=0.5)
    d = b.execute_script("return {blocks: df.blocks, tClick: df.tClick, tFirst: df.tFirstShown}")
    bl = d["blocks"]
    rate = (sum(x["n"] for x in bl) - bl[0]["n"]) / ((bl[-1]["t"] - bl[0]["t"]) / 1000)
    return {"first_frame_ms": d["tFirst"] - d["tClick"], "fps": rate}


def pipe_run(pipe, frames, seed):
    t0 = time.perf_counter()
    times, counts = [], []
    for c in pipe.frames("a red fox", frames, seed=seed, progress=False):
        times.append(time.perf_counter())
        counts.append(c.frames.shape[1])
    return {"first_frame_ms": (times[0] - t0) * 1000, "fps": (sum(counts) - counts[0]) / (times[-1] - times[0])}


def stream_run(srv, frames, seed):
    """The page's event stream read by a plain HTTP client (what a browser on another machine receives)."""
    import http.client

    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("GET", "/api/events")
    r = c.getresponse()

    def events():
        kind = None
        for line in iter(r.fp.readline, b""):
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])

    it = events()
    sid = next(it)[1]["session"]
    body = json.dumps({"session": sid, "prompt": "a red fox", "frames": frames, "seed": seed}).encode()
    p = http.client.HTTPConnection(host, port, timeout=60)
    t0 = time.perf_counter()
    p.request("POST", "/api/start", body=body)
    p.getresponse().read()
    times, counts = [], []
    for kind, d in it:
        if kind == "block":
            times.append(time.perf_counter())
            counts.append(d["count"])
        elif kind == "end":
            break
    c.close()
    return {"first_frame_ms": (times[0] - t0) * 1000, "fps": (sum(counts) - counts[0]) / (times[-1] - times[0])}


def figures(args):
    torch.set_num_threads(1)
    srv, b = serve(), chrome()
    try:
        open_page(b, srv)
        cold = page_run(b, args.frames, seed=11)  # builds the tiny random model of seed 11 first
        pipe = VideoPipeline.tiny(0, latent_size=LAT)
        page_run(b, args.frames, 0)
        pipe_run(pipe, args.frames, 0)  # warm both
        pages, pipes, streams, pages_nice0 = [], [], [], []
        for _ in range(args.repeats):
            pages.append(page_run(b, args.frames, 0))
            pipes.append(pipe_run(pipe, args.frames, 0))
            streams.append(stream_run(srv, args.frames, 0))
            host.WRITER_NICE, nice = 0, host.WRITER_NICE  # the same page with the mp4 writer not lowered
            try:
                pages_nice0.append(page_run(b, args.frames, 0))
            finally:
                host.WRITER_NICE = nice
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        out = {"frames": args.frames, "latent_size": list(LAT), "repeats": args.repeats,
               "cold_first_frame_ms": cold["first_frame_ms"],
               "page_first_frame_ms": med(pages, "first_frame_ms"), "pipe_first_frame_ms": med(pipes, "first_frame_ms"),
               "stream_first_frame_ms": med(streams, "first_frame_ms"),
               "page_fps": med(pages, "fps"), "pipe_fps": med(pipes, "fps"), "stream_fps": med(streams, "fps"),
               "page_ratios": [p["fps"] / q["fps"] for p, q in zip(pages, pipes)],
               "stream_ratios": [p["fps"] / q["fps"] for p, q in zip(streams, pipes)],
               "page_writer_nice0_ratios": [p["fps"] / q["fps"] for p, q in zip(pages_nice0, pipes)],
               "writer_nice": host.WRITER_NICE,
               "server_errors": srv.app.errors}
        out["page_ratio"] = statistics.median(out["page_ratios"])
        out["stream_ratio"] = statistics.median(out["stream_ratios"])
        out["page_writer_nice0_ratio"] = statistics.median(out["page_writer_nice0_ratios"])
        print(json.dumps(out, indent=1))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))
    finally:
        b.quit()
        srv.close_all()


def _idle(srv) -> bool:
    """No tab, no stream, and every stream thread finished (so it has handed its memory back)."""
    h = srv.app.health()
    return h["sessions"] == 0 and h["active"] == 0 and h["launchers"] == 0


def soak(args):
    """Tabs open, start, steer, stop and close at random; the server must keep flat memory and no errors."""
    import tempfile

    torch.set_num_threads(1)
    limit_malloc_arenas()  # as `deepforcing serve` does
    tempfile.tempdir = scratch = tempfile.mkdtemp(prefix="deepforcing-soak-")  # the sessions' folders go here
    srv = serve(max_streams=2)
    rng = random.Random(0)
    b = chrome()
    samples, idle, t0 = [], [], time.monotonic()
    stop_at = t0 + args.minutes * 60
    stats = {"tabs_opened": 0, "tabs_closed": 0, "starts": 0, "switches": 0, "stops": 0, "pauses": 0}
    try:
        first = b.current_window_handle
        tabs = []
        next_sample = t0
        next_idle = t0 + args.idle_every
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - t0, 1), round(rss_mib(), 1), srv.app.health()["sessions"]))
                next_sample += 10
            if now >= next_idle:  # every tab closed, every stream gone: what is left is what would leak
                for tab in tabs:
                    b.switch_to.window(tab)
                    b.close()
                stats["tabs_closed"] += len(tabs)
                tabs = []
                b.switch_to.window(first)
                wait(lambda: _idle(srv), 60)
                gc.collect()
                idle.append((round(time.monotonic() - t0, 1), round(rss_mib(), 1)))
                next_idle += args.idle_every
                continue
            if len(tabs) < args.tabs:  # open a tab and start a stream in it
                b.switch_to.new_window("tab")
                open_page(b, srv)
                tabs.append(b.current_window_handle)
                stats["tabs_opened"] += 1
                start(b, f"soak {stats['starts']}", rng.choice([9, 30, 60, 90]), rng.randrange(4),
                      rng.choice(srv.app.policies))
                stats["starts"] += 1
                continue
            tab = rng.choice(tabs)
            b.switch_to.window(tab)
            act = rng.random()
            st = b.execute_script("return document.getElementById('status').textContent")
            live = st.startswith(("running", "paused", "starting"))
            if act < 0.25:  # close the tab, stream or not
                b.close()
                tabs.remove(tab)
                stats["tabs_closed"] += 1
                b.switch_to.window(first)
            elif live and act < 0.4:
                b.execute_script("fetch('/api/switch', {method: 'POST', body: JSON.stringify({session: df.sid, "
                                 "prompt: 'another', recache: Math.random() < 0.5})})")
                stats["switches"] += 1
            elif live and act < 0.5:
                b.execute_script("document.getElementById('pause').click()")
                stats["pauses"] += 1
                time.sleep(0.3)
                b.execute_script("document.getElementById('pause').click()")
            elif live and act < 0.6:
                b.execute_script("document.getElementById('stop').click()")
                stats["stops"] += 1
            elif not live and not st.startswith("queued"):
                start(b, f"soak {stats['starts']}", rng.choice([9, 30, 60, 90]), rng.randrange(4),
                      rng.choice(srv.app.policies))
                stats["starts"] += 1
            time.sleep(rng.uniform(0.2, 1.5))
        for tab in tabs:
            b.switch_to.window(tab)
            b.close()
        wait(lambda: _idle(srv), 60)
        gc.collect()
        idle.append((round(time.monotonic() - t0, 1), round(rss_mib(), 1)))
    finally:
        try:
            b.quit()
        except Exception:  # noqa: BLE001
            pass
    warm = [m for t, m, _ in samples if t >= 60] or [m for _, m, _ in samples]
    idle_warm = [m for t, m in idle[1:]] or [m for _, m in idle]
    out = {"minutes": args.minutes, "max_streams": 2, "stats": stats, "runs_started": srv.app.runs_started,
           "server_errors": srv.app.errors, "error_lines": srv.logs[:5], "rss_mib_samples": samples,
           "rss_after_warmup_min": min(warm), "rss_after_warmup_max": max(warm),
           "rss_idle_mib": idle, "rss_idle_after_first_min": min(idle_warm), "rss_idle_after_first_max": max(idle_warm),
           "leftover_session_folders": sorted(p.name for p in Path(scratch).glob("deepforcing-serve-*"))}
    srv.close_all()
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({k: v for k, v in out.items() if k != "rss_mib_samples"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


def screenshot(args):
    """The page mid-stream, after a switch: the cache picture, the fps line and a frame in view."""
    from selenium.webdriver.common.by import By

    torch.set_num_threads(1)
    srv, b = serve(latent_size=(8, 8)), chrome()
    try:
        open_page(b, srv)
        start(b, "a red fox runs through the snow", 300, seed=0)
        wait(lambda: b.execute_script("return df.blocks.length >= 8"))
        b.find_element(By.ID, "switch-prompt").send_keys("the fox sleeps under a pine tree")
        b.find_element(By.ID, "recache").click()
        b.find_element(By.ID, "switch").click()
        wait(lambda: b.execute_script("return df.blocks.some(x => x.switched) && df.blocks.length >= 14"))
        b.find_element(By.ID, "pause").click()  # hold it mid-stream for the picture
        wait(lambda: b.execute_script("return document.getElementById('status').textContent === 'paused'"))
        time.sleep(0.5)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        b.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        b.quit()
        srv.close_all()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("figures")
    f.add_argument("--frames", type=int, default=45)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--json", default=None)
    s = sub.add_parser("soak")
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--tabs", type=int, default=3)
    s.add_argument("--idle-every", type=float, default=60.0,
                   help="seconds between idle probes (all tabs closed, resident memory sampled)")
    s.add_argument("--json", default=None)
    c = sub.add_parser("screenshot")
    c.add_argument("--out", default="docs/serve.png")
    a = p.parse_args()
    {"figures": figures, "soak": soak, "screenshot": screenshot}[a.what](a)


if __name__ == "__main__":
    main()
