"""Helpers of the `deepforcing serve` tests: an in-process server on a free port, a small Server-Sent Events
client, JSON commands, and the decoding of the frames the page receives."""
import base64
import http.client
import io
import json
import time

import numpy as np

from deepforcing_kernels.serve import browser

LAT = (4, 4)  # latent size of the tiny model here -> 32 x 32 video


def start_server(**options):
    """A running server (``server.url``, ``server.app``, ``server.logs``: the error lines it logged)."""
    return browser.start_server(**{"latent_size": LAT, **options})


def request(srv, method, path, body=None, raw=None, headers=None):
    """(status, parsed JSON or bytes) of one request."""
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    c.request(method, path, body=data, headers=headers or {})
    r = c.getresponse()
    out = r.read()
    c.close()
    if r.getheader("Content-Type", "").startswith("application/json"):
        return r.status, json.loads(out)
    return r.status, out


class Events:
    """One tab's event stream: ``sid``, ``next(kind)`` (the next event of that kind, skipping others)."""

    def __init__(self, srv):
        host, port = srv.server_address[:2]
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.seen = []
        self.sid = self.next("hello")["session"]

    def read(self):
        kind, data = None, None
        while True:
            line = self.resp.fp.readline()
            if not line:
                raise EOFError("the event stream ended")
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and kind is not None:
                self.seen.append((kind, data))
                return kind, data

    def next(self, kind, until=None):
        while True:
            k, d = self.read()
            if k == kind or (until and k in until):
                return d

    def post(self, srv, cmd, **body):
        return request(srv, "POST", "/api/" + cmd, {"session": self.sid, **body})

    def close(self):
        try:
            self.resp.fp.raw._sock.close()  # drop the connection as a closed tab does
        except Exception:  # noqa: BLE001
            pass
        self.resp.close()
        self.conn.close()


def decode_blocks(sprites):
    """Blocks as the page gets them (``{"sprite" or "url": data URL, "count": T}``: T frames stacked top to
    bottom, PNG) -> uint8 [sum T, H, W, 3]."""
    from PIL import Image

    out = []
    for b in sprites:
        url = b.get("sprite") or b["url"]
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        out.append(im.reshape(b["count"], im.shape[0] // b["count"], im.shape[1], 3))
    return np.concatenate(out)


def wait_for(cond, timeout=30.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return False
