"""The one HTML page of ``deepforcing serve`` (no external files: it works offline).

It opens the tab's event stream, sends Start / Stop / Pause / Switch as JSON, plays each block's frames as they
arrive, draws the cache of the block just made (one box per frame-sized group of slots: sink, Top-C, recent,
with its frame and RoPE position) and shows frames per second of generation, decoding and on the page. What it
received is kept in ``window.df`` (each block's frames as one image, frames stacked top to bottom, as a data URL;
arrival times), which the browser tests read.
"""
from __future__ import annotations

__all__ = ["render_page"]

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deepforcing serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 980px; }
h1 { font-size: 1.25em; margin: 0 0 .6em; } label { margin-right: .8em; }
textarea { width: 100%; box-sizing: border-box; font: inherit; }
.row { margin: .45em 0; } button { font: inherit; padding: .25em .9em; margin-right: .35em; }
#view { width: 384px; height: 384px; image-rendering: pixelated; background: #111; display: block; }
#message { color: #b00020; min-height: 1.2em; } #status { font-weight: 600; }
#cache { display: flex; flex-wrap: wrap; gap: 2px; margin-top: .3em; }
.slot { font: 11px monospace; padding: 2px 4px; border-radius: 3px; color: #fff; }
.sink { background: #3558a8; } .topc { background: #d2711b; } .recent { background: #2e8b57; }
.legend span { margin-right: .8em; } code { background: #f2f2f2; padding: 1px 3px; word-break: break-all; }
.cols { display: flex; gap: 1.2em; flex-wrap: wrap; } .cols > div { flex: 1 1 380px; }
</style></head><body>
<h1>Deep Forcing: live stream <small id="model"></small></h1>
<div class="cols"><div>
<div class="row"><textarea id="prompt" rows="2" placeholder="the prompt">a red fox runs through the snow</textarea></div>
<div class="row"><label>policy <select id="policy"></select></label>
<label>seed <input id="seed" type="number" value="0" min="0" style="width:6em"></label>
<label>length <input id="frames" type="number" value="30" min="3" step="3" style="width:5em"> latent frames</label></div>
<div class="row"><button id="start">Start</button><button id="stop" disabled>Stop</button>
<button id="pause" disabled>Pause</button></div>
<div class="row"><textarea id="switch-prompt" rows="1" placeholder="a new prompt, applied at the next block boundary"></textarea></div>
<div class="row"><button id="switch" disabled>Switch now</button>
<label><input id="recache" type="checkbox"> re-cache (recompute the held frames' K/V under the new prompt)</label></div>
<div class="row">status: <span id="status">connecting</span></div>
<div class="row" id="message"></div>
<div class="row" id="fps"></div>
<div class="row"><a id="download" href="#" style="display:none" download>download the mp4</a></div>
<div class="row" id="command"></div>
</div><div>
<canvas id="view" width="384" height="384" aria-label="the stream"></canvas>
<div class="row" id="frameinfo"></div>
<div class="row legend"><span class="slot sink">sink</span><span class="slot topc">Top-C</span>
<span class="slot recent">recent</span> the cache after the block just made: frame &rarr; RoPE position</div>
<div id="cache"></div>
</div></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const df = window.df = { sid: null, run: 0, sprites: [], blocks: [], shown: 0, received: 0, tClick: null,
  tFirstShown: null, tEnd: null, end: null, errors: [], states: [], fps: 16, queue: [], blockLen: 12 };
let es = null;

function setStatus(s) { $("status").textContent = s; df.states.push([performance.now(), s]); }
function message(m) { $("message").textContent = m || ""; if (m) df.errors.push(m); }
function running(on) {
  $("start").disabled = on; $("stop").disabled = !on; $("pause").disabled = !on; $("switch").disabled = !on;
}

async function post(cmd, body) {
  body = Object.assign({ session: df.sid }, body || {});
  let r;
  try {
    r = await fetch("/api/" + cmd, { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify(body) });
  } catch (e) { message("the server cannot be reached"); return null; }
  const j = await r.json().catch(() => ({ error: "bad answer from the server" }));
  if (!r.ok || j.error) { message(j.error || ("error " + r.status)); return null; }
  return j;
}

function connect() {
  es = new EventSource("/api/events");
  es.addEventListener("hello", (e) => {
    const h = JSON.parse(e.data);
    df.sid = h.session; df.fps = h.fps;
    $("model").textContent = "(model " + h.model + (h.weights ? "" : ", random weights: the video is noise") +
      "; " + h.max_streams + " stream" + (h.max_streams > 1 ? "s" : "") + " at once)";
    const sel = $("policy"); sel.innerHTML = "";
    for (const p of h.policies) { const o = document.createElement("option"); o.value = o.textContent = p;
      if (p === h.default_policy) o.selected = true; sel.appendChild(o); }
    $("frames").value = h.default_frames; $("frames").max = h.max_frames;
    setStatus("ready"); running(false);
  });
  es.addEventListener("queued", (e) => { const q = JSON.parse(e.data); if (q.run !== df.run) return;
    setStatus("queued: " + q.position + " ahead of you in line (" + q.max_streams + " at once)"); });
  es.addEventListener("started", (e) => { const s = JSON.parse(e.data); if (s.run !== df.run) return;
    df.started = s; setStatus("running"); });
  es.addEventListener("state", (e) => { const s = JSON.parse(e.data); if (s.run !== df.run) return;
    setStatus(s.state); $("pause").textContent = s.state === "paused" ? "Resume" : "Pause"; });
  es.addEventListener("block", (e) => onBlock(JSON.parse(e.data)));
  es.addEventListener("end", (e) => onEnd(JSON.parse(e.data)));
  es.onerror = () => { if (es.readyState === 2) { setStatus("disconnected: reload the page"); running(false); } };
}

function onBlock(b) {
  if (b.run !== df.run) return;            // a previous run's late block: never mixed in
  const now = performance.now();
  df.blocks.push({ index: b.index, frame_start: b.frame_start, n: b.count, t: now,
                   prompt: b.prompt, switched: b.switched, latent_start: b.latent_start });
  df.sprites.push({ url: b.sprite, count: b.count });
  const img = new Image();                 // one image a block: its frames stacked top to bottom
  img.onload = () => { if (b.run !== df.run) return;
    for (let i = 0; i < b.count; i++) df.queue.push([img, i, b.width, b.height]);
    play(); };
  img.src = b.sprite;
  df.received += b.count; df.blockLen = Math.max(df.blockLen, b.count);
  const first = df.blocks[0];
  const rate = df.blocks.length > 1 ? (df.received - first.n) / ((now - first.t) / 1000) : 0;
  $("fps").textContent = "frames/s: generation " + b.gen_fps.toFixed(1) + ", decoding " + b.decode_fps.toFixed(1) +
    ", on the page " + rate.toFixed(1);
  df.pageFps = rate;
  if (b.switched) message("");
  drawCache(b.cache);
  $("frameinfo").textContent = "latent frames " + b.latent_start + "-" + (b.latent_end - 1) + " (video frame " +
    b.frame_start + "+), prompt: " + b.prompt;
}

function drawCache(c) {
  const box = $("cache"); box.innerHTML = "";
  if (!c || !c.slots) return;
  for (const s of c.slots) {
    const d = document.createElement("span");
    d.className = "slot " + s.kind;
    const fr = s.frames.length === 1 ? "f" + s.frames[0] : "f" + s.frames[0] + ".." + s.frames[s.frames.length - 1];
    const po = s.positions.length === 1 ? "p" + s.positions[0] :
      "p" + s.positions[0] + ".." + s.positions[s.positions.length - 1];
    d.textContent = fr + "\u2192" + po;
    d.title = s.kind + ": tokens of frame(s) " + s.frames.join(", ") + " at RoPE position(s) " + s.positions.join(", ");
    box.appendChild(d);
  }
}

function onEnd(x) {
  if (x.run !== df.run) return;
  df.tEnd = performance.now(); df.end = x;
  running(false); $("pause").textContent = "Pause";
  setStatus(x.state + (x.frames ? " (" + x.frames + " video frames from " + x.latent_frames + " latent frames)" : ""));
  if (x.error) message(x.error);
  if (x.download) { const a = $("download"); a.href = x.download; a.style.display = "inline"; }
  if (x.command) $("command").innerHTML = "the same file from the command line: <code></code>";
  if (x.command) $("command").querySelector("code").textContent = x.command;
}

// plays the received frames at the video's rate, never more than about one block behind the stream; the timer
// runs only while frames wait
let timer = null;
const ctx = $("view").getContext("2d");
ctx.imageSmoothingEnabled = false;
function play() {
  if (timer !== null || !df.queue.length) return;
  while (df.queue.length > df.blockLen + 1) df.queue.shift();
  const [img, i, w, h] = df.queue.shift();
  const c = $("view");
  ctx.drawImage(img, 0, i * h, w, h, 0, 0, c.width, c.height);
  df.shown += 1;
  if (df.tFirstShown === null) df.tFirstShown = performance.now();
  timer = setTimeout(() => { timer = null; play(); }, 1000 / df.fps);
}

$("start").onclick = async () => {
  message(""); $("download").style.display = "none"; $("command").textContent = "";
  const body = { prompt: $("prompt").value, policy: $("policy").value, seed: Number($("seed").value),
                 frames: Number($("frames").value) };
  df.sprites = []; df.blocks = []; df.queue = []; df.shown = 0; df.received = 0; df.end = null; df.tEnd = null;
  df.tFirstShown = null; df.tClick = performance.now(); df.pageFps = 0;
  running(true);
  const prev = df.run;
  df.run = prev + 1;  // the server numbers a tab's accepted Starts 1, 2, ...: events may beat the answer here
  const r = await post("start", body);
  if (!r) { df.run = prev; running(false); return; }
  df.run = r.run;
  setStatus(r.queued ? "queued: " + r.queued + " ahead of you in line" : "starting");
};
$("stop").onclick = () => post("stop");
$("pause").onclick = () => post($("pause").textContent === "Pause" ? "pause" : "resume");
$("switch").onclick = async () => {
  const r = await post("switch", { prompt: $("switch-prompt").value, recache: $("recache").checked });
  if (r) message("switching at the next block boundary");
};
window.addEventListener("pagehide", () => {
  if (df.sid) navigator.sendBeacon("/api/close", JSON.stringify({ session: df.sid }));
});
connect();
</script></body></html>
"""


def render_page() -> str:
    """The page's HTML (static: every choice the server fixed arrives in the ``hello`` event)."""
    return _PAGE
