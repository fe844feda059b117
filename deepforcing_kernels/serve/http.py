"""The HTTP side of ``deepforcing serve``: the standard library's ``ThreadingHTTPServer``, one page, a few JSON
commands and one Server-Sent Events stream per tab.

Routes (nothing else answers; no route takes a path, so nothing the page sends reaches the file system):

* ``GET /``: the page (:mod:`.page`);
* ``GET /api/events``: the tab's event stream. Opening it makes the tab's session (the first event, ``hello``,
  names it); frames come as ``block`` events, each carrying its video frames as one PNG (lossless: the
  pixels the mp4 writer is given) or JPEG image, frames stacked top to bottom; a comment line every second
  detects a closed tab, and the session (its stream, memory and folder) goes with the connection;
* ``POST /api/start | switch | pause | resume | stop | close`` with a JSON body ``{"session": ..., ...}``: the
  answer is JSON, ``{"error": "one line"}`` with status 400 for input that cannot run (the server keeps
  serving);
* ``GET /api/video?session=ID``: the tab's finished mp4 (``Content-Disposition: attachment``);
* ``GET /api/health``: sessions, running and queued streams, server errors, resident memory.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from .app import BadRequest, ServeApp
from .page import render_page

__all__ = ["make_server", "ServeHTTPServer"]

MAX_BODY = 64 * 1024
HEARTBEAT_S = 1.0


def encode_block(pixels: Any, fmt: str) -> str:
    """A block's frames ``[T, H, W, 3]`` uint8 as one image, frames stacked top to bottom (one encode and one
    decode a block, not one a frame), as a data URL: PNG (lossless) or JPEG (quality 90)."""
    from PIL import Image

    t, h, w, c = pixels.shape
    im = Image.fromarray(pixels.reshape(t * h, w, c))
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        im.save(buf, format="PNG", compress_level=1)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


class ServeHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the :class:`ServeApp` (one thread per connection)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], app: ServeApp, quiet: bool = True) -> None:
        self.app, self.quiet = app, quiet
        self.page = render_page().encode("utf-8")
        self._stopping = threading.Event()
        super().__init__(address, _Handler)

    def close_all(self) -> None:
        """Stop serving: end the event streams, stop every run and remove the sessions' folders."""
        self._stopping.set()
        self.shutdown()
        self.app.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:  # a fault in a handler: count and log
        import sys
        import traceback

        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return  # the client went away: not a server error
        self.app._server_error(f"request from {client_address[0]}: "
                               f"{''.join(traceback.format_exception_only(type(exc), exc)).strip()}")


class _Handler(BaseHTTPRequestHandler):
    server: ServeHTTPServer
    server_version = "deepforcing-serve"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------ answers
    def _send(self, status: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # ------------------------------------------------------------ GET
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        url = urlsplit(self.path)
        if url.path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                   "style-src 'self' 'unsafe-inline'; "
                                                   "script-src 'self' 'unsafe-inline'"})
        elif url.path == "/api/events":
            self._events()
        elif url.path == "/api/video":
            sid = parse_qs(url.query).get("session", [None])[0]
            try:
                path, name = self.server.app.video(sid)
                data = path.read_bytes()
            except BadRequest as e:
                return self._error(404, str(e))
            self._send(200, data, "video/mp4", {"Content-Disposition": f'attachment; filename="{name}"'})
        elif url.path == "/api/health":
            self._json(200, self.server.app.health())
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"no such page: {url.path[:80]}")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET() if urlsplit(self.path).path == "/" else self._error(404, "not found")

    def _events(self) -> None:
        app = self.server.app
        fmt = app.options.frame_format
        s = app.open_session()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            self.wfile.flush()
            while not self.server._stopping.is_set() and not s.closed:
                ev = s.pop(HEARTBEAT_S)
                if ev is None:
                    self.wfile.write(b": ping\n\n")  # a closed tab makes this write fail
                else:
                    if "pixels" in ev:
                        ev = dict(ev)
                        px = ev.pop("pixels")
                        ev.update(sprite=encode_block(px, fmt), count=int(px.shape[0]), height=int(px.shape[1]),
                                  width=int(px.shape[2]))
                    self.wfile.write(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode("utf-8"))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            pass  # the tab is gone
        finally:
            app.close_session(s.id)

    # ------------------------------------------------------------ POST
    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        app = self.server.app
        actions = {"/api/start": lambda sid, b: app.start(sid, b), "/api/switch": lambda sid, b: app.switch(sid, b),
                   "/api/pause": lambda sid, b: app.pause(sid), "/api/resume": lambda sid, b: app.resume(sid),
                   "/api/stop": lambda sid, b: app.stop(sid), "/api/close": self._close}
        action = actions.get(url.path)
        if action is None:
            return self._error(404, f"no such command: {url.path[:80]}")
        try:
            body = self._body()
            self._json(200, action(body.get("session"), body))
        except BadRequest as e:
            self._error(400, str(e))

    def _close(self, sid: Any, body: Any) -> Dict[str, Any]:
        self.server.app.session(sid)
        self.server.app.close_session(sid)
        return {"ok": True}

    def _body(self) -> Dict[str, Any]:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise BadRequest(f"the request is larger than {MAX_BODY // 1024} KiB")
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the request is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request must be a JSON object")
        return body


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 7860, quiet: bool = True) -> ServeHTTPServer:
    """Bind the server (``port=0``: any free port; ``server.server_address`` says which)."""
    return ServeHTTPServer((host, port), app, quiet=quiet)
