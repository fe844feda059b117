"""Tables, JSON and the plot of ``deepforcing bench``.

The JSON is ``{"machine", "settings", "ops": [...], "compression": {...}, "rollout": {POLICY: {...}},
"model_rollout": {POLICY: {...}}, "targets": {...}, "wall_s"}``; every ``rollout[POLICY]`` has at least
``per_block_s_median, per_block_s_p90, attended_frames_mean, kv_cache_bytes_at_window, kv_cache_bytes_max``.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping

from .rollout import POLICY_NAMES, paired_ratio, ratios_to

#: Targets of the benchmark issue, all ratios measured in the same run.
TARGETS = {
    "deep_forcing_logits_per_block_vs_sliding": 0.90,
    "deep_forcing_per_block_vs_sliding": 1.00,
    "bounded_kv_bytes_vs_window": 1.15,
    # every bounded policy (the other methods hold more than one window by design: Rolling Sink's bank, the commit
    # rule's copy): its K/V after the window filled never grows past what it held then
    "kv_growth_after_window": 1.01,
    "compression_step_vs_attention": 0.05,
    # paired per block after the window fills (same block index, run back to back): re-phasing is free, and
    # Deep Forcing's smaller window shows in the time (its target is this margin over its attended-frames ratio)
    "deep_sink_paired_vs_sliding": 1.02,
    "deep_forcing_paired_vs_sliding": 0.03,
}

WINDOW_SIZED = ("sliding", "frame_sink", "deep_sink", "deep_forcing", "deep_forcing_logits", "recency_forcing")

REQUIRED_ROLLOUT_KEYS = ("per_block_s_median", "per_block_s_p90", "attended_frames_mean",
                         "kv_cache_bytes_at_window", "kv_cache_bytes_max")


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:8.1f}"


# ---------------------------------------------------------------------------------------------- targets
def evaluate_targets(result: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the issue's targets on a bench result; every entry has ``value``, ``target`` and ``ok``.

    Time ratios use the per-block medians over the whole rollout (the JSON's ``per_block_s_median``); the
    paired per-block ratio (same block index, run back to back) after the window fills is reported beside it.
    """
    out: Dict[str, Any] = {}
    ro = result.get("rollout") or {}
    if "sliding" in ro:
        r = ratios_to(ro, "sliding")
        for pol, key in (("deep_forcing_logits", "deep_forcing_logits_per_block_vs_sliding"),
                         ("deep_forcing", "deep_forcing_per_block_vs_sliding")):
            if pol in r:
                out[key] = {"value": r[pol], "paired_steady": paired_ratio(ro, pol, "sliding"),
                            "target": TARGETS[key], "ok": r[pol] <= TARGETS[key]}
    if "sliding" in ro and "deep_sink" in ro:
        v = paired_ratio(ro, "deep_sink", "sliding")
        t = TARGETS["deep_sink_paired_vs_sliding"]
        out["deep_sink_paired_vs_sliding"] = {"value": v, "target": t, "ok": v <= t}
    if "sliding" in ro and "deep_forcing" in ro:
        v = paired_ratio(ro, "deep_forcing", "sliding")
        fr = steady_attended_ratio(ro, "deep_forcing", "sliding")
        t = fr + TARGETS["deep_forcing_paired_vs_sliding"]
        out["deep_forcing_paired_vs_sliding"] = {"value": v, "target": t, "frames_ratio": fr, "ok": v <= t}
    growth = {p: v["kv_cache_bytes_max"] / v["kv_cache_bytes_at_window"] for p, v in ro.items()
              if v.get("bounded") and v.get("kv_cache_bytes_at_window")}
    if growth:
        worst = max(growth, key=growth.get)
        out["kv_growth_after_window"] = {"value": growth[worst], "worst_policy": worst, "per_policy": growth,
                                         "target": TARGETS["kv_growth_after_window"],
                                         "ok": growth[worst] <= TARGETS["kv_growth_after_window"]}
    # the 1.15x-window target is the Self-Forcing / Deep Forcing family's (one window plus its bookkeeping)
    bounded = {p: v["bytes_ratio_max_to_window"] for p, v in ro.items() if v.get("bounded") and p in WINDOW_SIZED}
    if bounded:
        worst = max(bounded, key=bounded.get)
        state = {p: v.get("state_ratio_max_to_window") for p, v in ro.items() if v.get("bounded")}
        out["bounded_kv_bytes_vs_window"] = {"value": bounded[worst], "worst_policy": worst, "per_policy": bounded,
                                             "all_state_per_policy": state,
                                             "target": TARGETS["bounded_kv_bytes_vs_window"],
                                             "ok": bounded[worst] <= TARGETS["bounded_kv_bytes_vs_window"]}
    comp = result.get("compression")
    if comp and comp.get("cases"):
        largest = max(c["tokens_per_frame"] for c in comp["cases"])
        per_mode = {c["mode"]: c["ratio"] for c in comp["cases"] if c["tokens_per_frame"] == largest}
        worst = max(per_mode.values())
        out["compression_step_vs_attention"] = {
            "value": worst, "at_tokens_per_frame": largest, "per_mode": per_mode,
            "all_cases": {f"{c['mode']}@T{c['tokens_per_frame']}": c["ratio"] for c in comp["cases"]},
            "target": TARGETS["compression_step_vs_attention"], "ok": worst <= TARGETS["compression_step_vs_attention"]}
    return out


