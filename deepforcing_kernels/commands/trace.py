"""`deepforcing trace`: run a cache policy's schedule alone (no model) and draw the cache over time.

A one-layer :class:`StreamingKVCache` with a tiny geometry is fed random queries, keys and values in the
driver's call pattern (5 passes per block at the block's start frame), so Participative Compression makes real,
data-dependent Top-C picks. After the first pass of each block (the cache that the block's other passes attend
to) it records, per slot: the frame the token came from, the temporal RoPE position it is attended at, and its
kind (sink / Top-C / recent / the block being generated). The picture has four panels:

1. slot kinds per block (x: the block's start frame f0, y: cache slot);
2. the source frame of every slot;
3. the temporal RoPE position minus f0 (the sink re-phased just behind the live context shows as a band
   that stays at a constant offset);
4. a Top-C selection-frequency strip: how often each source frame's tokens were kept as Top-C.

``--prefix N`` starts the stream with N given frames (image-to-video: 1; continuation: whole blocks, or 1 + whole
blocks), each written by one clean pass as the driver does; their slots are drawn as "prefix". With Deep Forcing
(and Deep Sink) the prefix frames are the sink: they stay for the whole stream, re-phased behind the live block.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..presets import POLICY_NAMES
from ._common import check_frames, check_output_file, fail, plot_format, require_matplotlib
from .generate import add_commit_rule, policy_name

KIND_CODES = {"empty": 0, "sink": 1, "topc": 2, "recent": 3, "block": 4, "prefix": 5, "memory": 6}
KIND_COLORS = ["#ffffff", "#3b6fb6", "#f08a24", "#59a14f", "#d62728", "#8e44ad", "#17becf"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="deep_forcing", type=policy_name,
                        help=f"cache policy: {', '.join(POLICY_NAMES)} (default deep_forcing; deep-forcing etc. accepted)")
    parser.add_argument("--score", default=None, choices=("mass", "logits"),
                        help="deep-forcing Top-C scoring (default mass)")
    add_commit_rule(parser)
    parser.add_argument("--frames", type=int, default=90, help="latent frames to trace, a multiple of 3 (default 90)")
    parser.add_argument("--tokens-per-frame", type=int, default=2, help="tokens per frame, 1..64 (default 2)")
    parser.add_argument("--plot", default="out/trace.png",
                        help="picture to write, exactly at this path (default out/trace.png); its extension picks "
                             "the format (png, pdf, svg, ...; PNG for any other). Needs matplotlib: "
                             'pip install "deepforcing_kernels[plot]"')
    parser.add_argument("--no-plot", action="store_true", help="print the text summary only (no matplotlib needed)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random queries, keys and values (default 0)")
    parser.add_argument("--prefix", type=int, default=0, metavar="N",
                        help="start the stream with N given frames (1: an image; else whole blocks of 3, or 1 + "
                             "whole blocks), written by clean passes; default 0")
    parser.add_argument("--lines", type=int, default=10,
                        help="blocks to describe in the text summary, >= 1 (default 10; the first and the last ones "
                             "when there are more)")


@dataclass
class CacheTrace:
    """The recorded schedule: one entry per block, each a list over slots (batch element 0)."""

    policy: Any
    tokens_per_frame: int
    starts: List[int] = field(default_factory=list)
    frames: List[List[int]] = field(default_factory=list)
    positions: List[List[int]] = field(default_factory=list)
    kinds: List[List[str]] = field(default_factory=list)
    #: under the commit rule, the frames each block's clean pass read (its committed frames), else empty
    committed: List[List[int]] = field(default_factory=list)

    @property
    def max_slots(self) -> int:
        return max((len(f) for f in self.frames), default=0)

    def topc_counts(self) -> Counter:
        """Source frame -> number of Top-C token slots it filled, summed over blocks."""
        c: Counter = Counter()
        for fr, kd in zip(self.frames, self.kinds):
            c.update(f for f, k in zip(fr, kd) if k == "topc")
        return c


def _kinds(layer: Any, policy: Any, frames: List[int]) -> List[str]:
    """Slot kinds from the cache (``layer.kinds()``); a cache without that accessor gets sink / recent from the
    frame numbers (Top-C cannot be told apart then)."""
    if hasattr(layer, "kinds"):
        k = layer.kinds()
        k = k[0] if len(k) and isinstance(k[0], (list, tuple)) else k
        return [str(x) for x in k]
    sink = getattr(policy, "sink_frames", 0) or 0
    return ["sink" if f < sink else "recent" for f in frames]


def _available_bytes() -> int:
    """Memory this process may still take: MemAvailable on Linux, else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_fits(frames: int, prefix: int, tokens_per_frame: int) -> None:
    """Refuse, before any work, a trace whose record cannot fit in memory. Measured with tracemalloc: about
    300 + 300 x tokens-per-frame bytes per traced frame while the cache holds ~21 frames; given frames stay in the
    cache (they are the sink), so each record grows with the prefix. Twice that is asked for."""
    need = 2 * (frames + prefix) * (300 + 300 * tokens_per_frame) * max(1.0, (prefix + 21) / 21)
    have = _available_bytes()
    if need > have:
        fail(f"--frames {frames} --prefix {prefix} --tokens-per-frame {tokens_per_frame}: the trace would need "
             f"about {need / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB available; trace fewer frames")


