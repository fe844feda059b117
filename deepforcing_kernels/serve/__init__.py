"""``deepforcing serve``: watch and steer a stream live in the browser.

* :mod:`.app` -- sessions (one per tab), the bounded set of running streams and the queue, input checks, the
  mp4 each run leaves in its session's own temporary folder;
* :mod:`.http` -- the standard library's ``ThreadingHTTPServer``: the page, JSON commands and one Server-Sent
  Events stream per tab (frames as PNG or JPEG data, pushed as each block is decoded);
* :mod:`.page` -- the single HTML page.

The streams are :class:`~deepforcing_kernels.steering.LiveStream` objects: the command line's own pipeline and
mp4 writer, steered between blocks. Nothing here needs more than the ``video`` extra.
"""
from .app import BadRequest, PipelineSource, ServeApp, ServeOptions, Session
from .http import ServeHTTPServer, make_server

__all__ = ["ServeApp", "ServeOptions", "PipelineSource", "Session", "BadRequest", "make_server",
           "ServeHTTPServer"]