def steady_attended_ratio(results: Mapping[str, Mapping[str, Any]], policy: str, baseline: str = "sliding",
                          window_frames: int = 21) -> float:
    """Mean frames attended per pass by ``policy`` over the blocks after the window fills (those the paired ratio
    reads), over the same for ``baseline``."""
    def mean(p: str) -> float:
        s = results[p]["series"]
        xs = [a for a, f in zip(s["attended_frames"], s["frame_end"]) if f > window_frames] or s["attended_frames"]
        return sum(xs) / max(1, len(xs))

    return mean(policy) / mean(baseline)


# ---------------------------------------------------------------------------------------------- tables
def format_machine(machine: Mapping[str, Any]) -> str:
    ext = machine.get("cpp_extension")
    isa = ", ".join(machine.get("cpu_isa") or []) or "ISA unknown"
    gemm = (ext or {}).get("gemm") or {}
    cpp = (f"C++ ext yes (GEMM: bf16 {gemm.get('bfloat16', '?')}, fp32 {gemm.get('float32', '?')})" if ext
           else "C++ ext no")
    return (f"machine: {machine.get('cpu_model')} [{isa}] ({machine.get('cpu_count')} cpus, torch threads "
            f"{machine.get('torch_threads')}, OMP_WAIT_POLICY={machine.get('omp_wait_policy')}), torch "
            f"{machine.get('torch')}, {cpp}, CUDA {machine.get('cuda') or 'none'}")


def format_ops(rows: List[Mapping[str, Any]]) -> str:
    lines = ["ops: sink_attention vs SDPA and the bare GEMMs (q = 3 frames, 12 heads, D 128; rephase = 10-frame "
             "sink shifted 11)",
             f"{'dtype':<9}{'T/f':>5}{'KV f':>6}{'Lk':>6}  {'impl':<10}{'reph':>5}{'mass':>5}{'ms':>10}"
             f"{'x SDPA':>8}{'GFLOP/s':>9}"]
    for r in rows:
        fl = lambda b: "-" if b is None else ("on" if b else "off")  # noqa: E731
        lines.append(f"{r['dtype']:<9}{r['tokens_per_frame']:>5}{r['kv_frames']:>6}{r['lk']:>6}  {r['impl']:<10}"
                     f"{fl(r['rephase']):>5}{fl(r['mass']):>5}{r['time_s'] * 1e3:10.2f}{r['ratio_to_sdpa']:8.2f}"
                     f"{r['gflops']:9.1f}")
    return "\n".join(lines)


