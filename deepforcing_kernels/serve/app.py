"""The serving logic, without HTTP: sessions (one per browser tab), the bounded set of running streams and the
queue of the others, input checks, and the mp4 each run leaves.

A session lives exactly as long as its tab's event stream (:mod:`.http` opens it when the page connects and
closes it when the connection drops), so a closed tab stops its stream and frees its memory and files. Each
session writes only inside its own fresh temporary folder (``tempfile.mkdtemp``), removed with the session:
nothing the page sends names a path, and nothing of the user's is touched or overwritten. The mp4 of a run is
the one ``deepforcing generate`` writes for the same choices (same pipeline, rollout, decoder and writer; a
stopped run's file is that of a run of the latent frames it made); :meth:`ServeApp.command_for` spells that
command out.
"""
from __future__ import annotations

import collections
import gc
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

__all__ = ["ServeOptions", "ServeApp", "Session", "BadRequest", "PipelineSource"]

#: blocks a session may have waiting for its tab before its stream waits (the page sets the pace)
MAX_PENDING_BLOCKS = 3
MAX_PROMPT_CHARS = 2000


class BadRequest(ValueError):
    """Input the page sent that cannot be run: the message (one line) is shown in the page."""


@dataclass
class ServeOptions:
    """What ``deepforcing serve`` fixes at start (the page never chooses the model or the weights)."""

    model: str = "tiny"
    weights: Optional[str] = None
    checkpoint: Optional[str] = None
    dtype: str = "float32"
    cache_dtype: Optional[str] = None
    device: str = "cpu"
    backend: str = "auto"
    latent_size: Optional[Tuple[int, int]] = None
    max_streams: int = 1
    max_frames: int = 960
    default_frames: int = 30
    fps: float = 16.0
    frame_format: str = "png"


class PipelineSource:
    """Pipelines for the page's choices. With ``--model tiny`` and no weights the DiT, VAE and text encoder are
    random from the seed, exactly as ``deepforcing generate --model tiny --seed S`` builds them (a few of them
    are kept); with weights, one set is loaded at start and every run shares it. A run's pipeline is a view of
    those modules with the run's policy."""

    def __init__(self, options: ServeOptions, keep: int = 4) -> None:
        self.options = options
        self._keep = keep
        self._by_seed: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._shared = None

    def _kw(self) -> Dict[str, Any]:
        from ..presets import torch_dtype

        o = self.options
        kw: Dict[str, Any] = {"backend": o.backend,
                              "cache_dtype": torch_dtype(o.cache_dtype) if o.cache_dtype else None}
        if o.latent_size:
            kw["latent_size"] = tuple(o.latent_size)
        return kw

    def load(self) -> Any:
        """Build (or load) the base modules now, so that bad weights fail at start; returns a pipeline."""
        return self.base(0)

    def base(self, seed: int) -> Any:
        from ..pipeline import VideoPipeline
        from ..presets import torch_dtype

        o = self.options
        with self._lock:
            if o.weights is not None:
                if self._shared is None:
                    self._shared = VideoPipeline.from_weights(o.weights, o.checkpoint, model=o.model,
                                                              dtype=torch_dtype(o.dtype), device=o.device,
                                                              **self._kw())
                return self._shared
            pipe = self._by_seed.pop(seed, None)
            if pipe is None:
                pipe = VideoPipeline.tiny(seed=seed, dtype=torch_dtype(o.dtype), device=o.device, **self._kw())
            self._by_seed[seed] = pipe
            while len(self._by_seed) > self._keep:
                self._by_seed.popitem(last=False)
            return pipe

    def pipeline(self, policy: str, seed: int) -> Any:
        """The pipeline of a run: the base modules with ``policy`` (a preset name)."""
        from ..pipeline import VideoPipeline
        from ..presets import make_policy

        b = self.base(seed)
        return VideoPipeline(b.model, b.vae, b.text_encoder, policy=make_policy(policy), cache_dtype=b.cache_dtype,
                             backend=b.backend, latent_size=b.latent_size)