def trace_policy(policy: Any, num_frames: int, tokens_per_frame: int = 2, seed: int = 0,
                 passes_per_block: int = 5, prefix_frames: int = 0) -> CacheTrace:
    """Run ``policy`` on a one-layer cache with random q, k, v and record the layout after each block's first
    pass. ``num_frames`` (after the ``prefix_frames`` given frames) is rounded up to whole blocks; a given block
    gets one (clean) pass, a one-frame image its own block."""
    from ..cache import StreamingKVCache
    from ..rope import RopeSpec

    if tokens_per_frame <= 0 or num_frames <= 0:
        raise ValueError("tokens_per_frame and num_frames must be positive")
    H, D = 2, 48
    rope = RopeSpec.wan(D)
    if getattr(policy, "frame_tokens", None) is not None:
        # a window written in the authors' token frames (Rolling Sink's 1560) is drawn in those frames: the stand-in
        # tokens_per_frame only sets how many slots a frame is drawn with
        policy = dataclasses.replace(policy, frame_tokens=None)
    cache = StreamingKVCache(policy, num_layers=1, batch_size=1, num_heads=H, head_dim=D,
                             tokens_per_frame=tokens_per_frame, rope=rope, dtype=torch.float32,
                             frame_grid=(1, tokens_per_frame))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(seed)
    bf = policy.block_frames
    tr = CacheTrace(policy, tokens_per_frame)
    P = prefix_frames
    starts = ([0] if P % bf == 1 else []) + list(range(P % bf if P % bf == 1 else 0, P + num_frames, bf))
    for f0 in starts:
        frames = 1 if (f0 == 0 and P % bf == 1) else bf
        given = f0 < P
        npass = 1 if given else passes_per_block
        for p in range(npass):
            q, k, v = torch.randn(3, 1, frames * tokens_per_frame, H, D, generator=g).unbind(0)
            if cache.wants_pass_marks:  # the last pass of a block is its clean pass (a given block's only one)
                cache.mark_pass(clean=p == npass - 1)
            layer.attend(q, k, v, start_frame=f0)
            if p == npass - 1 and getattr(layer, "shadow", None) is not None:  # (tethercache: once the window is full)
                ruled = f0 + frames >= cache.policy.commit_from_frames
                tr.committed.append(layer.shadow.frames()[0, ::tokens_per_frame].tolist() if ruled else [])
            if p == 0:
                fr = layer.frames()[0].tolist()
                tr.starts.append(f0)
                tr.frames.append(fr)
                tr.positions.append(layer.positions()[0].tolist())
                kinds = _kinds(layer, policy, fr)
                # the block being generated is "recent" to the cache; draw it apart, and the given frames too
                tr.kinds.append(["block" if f >= f0 and kd != "memory" else
                                 "prefix" if f < P and kd not in ("topc", "memory") else kd
                                 for f, kd in zip(fr, kinds)])
    return tr