def format_compression(comp: Mapping[str, Any]) -> str:
    g = comp["geometry"]
    lines = [f"compression: one step (score, top-k, gather) at one layer vs the triggering pass's attention "
             f"({comp['dtype']}, augmented cache {g['aug_frames']} frames -> {g['budget_frames']}; "
             f"step = {comp['implementation']})",
             f"{'mode':<8}{'T/f':>5}{'step ms':>10}{'attn ms':>10}{'step/attn':>11}"]
    for c in comp["cases"]:
        lines.append(f"{c['mode']:<8}{c['tokens_per_frame']:>5}{c['compress_s'] * 1e3:10.3f}"
                     f"{c['attention_s'] * 1e3:10.2f}{100 * c['ratio']:10.2f}%")
    return "\n".join(lines)


def format_rollout(res: Mapping[str, Mapping[str, Any]], title: str) -> str:
    r = ratios_to(res, "sliding")
    lines = [title,
             f"{'policy':<21}{'blk med ms':>11}{'p90 ms':>10}{'x slid':>8}{'paired':>8}{'attn f':>8}"
             f"{'MiB@W':>9}{'MiB max':>9}{'max/W':>7}{'state/W':>8}"]
    for p in [x for x in POLICY_NAMES if x in res] + [x for x in res if x not in POLICY_NAMES]:
        v = res[p]
        pr = paired_ratio(res, p, "sliding") if "sliding" in res else float("nan")
        lines.append(f"{p:<21}{v['per_block_s_median'] * 1e3:11.1f}{v['per_block_s_p90'] * 1e3:10.1f}"
                     f"{r.get(p, float('nan')):8.3f}{pr:8.3f}{v['attended_frames_mean']:8.2f}"
                     f"{_mb(v['kv_cache_bytes_at_window']):>9}{_mb(v['kv_cache_bytes_max']):>9}"
                     f"{v['bytes_ratio_max_to_window']:7.3f}{v.get('state_ratio_max_to_window', float('nan')):8.3f}")
    lines.append("  x slid = median block time / sliding's; paired = median of per-block ratios after the window "
                 "fills (same block index, run back to back); MiB = allocated K/V storage; max/W = its max / the K+V "
                 "bytes of a 21-frame window; state/W = the same with all the cache's tensors (K/V + bookkeeping)")
    return "\n".join(lines)


def format_targets(t: Mapping[str, Any], machine: Mapping[str, Any] = None) -> str:
    on = ""
    if machine:
        isa = ", ".join(machine.get("cpu_isa") or [])
        on = f" on {machine.get('cpu_model')}{f' [{isa}]' if isa else ''}, {machine.get('torch_threads')} torch threads"
    lines = [f"targets (same-run ratios{on}):"]
    for k, v in t.items():
        extra = ""
        if "frames_ratio" in v:
            extra = f" (frames attended {v['frames_ratio']:.3f}x sliding's, + 0.03)"
        if "paired_steady" in v:
            extra = f" (paired, steady: {v['paired_steady']:.3f})"
        if "worst_policy" in v:
            extra = f" (worst: {v['worst_policy']})"
        if "at_tokens_per_frame" in v:
            extra = f" (worst mode at {v['at_tokens_per_frame']} tokens/frame)"
        lines.append(f"  {k:<44} {v['value']:.3f} <= {v['target']:.2f}  {'OK' if v['ok'] else 'MISSED'}{extra}")
    return "\n".join(lines)


def format_profile(prof: Mapping[str, Any]) -> str:
    lines = ["where the time goes (cProfile of one policy's rollout, cumulative seconds, share of attend()):"]
    for pol, rows in prof.items():
        lines.append(f"  {pol}:")
        for r in rows["rows"]:
            lines.append(f"    {r['name']:<40}{r['calls']:>7}{r['cum_s']:9.3f} s {100 * r['share']:6.1f} %")
    return "\n".join(lines)