class Session:
    """One tab: its events (read by its event stream), its current run and its folder."""

    def __init__(self, sid: str, folder: Path) -> None:
        self.id, self.folder = sid, folder
        self.cond = threading.Condition()
        self.events: Deque[Dict[str, Any]] = collections.deque()
        self.closed = False
        self.run_no = 0
        self.live: Any = None
        self.request: Optional[Dict[str, Any]] = None
        self.video: Optional[Path] = None      # the last finished run's mp4
        self.video_name = "video.mp4"
        self.stop_flag = False
        self.state = "idle"                    # idle | queued | starting | running | paused | done | stopped | error

    def push(self, event: Dict[str, Any]) -> None:
        with self.cond:
            if not self.closed:
                self.events.append(event)
                self.cond.notify_all()

    def pop(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next event, or None after ``timeout`` seconds (or once closed)."""
        with self.cond:
            if not self.events and not self.closed:
                self.cond.wait(timeout)
            ev = self.events.popleft() if self.events else None
            self.cond.notify_all()  # room for a waiting stream
            return ev

    def wait_for_room(self) -> None:
        """Hold the stream while its tab has MAX_PENDING_BLOCKS blocks still to take (unless stopping)."""
        with self.cond:
            while not self.closed and not self.stop_flag and \
                    sum(1 for e in self.events if e.get("type") == "block") >= MAX_PENDING_BLOCKS:
                self.cond.wait(0.5)


class ServeApp:
    """Sessions, the running streams (at most ``options.max_streams``) and the queue of the others.

    ``source`` builds the pipelines (default :class:`PipelineSource` of ``options``); ``log`` gets one line per
    server-side error (``errors`` counts them)."""

    def __init__(self, options: ServeOptions, source: Optional[PipelineSource] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        from ..presets import POLICY_NAMES

        self.options = options
        self.source = source or PipelineSource(options)
        self.policies = list(POLICY_NAMES)
        self.sessions: Dict[str, Session] = {}
        self.active: List[Session] = []
        self.waiting: Deque[Session] = collections.deque()
        self.lock = threading.RLock()
        self.errors = 0
        self.runs_started = 0
        self.launchers = 0  # stream threads not yet finished (their memory is handed back as they end)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.closing = False

    # ------------------------------------------------------------ sessions
    def open_session(self) -> Session:
        sid = secrets.token_urlsafe(18)
        s = Session(sid, Path(tempfile.mkdtemp(prefix="deepforcing-serve-")))
        with self.lock:
            self.sessions[sid] = s
        s.push(self.hello(s))
        return s

    def hello(self, s: Session) -> Dict[str, Any]:
        o = self.options
        return {"type": "hello", "session": s.id, "model": o.model, "weights": bool(o.weights),
                "policies": self.policies, "default_policy": "deep_forcing", "default_frames": o.default_frames,
                "max_frames": o.max_frames, "max_streams": o.max_streams, "fps": o.fps}

    def session(self, sid: Any) -> Session:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise BadRequest("unknown session: reload the page")
        return s

    def close_session(self, sid: str) -> None:
        """The tab is gone: stop its stream, drop it from the queue, free its memory and remove its folder."""
        with self.lock:  # lock order everywhere: self.lock, then a session's cond
            s = self.sessions.pop(sid, None)
            if s is None:
                return
            if s in self.waiting:
                self.waiting.remove(s)
                self._announce_queue()
            with s.cond:
                s.closed, s.stop_flag = True, True
                s.events.clear()
                s.cond.notify_all()
            live, running = s.live, s in self.active
        if live is not None:
            live.stop()  # its thread ends after the block in progress; then _ended frees the slot and the folder
        if not running:  # starting or running: _ended removes the folder once the run is over
            self._remove_folder(s)

    def _remove_folder(self, s: Session) -> None:
        shutil.rmtree(s.folder, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop every stream and remove every session's folder."""
        self.closing = True
        for sid in list(self.sessions):
            self.close_session(sid)
        for s in list(self.active):
            if s.live is not None:
                s.live.wait(30)

    # ------------------------------------------------------------ checks
    def check_start(self, params: Any) -> Dict[str, Any]:
        """The page's Start form -> the run's settings, or BadRequest with one line for the page."""
        from ..presets import canonical_policy_name, make_policy

        if not isinstance(params, dict):
            raise BadRequest("the request must be a JSON object")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("the prompt is empty: type what the video should show")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
        try:
            policy = canonical_policy_name(params.get("policy", "deep_forcing"))
        except (TypeError, ValueError):
            raise BadRequest(f"unknown policy {params.get('policy')!r}; choose one of {', '.join(self.policies)}") \
                from None
        seed = _as_int(params.get("seed", 0), "seed")
        if not 0 <= seed < 2 ** 63:
            raise BadRequest(f"seed must be in [0, 2^63), got {seed}")
        frames = _as_int(params.get("frames"), "length")
        block = make_policy(policy).block_frames
        if frames <= 0 or frames % block:
            raise BadRequest(f"length must be a positive multiple of {block} latent frames (the policy {policy} "
                             f"makes blocks of {block}), got {frames}")
        if frames > self.options.max_frames:
            raise BadRequest(f"length {frames} is over this server's limit of {self.options.max_frames} latent "
                             "frames (--max-frames)")
        return {"prompt": prompt, "policy": policy, "seed": seed, "frames": frames}

    # ------------------------------------------------------------ commands
    def start(self, sid: Any, params: Any) -> Dict[str, Any]:
        s = self.session(sid)
        req = self.check_start(params)
        with self.lock:
            if s.state in ("queued", "starting", "running", "paused"):
                raise BadRequest("a stream is already running in this tab: Stop it first")
            s.run_no += 1
            s.request, s.stop_flag, s.video = req, False, None
            run = s.run_no
            if len(self.active) < self.options.max_streams:
                self._activate(s)
                return {"run": run, "queued": 0}
            s.state = "queued"
            self.waiting.append(s)
            self._announce_queue()
            return {"run": run, "queued": len(self.waiting)}

    def switch(self, sid: Any, params: Any) -> Dict[str, Any]:
        s = self.session(sid)
        if not isinstance(params, dict):
            raise BadRequest("the request must be a JSON object")
        prompt, recache = params.get("prompt"), params.get("recache", False)
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("the new prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
        if not isinstance(recache, bool):
            raise BadRequest("recache must be true or false")
        live = s.live
        if live is None or live.finished:
            raise BadRequest("no stream is running in this tab: Start one first")
        try:
            live.switch(prompt, recache=recache)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return {"ok": True, "at_frame_after": live.frames_done}

    def pause(self, sid: Any) -> Dict[str, Any]:
        return self._control(sid, "pause")

    def resume(self, sid: Any) -> Dict[str, Any]:
        return self._control(sid, "resume")

    def stop(self, sid: Any) -> Dict[str, Any]:
        s = self.session(sid)
        with self.lock:
            if s in self.waiting:  # never started: leave the queue
                self.waiting.remove(s)
                s.state = "idle"
                s.push({"type": "end", "run": s.run_no, "state": "stopped", "frames": 0, "latent_frames": 0,
                        "download": None, "command": None, "error": None})
                self._announce_queue()
                return {"ok": True}
            with s.cond:  # under self.lock: a stream being built sees the flag, or is already s.live
                s.stop_flag = True
                s.cond.notify_all()
            live = s.live
        if live is not None:
            live.stop()
        return {"ok": True}

    def _control(self, sid: Any, what: str) -> Dict[str, Any]:
        s = self.session(sid)
        live = s.live
        if live is None or live.finished:
            raise BadRequest("no stream is running in this tab")
        getattr(live, what)()
        s.state = live.state
        s.push({"type": "state", "run": s.run_no, "state": live.state})
        return {"ok": True, "state": live.state}

    def video(self, sid: Any) -> Tuple[Path, str]:
        """The finished mp4 of the tab's last run (path, download name)."""
        s = self.session(sid)
        if s.video is None or not s.video.is_file():
            raise BadRequest("no finished video in this tab yet")
        return s.video, s.video_name

    def health(self) -> Dict[str, Any]:
        return {"sessions": len(self.sessions), "active": len(self.active), "waiting": len(self.waiting),
                "errors": self.errors, "runs_started": self.runs_started, "launchers": self.launchers, "rss_mib": rss_mib()}

    # ------------------------------------------------------------ running
    def _announce_queue(self) -> None:
        for i, w in enumerate(self.waiting):
            w.push({"type": "queued", "run": w.run_no, "position": i + 1, "max_streams": self.options.max_streams})

    def _activate(self, s: Session) -> None:
        """Give ``s`` a slot (called under the lock) and start its stream in a thread of its own."""
        self.active.append(s)
        s.state = "starting"
        self.runs_started += 1
        self.launchers += 1
        threading.Thread(target=self._counted_launch, args=(s, s.run_no, dict(s.request)), daemon=True,
                         name=f"deepforcing-serve-{s.id[:6]}").start()

    def _counted_launch(self, s: Session, run: int, req: Dict[str, Any]) -> None:
        try:
            self._launch(s, run, req)
        finally:
            with self.lock:
                self.launchers -= 1

    def _launch(self, s: Session, run: int, req: Dict[str, Any]) -> None:
        from ..steering import LiveStream

        folder = s.folder / f"run{run}"
        try:
            for old in s.folder.glob("run*"):  # the tab's previous video: its own folder, and only that
                shutil.rmtree(old, ignore_errors=True)
            folder.mkdir()
            pipe = self.source.pipeline(req["policy"], req["seed"])
            live = LiveStream(pipe, req["prompt"], req["frames"], req["seed"], path=folder / "video.mp4",
                              fps=self.options.fps)
        except (ValueError, TypeError) as e:  # input the checks let through: the page's message
            self._ended(s, run, None, error=_one_line(e))
            return
        except Exception as e:  # noqa: BLE001 - a server fault: logged and counted, and the page is told
            self._server_error(f"starting a stream: {type(e).__name__}: {_one_line(e)}")
            self._ended(s, run, None, error=f"the server failed to start the stream ({type(e).__name__})")
            return
        with self.lock:
            gone = s.closed or s.stop_flag
            s.live = live
            s.state = "running"
        if gone:
            live.stop()
        n = 1 + 4 * (req["frames"] - 1)
        s.push({"type": "started", "run": run, "frames": req["frames"], "video_frames": n,
                "size": list(pipe.pixel_size), "policy": req["policy"], "seed": req["seed"]})
        worker = live.start(lambda block: self._on_block(s, run, block), lambda ls: self._ended(s, run, ls))
        # once the stream's thread is gone nothing holds its rollout, cache or decoder: give their pages back,
        # so a long-lived server's memory does not creep up stream after stream
        del live, pipe
        worker.join()
        gc.collect()
        from ..runio.host import return_freed_host_memory

        return_freed_host_memory()

    def _on_block(self, s: Session, run: int, block: Any) -> None:
        from ..video.writer import frames_to_uint8

        s.push({"type": "block", "run": run, "index": block.index, "frame_start": block.frame_start,
                "latent_start": block.latent_start, "latent_end": block.latent_end, "prompt": block.prompt,
                "switched": block.switched, "cache": block.cache, "gen_fps": round(block.gen_fps, 2),
                "decode_fps": round(block.decode_fps, 2), "pixels": frames_to_uint8(block.frames)})
        s.wait_for_room()

    def _ended(self, s: Session, run: int, live: Any, error: Optional[str] = None) -> None:
        """A run is over (done, stopped, failed, or never started): tell the tab, free the slot, start the next
        queued run; a closed tab's folder goes now."""
        state = "error" if error else live.state
        if live is not None and live.state == "error":
            error = live.error
            self._server_error(f"a stream failed: {error}")
        path = None
        if live is not None and live.paths and state in ("done", "stopped"):
            path = Path(live.paths[0])
        latent = 0 if live is None else live.frames_done
        with self.lock:
            if s in self.active:
                self.active.remove(s)
            s.live = None  # the rollout, its cache and the decoder go with it
            s.state = state
            s.video = path
            if path is not None:
                r = s.request or {}
                s.video_name = f"deepforcing_{r.get('policy', 'run')}_seed{r.get('seed', 0)}_{latent}f.mp4"
            while self.waiting and len(self.active) < self.options.max_streams:
                self._activate(self.waiting.popleft())
            self._announce_queue()
        s.push({"type": "end", "run": run, "state": state, "error": error, "latent_frames": latent,
                "frames": 0 if latent == 0 else 1 + 4 * (latent - 1),
                "download": None if path is None else f"/api/video?session={s.id}",
                "command": None if path is None else self.command_for(s.request or {}, live)})
        if s.closed:
            self._remove_folder(s)

    def _server_error(self, line: str) -> None:
        self.errors += 1
        self._log(f"deepforcing serve: error: {line}")

    def command_for(self, req: Dict[str, Any], live: Any) -> str:
        """The ``deepforcing generate`` command that writes the same mp4 as this run."""
        o = self.options
        latent = live.frames_done if live is not None else req.get("frames", 0)
        cmd = ["deepforcing", "generate", "--model", o.model]
        if o.weights:
            cmd += ["--weights", o.weights] + (["--checkpoint", o.checkpoint] if o.checkpoint else [])
        cmd += ["--prompt", req.get("prompt", ""), "--frames", str(latent), "--policy", req.get("policy", ""),
                "--seed", str(req.get("seed", 0))]
        if o.latent_size:
            cmd += ["--latent-size", str(o.latent_size[0]), str(o.latent_size[1])]
        if o.dtype != "float32":
            cmd += ["--dtype", o.dtype]
        if o.cache_dtype:
            cmd += ["--cache-dtype", o.cache_dtype]
        if o.backend != "auto":
            cmd += ["--backend", o.backend]
        if o.fps != 16.0:
            cmd += ["--fps", f"{o.fps:g}"]
        switches = [sw for sw in (live.switches if live is not None else []) if sw[0] < latent]
        for f, text, _ in switches:
            cmd += ["--switch", f"{f}:{text}"]
        flags = {r for _, _, r in switches}
        if flags == {True}:
            cmd.append("--recache")
        cmd += ["--device", o.device, "--out", "video.mp4"]
        line = " ".join(shlex.quote(c) for c in cmd)
        if len(flags) > 1:
            line += "   (the page re-cached at some switches only; the command line re-caches at all or none)"
        return line


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise BadRequest(f"{name} must be a whole number, got {value!r}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0