def _runs(frames: Sequence[int], positions: Sequence[int], kinds: Sequence[str], admitted: bool = False) -> str:
    """``0@5..9@14 | topc 4 tok from 10-15 | 17@17..20@20 | block 21@21..23@23`` (first token of each frame).
    ``admitted``: memory slots hold whole admitted frames (TetherCache), listed as ``memory 3@3,7@4,..``."""
    parts: List[str] = []
    i, n = 0, len(frames)
    while i < n:
        j = i
        while j < n and kinds[j] == kinds[i]:
            j += 1
        k = kinds[i]
        if k == "topc":
            srcs = sorted(set(frames[i:j]))
            parts.append(f"topc {j - i} tok from {len(srcs)} frames ({srcs[0]}..{srcs[-1]})")
        elif k == "memory" and admitted:  # TetherCache: the admitted frames, each at its contiguous position
            seen, items = set(), []
            for f, p in zip(frames[i:j], positions[i:j]):
                if f not in seen:
                    seen.add(f)
                    items.append(f"{f}@{p}")
            parts.append("memory " + ",".join(items))
        elif k == "memory":  # averages of evicted frames, not frames
            parts.append(f"memory@{positions[i]}..{positions[j - 1]}")
        else:
            seen, items = set(), []
            for f, p in zip(frames[i:j], positions[i:j]):
                if f not in seen:
                    seen.add(f)
                    items.append(f"{f}@{p}")
            txt = items[0] if len(items) == 1 else f"{items[0]}..{items[-1]}"
            parts.append(txt if k != "block" else f"[{txt}]")
        i = j
    return " | ".join(parts)


def summary(tr: CacheTrace, lines: int = 10) -> List[str]:
    """Short text description of a trace."""
    n = tr.tokens_per_frame
    out = [f"policy {tr.policy.kind}: {len(tr.starts)} blocks, {tr.tokens_per_frame} tokens/frame; "
           f"cache after each block's first pass (frame@position; [the block])"]
    prefix = sorted({f for fr, kd in zip(tr.frames, tr.kinds) for f, k in zip(fr, kd) if k == "prefix"})
    if prefix:
        held = [k for k in tr.kinds[-1] if k == "prefix"]
        out.append(f"prefix: frames {prefix[0]}..{prefix[-1]} given; " +
                   (f"{len(held) // tr.tokens_per_frame} of them still held at the end (the sink)" if held else
                    "none held at the end (this policy keeps no sink)"))
    if lines < 1:
        raise ValueError(f"lines must be >= 1, got {lines}")
    idx = list(range(len(tr.starts)))
    tail = 1 if lines < 4 else 2
    show = idx if len(idx) <= lines else idx[: lines - tail] + idx[-tail:]
    for bi in show:
        if len(show) < len(idx) and bi == idx[-tail]:
            out.append("  ...")
        line = (f"  f0={tr.starts[bi]:4d} {len(tr.frames[bi]) / n:5.1f} frames: "
                f"{_runs(tr.frames[bi], tr.positions[bi], tr.kinds[bi], tr.policy.kind == 'tethercache')}")
        if tr.committed:  # the commit rule: what the clean pass read instead (at the frames' own positions)
            c = tr.committed[bi]
            line += f"; clean pass reads {c[0]}..{c[-1]}" if c else ""
        out.append(line)
    sizes = [len(f) / n for f in tr.frames]
    out.append(f"cache frames: max {max(sizes):g}, last {sizes[-1]:g}")
    counts = tr.topc_counts()
    if counts:
        top = ", ".join(f"{f}:{c / n:g}" for f, c in counts.most_common(6))
        out.append(f"Top-C selection frequency (frames' worth, most picked): {top}")
    return out