def format_all(result: Mapping[str, Any]) -> str:
    parts = [format_machine(result["machine"])]
    if result.get("ops"):
        parts.append(format_ops(result["ops"]))
    if result.get("compression"):
        parts.append(format_compression(result["compression"]))
    if result.get("rollout"):
        s = result["settings"]["rollout"]
        parts.append(format_rollout(result["rollout"], (
            f"rollout: cache + attention path, {s['num_frames']} latent frames, {s['num_layers']} layers x "
            f"{s['passes']} passes per block, {s['num_heads']} heads, D {s['head_dim']}, {s['tokens_per_frame']} "
            f"tokens/frame, {s['dtype']}, policies interleaved layer by layer, on {result['machine'].get('cpu_model')} "
            f"with {result['machine'].get('torch_threads')} torch threads")))
    if result.get("model_rollout"):
        s = result["settings"]["model_rollout"]
        parts.append(format_rollout(result["model_rollout"], (
            f"rollout: tiny full model (WanConfig.tiny(), generate), {s['num_frames']} latent frames")))
    if result.get("profile"):
        parts.append(format_profile(result["profile"]))
    if result.get("targets"):
        parts.append(format_targets(result["targets"], result.get("machine")))
    if result.get("wall_s") is not None:
        parts.append(f"wall time: {result['wall_s']:.1f} s")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------- json
def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(result: Mapping[str, Any], path: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1, allow_nan=False)


def validate_schema(result: Mapping[str, Any], policies=POLICY_NAMES) -> List[str]:
    """Problems with a bench result's layout (empty list: fine). Used by the tests."""
    errs: List[str] = []
    for key in ("ops", "compression", "rollout"):
        if key not in result:
            errs.append(f"missing top-level key {key!r}")
    if not isinstance(result.get("ops", []), list):
        errs.append("ops must be a list")
    if not isinstance(result.get("compression", {}), dict):
        errs.append("compression must be an object")
    ro = result.get("rollout") or {}
    for p in policies:
        if p not in ro:
            errs.append(f"rollout lacks policy {p!r}")
            continue
        for k in REQUIRED_ROLLOUT_KEYS:
            if k not in ro[p]:
                errs.append(f"rollout[{p!r}] lacks {k!r}")
    return errs


# ---------------------------------------------------------------------------------------------- plot
#: One colour per policy, fixed, so every plot reads the same (Deep Forcing in strong colours).
COLORS = {"full": "#7f7f7f", "sliding": "#1f77b4", "frame_sink": "#17becf", "deep_sink": "#9467bd",
          "deep_forcing": "#d62728", "deep_forcing_logits": "#ff7f0e"}
STYLES = {"full": ":", "sliding": "-", "frame_sink": "-", "deep_sink": "-", "deep_forcing": "-",
          "deep_forcing_logits": "--"}


