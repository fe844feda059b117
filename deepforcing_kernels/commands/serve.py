"""`deepforcing serve`: a page to watch and steer streams live (prompt, policy, seed, length; Start / Stop /
Pause; a prompt switch at the next block boundary, with or without re-cache; the cache of each block; the mp4).

The model and its weights are fixed here, at start (``--model tiny`` by default; ``--weights`` and
``--checkpoint`` as for ``generate``), never from the page. It binds 127.0.0.1 unless ``--host`` says otherwise;
each tab gets its own stream, at most ``--max-streams`` at once (the others are told they are queued). See
:mod:`deepforcing_kernels.serve`.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..presets import BACKEND_NAMES, DTYPE_NAMES, MODEL_NAMES
from ._common import check_positive, fail, set_threads

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .generate import model_name

    parser.add_argument("--model", default="tiny", type=model_name,
                        help=f"model: {', '.join(MODEL_NAMES)} (default tiny: random weights from the page's seed, "
                             "as generate --model tiny; the video is noise)")
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="a Wan2.1-T2V folder (original or diffusers layout), as for generate")
    parser.add_argument("--checkpoint", default=None, metavar="FILE", help="the causal DiT's weights, as for generate")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--max-streams", type=int, default=None, metavar="N",
                        help="streams generated at once; more tabs wait in a queue (default 1 on CPU, 2 on a GPU)")
    parser.add_argument("--max-frames", type=int, default=960, metavar="N",
                        help="the longest stream the page may ask for, in latent frames (default 960)")
    parser.add_argument("--frames", type=int, default=30, help="the page's default length (latent frames, default 30)")
    parser.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="latent height and width (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype (default float32)")
    parser.add_argument("--cache-dtype", default=None, choices=DTYPE_NAMES, help="KV cache dtype (default: --dtype)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="attention backend (default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default as generate: 1 for the tiny model on CPU)")
    parser.add_argument("--fps", type=float, default=16.0, help="frames per second of the mp4 and of playback")
    parser.add_argument("--frame-format", default="png", choices=("png", "jpeg"),
                        help="how frames travel to the page: png (lossless, default) or jpeg (smaller)")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    check_positive(args.max_streams, "--max-streams")
    check_positive(args.max_frames, "--max-frames")
    check_positive(args.threads, "--threads")
    if not 0 <= args.port <= 65535:
        fail(f"--port must be in [0, 65535], got {args.port}")
    if args.frames <= 0 or args.frames % 3 or args.frames > args.max_frames:
        fail(f"--frames must be a positive multiple of 3 up to --max-frames ({args.max_frames}), got {args.frames}")
    if not args.fps > 0:
        fail(f"--fps must be positive, got {args.fps}")
    if args.latent_size and (min(args.latent_size) <= 0 or any(v % 2 for v in args.latent_size)):
        fail(f"--latent-size {args.latent_size[0]} {args.latent_size[1]}: both must be positive multiples of 2")
    # the checks above need no torch: a bad number is one line at once; the imports below take seconds
    from ..serve import PipelineSource, ServeApp, ServeOptions, make_server
    from .generate.common import check_backend, check_device, threads_for

    device = check_device(args.device)
    check_backend(args.backend, device)
    if args.weights is None:
        if args.model != "tiny":
            fail(f"--model {args.model} needs --weights DIR; --model tiny runs the embedded tiny random model")
        if args.checkpoint is not None:
            fail("--checkpoint needs --weights DIR for the text encoder and the VAE")
    elif not os.path.isdir(args.weights):
        fail(f"--weights {args.weights}: " + ("is a file, not a folder" if os.path.exists(args.weights)
                                               else "no such folder"))
    opts = ServeOptions(model=args.model, weights=args.weights, checkpoint=args.checkpoint, dtype=args.dtype,
                        cache_dtype=args.cache_dtype, device=str(device), backend=args.backend,
                        latent_size=tuple(args.latent_size) if args.latent_size else None,
                        max_streams=args.max_streams or (2 if device.type == "cuda" else 1),
                        max_frames=args.max_frames, default_frames=args.frames, fps=args.fps,
                        frame_format=args.frame_format)
    set_threads(threads_for(args, device))
    try:
        from PIL import Image  # noqa: F401 - frames travel as images
    except ImportError:
        fail('serve needs Pillow and the video libraries: pip install "deepforcing_kernels[serve]"')
    source = PipelineSource(opts)
    try:
        source.load()  # bad weights fail now, not in the page
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    from ..runio.host import limit_malloc_arenas

    limit_malloc_arenas()  # each stream runs in a thread of its own: without a cap each may keep an arena
    app = ServeApp(opts, source)
    try:
        server = make_server(app, args.host, args.port, quiet=not args.verbose)
    except OSError as e:
        fail(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})")
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    try:  # from the line on, Ctrl-C stops it cleanly
        print(f"deepforcing serve: http://{shown}:{port}/  (model {args.model}"
              f"{'' if args.weights else ', random weights'}; {opts.max_streams} stream(s) at once; Ctrl-C stops)",
              file=sys.stderr, flush=True)
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("deepforcing serve: stopping", file=sys.stderr)
    finally:
        server._stopping.set()
        app.shutdown()
        server.server_close()
    return 0