def plot(tr: CacheTrace, path: str, title: Optional[str] = None) -> None:
    """Draw the trace (see the module docstring) to exactly ``path`` (format from the extension, else PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    nb, ns = len(tr.starts), tr.max_slots
    kinds = np.zeros((ns, nb), dtype=np.int64)
    frames = np.full((ns, nb), np.nan)
    rel = np.full((ns, nb), np.nan)
    for bi in range(nb):
        for s, (f, p, k) in enumerate(zip(tr.frames[bi], tr.positions[bi], tr.kinds[bi])):
            kinds[s, bi] = KIND_CODES.get(k, 3)
            frames[s, bi] = f
            rel[s, bi] = p - tr.starts[bi]
    f0s = np.array(tr.starts)
    bf = tr.policy.block_frames
    extent = (f0s[0] - 0.5 * bf, f0s[-1] + 0.5 * bf, -0.5, ns - 0.5)
    last = max(tr.starts) + bf

    fig, axes = plt.subplots(4, 1, figsize=(13, 13), gridspec_kw={"height_ratios": [3, 3, 3, 1.3]})
    common = dict(aspect="auto", origin="lower", extent=extent, interpolation="nearest")
    ax = axes[0]
    im = ax.imshow(kinds, cmap=ListedColormap(KIND_COLORS), vmin=-0.5, vmax=6.5, **common)
    cb = fig.colorbar(im, ax=ax, pad=0.01, ticks=range(7))
    cb.ax.set_yticklabels(["empty", "sink", "Top-C", "recent", "this block", "prefix (given)", "memory (EMA / admitted)"])
    ax.set_title("slot kind")
    ax = axes[1]
    im = ax.imshow(np.ma.masked_invalid(frames), cmap="viridis", vmin=0, vmax=last, **common)
    fig.colorbar(im, ax=ax, pad=0.01).set_label("source frame")
    ax.set_title("source frame of each slot")
    ax = axes[2]
    # Colour range: the live window (plus the sink gap) behind the block; older Top-C picks kept at their own
    # positions lie further back and saturate at the dark end.
    window = getattr(tr.policy, "window_frames", None)
    lo = -(window + 2 * bf) if window else (float(np.nanmin(rel)) if np.isfinite(rel).any() else -1.0)
    im = ax.imshow(np.ma.masked_invalid(rel), cmap="magma", vmin=lo, vmax=bf - 1, **common)
    fig.colorbar(im, ax=ax, pad=0.01, extend="min").set_label("position - f0")
    ax.set_title("temporal RoPE position relative to the block's start f0 (the block itself is 0..2)")
    for ax in axes[:3]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"cache slot ({tr.tokens_per_frame} per frame)")
        ax.set_xlabel("block start frame f0")
    ax = axes[3]
    counts = tr.topc_counts()
    xs = np.arange(last)
    ax.bar(xs, [counts.get(int(x), 0) / tr.tokens_per_frame for x in xs], width=1.0, color=KIND_COLORS[2])
    ax.set_xlim(-0.5, last - 0.5)
    ax.set_xlabel("source frame")
    ax.set_ylabel("Top-C picks\n(frames' worth)")
    ax.set_title("Top-C selection frequency" if counts else "Top-C selection frequency (this policy keeps no Top-C)")
    fig.suptitle(title or f"cache schedule: {_policy_label(tr.policy)}", fontsize=12)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=90, format=plot_format(path))
    plt.close(fig)


def _policy_label(policy: Any) -> str:
    d: Dict[str, Any] = policy.to_dict() if hasattr(policy, "to_dict") else {}
    keep = ("window_frames", "sink_frames", "budget_frames", "recent_frames", "score")
    extra = ", ".join(f"{k}={d[k]}" for k in keep if d.get(k) not in (None, 0))
    return f"{getattr(policy, 'kind', policy)}" + (f" ({extra})" if extra else "")


def run(args: argparse.Namespace) -> int:
    check_frames(args.frames)
    if not 1 <= args.tokens_per_frame <= 64:
        fail(f"--tokens-per-frame must be in 1..64 (a picture, not a benchmark), got {args.tokens_per_frame}")
    if args.lines < 1:
        fail(f"--lines must be >= 1, got {args.lines}")
    try:
        from .generate.common import policy_from_args

        policy = policy_from_args(args.policy, args.score, commit_rule=args.commit_rule)
    except ValueError as e:
        fail(str(e))
    if not args.no_plot:  # before the work, not after it
        require_matplotlib("--plot", "--no-plot")
        check_output_file(args.plot, "--plot")
    if args.prefix < 0 or args.prefix % policy.block_frames not in (0, 1):
        fail(f"--prefix must be 0, whole blocks of {policy.block_frames} frames, or 1 + whole blocks; got {args.prefix}")
    _check_fits(args.frames, args.prefix, args.tokens_per_frame)
    tr = trace_policy(policy, args.frames, args.tokens_per_frame, args.seed, prefix_frames=args.prefix)
    for line in summary(tr, args.lines):
        print(line)
    if not args.no_plot:
        plot(tr, args.plot)
        fmt = plot_format(args.plot)
        ext = os.path.splitext(args.plot)[1].lower().lstrip(".")
        print(f"wrote {args.plot}" + (f" ({fmt.upper()})" if ext != fmt else ""))
    return 0