def plot(result: Mapping[str, Any], path: str, *, window_frames: int = 21) -> None:
    """Per-block time and cache size over the rollout, one line per policy (matplotlib, Agg backend).

    Rows: (1) the cache + attention rollout's block time, absolute and divided by sliding's time for the same
    block (the policies ran back to back, so this ratio cancels the load of a shared machine: the picture of
    "Deep Forcing stays flat and cheap"); (2) K/V bytes held and allocated against the window and the 1.15x bound,
    and the frames each block attends to; (3) the same two time panels for the tiny full model. ``full`` grows
    without bound, so axes are clipped a little above the bounded policies and ``full`` runs off the top, its
    final value written at the edge.
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ro = result.get("rollout") or {}
    mo = result.get("model_rollout") or {}
    nrows = 3 if mo else 2
    fig, axes = plt.subplots(nrows, 2, figsize=(14, 4.3 * nrows + 0.6), squeeze=False)
    s = (result.get("settings") or {}).get("rollout", {})
    fig.suptitle(f"deepforcing bench: {s.get('num_layers', '?')} layers x {s.get('passes', '?')} passes, "
                 f"{s.get('num_heads', '?')} heads x D {s.get('head_dim', '?')}, {s.get('tokens_per_frame', '?')} "
                 f"tokens/frame, {s.get('dtype', '?')}; {result.get('machine', {}).get('cpu_model', '')}",
                 fontsize=11)

    def rolling_median(y, w=5):
        h = w // 2
        return [sorted(y[max(0, i - h):i + h + 1])[len(y[max(0, i - h):i + h + 1]) // 2] for i in range(len(y))]

    def with_relative(res):
        """Add ``rel_block`` (block time / sliding's time for the same block) to every series."""
        if "sliding" not in res:
            return res
        base = res["sliding"]["series"]["block_s"]
        out = {}
        for p, v in res.items():
            ser = dict(v["series"])
            ser["rel_block"] = [a / b if b else float("nan") for a, b in zip(ser["block_s"], base)]
            out[p] = dict(v, series=ser)
        return out

    def draw(ax, res, key, scale, ylabel, title, clip_to_bounded=True, hline=None, smooth=False, unit="",
             lim_pad=1.35):
        top = 0.0
        for p in [x for x in POLICY_NAMES if x in res]:
            ser = res[p]["series"]
            x, y = ser["frame_end"], [v * scale for v in ser[key]]
            lw = 2.2 if p.startswith("deep_forcing") else 1.5
            if smooth and len(y) >= 5:
                # raw blocks faint (noise of a shared machine), a 5-block rolling median bold: the trend
                ax.plot(x, y, STYLES.get(p, "-"), color=COLORS.get(p), lw=0.6, alpha=0.3)
                y = rolling_median(y)
            ax.plot(x, y, STYLES.get(p, "-"), color=COLORS.get(p), lw=lw, label=p, alpha=0.95)
            if res[p].get("bounded", p != "full"):
                top = max(top, max(y))
        if hline is not None:
            ax.axhline(hline[0], color="k", lw=0.8, ls="--")
            ax.text(ax.get_xlim()[0], hline[0], " " + hline[1], va="bottom", fontsize=8)
        if clip_to_bounded and top > 0 and "full" in res:
            lim = top * lim_pad
            ax.set_ylim(0, lim)
            fy = res["full"]["series"][key][-1] * scale
            if fy > lim:
                ax.annotate(f"full -> {fy:.3g}{unit} (off scale)", xy=(res["full"]["series"]["frame_end"][-1], lim),
                            xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8,
                            color=COLORS["full"])
        else:
            ax.set_ylim(bottom=0)
        ax.axvline(window_frames, color="0.6", lw=0.8)
        ax.set_xlabel("latent frames generated")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)

    def time_pair(row, res, what):
        draw(axes[row][0], res, "block_s", 1e3, "ms per block (5 passes x all layers)" if row == 0 else "ms per block",
             f"{what}: time per block (bold: 5-block rolling median)", smooth=True, unit=" ms")
        rel = with_relative(res)
        if "sliding" in res:
            draw(axes[row][1], rel, "rel_block", 1.0, "block time / sliding's, same block",
                 f"{what}: time relative to sliding (shared load cancels)", smooth=True, lim_pad=1.25, unit="x",
                 hline=(1.0, "sliding"))
            lo, hi = axes[row][1].get_ylim()
            axes[row][1].set_ylim(0.5, max(hi, 1.2))  # zoom on the +-50 % band where the policies differ
        axes[row][0].legend(fontsize=8, ncol=2, loc="upper left")

    if ro:
        time_pair(0, ro, "cache + attention")
        wb = next(iter(ro.values())).get("window_kv_bytes")
        ax = axes[1][0]
        draw(ax, ro, "bytes_in_use", 2 ** -20, "MiB of K/V (all layers)",
             "cache + attention: K/V held (bold) and allocated (thin)",
             hline=(wb * 2 ** -20, "K+V of a 21-frame window") if wb else None, unit=" MiB")
        for p in [x for x in POLICY_NAMES if x in ro and x != "full"]:
            ser = ro[p]["series"]
            ax.plot(ser["frame_end"], [v * 2 ** -20 for v in ser["bytes_alloc"]], "-", color=COLORS.get(p), lw=0.9,
                    alpha=0.7)
        if wb:
            ax.axhline(1.15 * wb * 2 ** -20, color="r", lw=0.8, ls=":")
            ax.text(ax.get_xlim()[1], 1.15 * wb * 2 ** -20, "1.15 x window (bound) ", va="bottom", ha="right",
                    fontsize=8, color="r")
        draw(axes[1][1], ro, "attended_frames", 1.0, "frames attended (mean over passes)",
             "frames each block attends to (mean over its 5 passes)", unit=" frames")
    if mo:
        time_pair(2, mo, "tiny full model")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from ..plotting import plot_format

    fig.savefig(path, dpi=110, format=plot_format(path))  # exactly `path`, even without an extension
    plt.close(fig)
