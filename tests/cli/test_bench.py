"""`deepforcing bench` at toy sizes: the command's sections run, the JSON has the documented layout, the plot is
written, and the measuring helpers are right. No timing is asserted (shared machines; see the bench itself)."""
import json

import pytest
import torch
from support import cpp_available

from deepforcing_kernels.bench import report
from deepforcing_kernels.bench.rollout import (
    POLICY_NAMES,
    cache_bytes,
    kv_bytes_in_use,
    kv_storage_bytes,
    paired_ratio,
    window_kv_bytes,
)
from deepforcing_kernels.bench.timing import interleaved, percentile, summarize
from deepforcing_kernels.cli import main


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    js, png = d / "bench.json", d / "bench.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy sizes: threads only add scheduling noise
    try:
        rc = main(["bench", "--tiny", "--profile", "--json", str(js), "--plot", str(png)])
    finally:
        torch.set_num_threads(threads)  # leave the session as we found it
    return rc, json.loads(js.read_text()), png


def test_bench_command_writes_schema(bench_run):
    rc, res, _ = bench_run
    assert rc == 0
    assert report.validate_schema(res) == []
    assert set(res["rollout"]) == set(POLICY_NAMES)
    assert set(res["model_rollout"]) == set(POLICY_NAMES)
    for pol, r in res["rollout"].items():
        assert r["per_block_s_median"] > 0 and r["per_block_s_p90"] >= r["per_block_s_median"]
        assert r["kv_cache_bytes_max"] >= r["kv_cache_bytes_at_window"] > 0
        assert len(r["series"]["block_s"]) == res["settings"]["rollout"]["num_frames"] // 3
    # ops: every row has the table's fields; SDPA is its own baseline
    assert res["ops"] and all({"impl", "time_s", "ratio_to_sdpa", "gflops"} <= set(r) for r in res["ops"])
    assert all(abs(r["ratio_to_sdpa"] - 1) < 1e-12 for r in res["ops"] if r["impl"] == "sdpa")
    assert {"cases", "geometry"} <= set(res["compression"])
    assert {"sliding", "deep_forcing", "deep_forcing_logits"} <= set(res["profile"])
    assert set(res["targets"]) == set(report.TARGETS)


def test_bench_rollout_semantics(bench_run):
    _, res, _ = bench_run
    ro = res["rollout"]
    # bounded policies stop growing at the window; full keeps growing; Deep Forcing attends to fewer frames
    assert ro["full"]["kv_cache_bytes_max"] > ro["full"]["kv_cache_bytes_at_window"]
    for p in ("sliding", "frame_sink", "deep_sink", "deep_forcing", "deep_forcing_logits"):
        assert ro[p]["kv_cache_bytes_max"] == ro[p]["kv_cache_bytes_at_window"]
        assert max(ro[p]["series"]["cache_frames"]) <= 21
    assert ro["deep_forcing_logits"]["attended_frames_mean"] < ro["sliding"]["attended_frames_mean"]
    assert ro["deep_forcing"]["attended_frames_mean"] < ro["sliding"]["attended_frames_mean"]
    # logits mode alternates 16 / 19 frames after the window (docs/spec.md section 3, step 4)
    af = ro["deep_forcing_logits"]["series"]["attended_frames"]
    assert af[7:9] == [16.0, 19.0]


def test_bench_plot_is_a_png(bench_run):
    _, _, png = bench_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_table_mentions_every_policy(bench_run):
    _, res, _ = bench_run
    text = report.format_all(res)
    for p in POLICY_NAMES:
        assert p in text
    assert "targets" in text


def test_cache_bytes_counts_storage_once():
    from deepforcing_kernels import CachePolicy, RopeSpec, StreamingKVCache

    c = StreamingKVCache(CachePolicy.sliding(), num_layers=2, batch_size=1, num_heads=2, head_dim=8,
                         tokens_per_frame=3, rope=RopeSpec.wan(8), dtype=torch.float32)
    kv = 2 * 2 * (21 + 3) * 3 * 2 * 8 * 4  # layers x (k, v) x capacity tokens x heads x D x 4 bytes
    meta = 2 * (21 + 3) * 3 * 8  # the int64 frame table of each layer
    assert kv <= cache_bytes(c) <= kv + meta + 4096
    assert kv_storage_bytes(c) == kv  # K and V only
    assert window_kv_bytes(c) == 2 * 21 * 3 * 2 * 2 * 8 * 4
    assert kv_bytes_in_use(c) == 0


def test_timing_helpers():
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2], 100) == 2
    s = summarize([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["n"] == 3
    calls = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert [len(v) for v in out.values()] == [3, 3] and calls[:2] == ["a", "b"] and calls[4:6] == ["b", "a"]
    res = {"sliding": {"series": {"block_s": [1, 2, 2, 2], "frame_end": [3, 24, 27, 30]}},
           "x": {"series": {"block_s": [9, 1, 1, 3], "frame_end": [3, 24, 27, 30]}}}
    assert paired_ratio(res, "x") == 0.5


def test_compression_bench_times_the_engine_step():
    """The bench's step is the engine's compress_step: after one call its storage holds sink, Top-C, recent."""
    from deepforcing_kernels.bench.compression import CompressionGeometry, _case_fns

    fns = _case_fns(2, torch.float32, "mass", CompressionGeometry(), "reference", 0)
    assert set(fns) == {"engine", "refill", "attention"}
    fns["engine"]()
    fns["attention"]()


def test_hotspot_rows_all_match_the_code():
    """Every row of the hotspot table names a function that exists and runs: profiled over the C++ and the
    reference backends, each row matches in one of them (a rename that blanks a row fails here)."""
    from deepforcing_kernels.bench.hotspots import PIECES, profile_policies
    from deepforcing_kernels.bench.rollout import RolloutConfig

    seen = set()
    backends = ("cpp", "reference") if cpp_available() else ("reference",)
    for be in backends:
        cfg = RolloutConfig(num_layers=1, num_heads=2, head_dim=16, tokens_per_frame=2, backend=be)
        res = profile_policies(("sliding", "deep_forcing", "deep_forcing_logits"), cfg, num_frames=30)
        seen |= {row["name"] for pol in res.values() for row in pol["rows"]}
        total = res["deep_forcing"]["rows"][0]
        assert total["name"].startswith("CacheLayer.attend") and total["share"] == 1.0
    expected = {label for label, *_ in PIECES}
    if not cpp_available():
        expected -= {label for label, func, file in PIECES if "_C." in func or "_cpp_" in func or
                     file == "cache/prepared.py"}  # the extension's pass helpers
    assert expected - seen == set()
