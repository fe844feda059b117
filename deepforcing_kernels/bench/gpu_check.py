"""``deepforcing gpu-check``: one call that turns a few minutes on one CUDA GPU into every figure users ask for.

Four sections, each time-boxed (a section that runs out of time stops starting new items and says so with
``"truncated": true``; an error in one section is recorded in its ``"error"`` and the others still run):

1. ``correctness`` — every Triton variant (re-phasing none / sink / per-key, with and without the mass pass; fp16
   and bf16) on CUDA against the float64 oracle with the docs/spec.md section 7 budget (``err <= 2 * err_torch + 1e-5``),
   on the adversarial shapes of the tests and on the production shape; then a 60-block cache rollout
   (``deep_forcing``, float32) on CUDA against the same rollout on CPU with the reference backend.
2. ``op_timing`` — the op at the production shape (q 3 x 1560 tokens, KV 16 / 19 / 21 frames x 1560, 12 heads,
   D 128, bf16) plain, re-phased and re-phased + mass: time, TFLOP/s (``4 * B * H * Lq * Lk * D`` per call, the
   mass pass not counted), and the ratio of each peer to the Triton op: torch SDPA with the flash and cuDNN
   backends, FlexAttention (compiled) on pre-rotated keys, flash-attn when importable.
3. ``model`` — the 1.3B model (random weights, bf16, 480 x 832: 1560 tokens per frame) rolled out for ``sliding``,
   ``deep_forcing`` and the ``release`` baseline (:class:`~deepforcing_kernels.bench.rollout.ReleaseCache`), 5
   passes per block as the driver does; per-block time, frames per second as the paper counts them, peak memory;
   eager and with ``torch.compile`` (each transformer block compiled with inductor; the cache call, whose
   host-side schedule and in-place compaction gain nothing from compilation, stays eager behind
   ``torch.compiler.disable``).
   **FPS rule**: decoded video frames per second, counting 4 video frames per latent frame (the VAE maps
   ``F`` latent frames to ``1 + 4 (F - 1)`` video frames; in steady state each 3-frame block adds 12), so
   ``fps = 12 / per_block_s`` without the VAE and ``12 / (per_block_s + vae_block_s)`` with it (``vae_block_s``:
   the streaming decode of one 3-frame block by a random full-size Wan VAE, when diffusers is installed).
4. ``env`` — GPU name, capability, driver, memory, clocks (``nvidia-smi`` when present), torch / triton / CUDA
   versions.

``--dry-run`` runs every step at tiny sizes on CPU (Triton under ``TRITON_INTERPRET=1``, SDPA's default CPU kernel
for the "flash" / "cuDNN" rows, FlexAttention eager, a tiny model) so CI keeps the command working; its figures
mean nothing. The JSON schema is documented in ``docs/gpu_check_schema.md``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

from .gpu_check_report import env_info, format_markdown, write_outputs  # noqa: F401  (re-exported)

SCHEMA = "deepforcing_kernels.gpu_check/1"
FPS_RULE = ("decoded video frames per second: 4 video frames per latent frame (steady state; the VAE gives "
            "1 + 4 (F - 1) frames for F latent frames), i.e. 12 frames per 3-frame block / per-block seconds")
VIDEO_FRAMES_PER_BLOCK = 12


@dataclass
class Plan:
    """Sizes and time boxes of one run mode."""

    mode: str  # "full" | "quick" | "dry-run"
    device: str
    tokens_per_frame: int
    heads: int
    head_dim: int
    kv_frames: tuple
    q_frames: int
    rollout_blocks: int
    rollout_passes: int
    rollout_tokens: int
    timing_reps: int
    model: str  # "wan_1_3b" | "tiny"
    model_blocks: int
    compile_model: bool
    budget_s: Dict[str, float]

    @classmethod
    def make(cls, mode: str) -> "Plan":
        if mode == "dry-run":
            return cls(mode, "cpu", 4, 2, 32, (4,), 3, 8, 2, 2, 1, "tiny", 1, True,
                       dict(correctness=40, op_timing=20, model=40))
        quick = mode == "quick"
        return cls(mode, "cuda", 1560, 12, 128, (21,) if quick else (16, 19, 21), 3, 60, 5, 16, 5 if quick else 20,
                   "wan_1_3b", 4 if quick else 8, True,
                   dict(correctness=50, op_timing=50, model=110) if quick else
                   dict(correctness=90, op_timing=120, model=230))


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def out(self) -> bool:
        return self.left() <= 0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], device: str, reps: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------------------------------------- 1. correctness
def _cases(plan: Plan):
    """``(name, B, Lq, Lk, Hq, Hkv, D, rope_name, kwargs builder)`` of the correctness section."""
    adversarial = [
        ("plain", 2, 37, 53, 4, 2, 64, None, lambda B, Lk: {}),
        ("sink_straddles", 2, 37, 53, 4, 2, 64, "wan", lambda B, Lk: dict(sink_len=20, sink_shift=3)),
        ("sink_all_keys", 2, 37, 53, 4, 2, 64, "wan", lambda B, Lk: dict(sink_len=Lk, sink_shift=-7)),
        ("sink_huge_shift", 2, 37, 53, 4, 2, 64, "llama", lambda B, Lk: dict(sink_len=40, sink_shift=10 ** 15)),
        ("per_key", 2, 37, 53, 4, 2, 64, "llama",
         lambda B, Lk: dict(key_shift=torch.randint(-300_000, 300_000, (B, Lk)))),
        ("d128_wan_sink", 1, 19, 45, 12, 12, 128, "wan", lambda B, Lk: dict(sink_len=30, sink_shift=100_003)),
    ]
    if plan.mode == "dry-run":
        adversarial = [("plain", 1, 9, 20, 2, 1, 32, None, lambda B, Lk: {}),
                       ("sink_straddles", 1, 9, 20, 2, 1, 32, "wan", lambda B, Lk: dict(sink_len=7, sink_shift=3)),
                       ("per_key", 1, 9, 20, 2, 1, 32, "llama",
                        lambda B, Lk: dict(key_shift=torch.randint(-9, 9, (B, Lk))))]
    n = plan.tokens_per_frame
    lq = plan.q_frames * n if plan.mode == "full" else n  # the oracle in float64 is the cost: one frame in quick
    lk = plan.kv_frames[-1] * n
    production = [("production_sink", 1, lq, lk, plan.heads, plan.heads, plan.head_dim, "wan",
                   lambda B, Lk: dict(sink_len=min(10 * n, Lk), sink_shift=6)),
                  ("production_plain", 1, lq, lk, plan.heads, plan.heads, plan.head_dim, "wan", lambda B, Lk: {})]
    return adversarial + production


def check_correctness(plan: Plan, log: Callable[[str], None]) -> Dict[str, Any]:
    """Section 1: every variant against the oracle, then the cache rollout against the CPU reference."""
    from .. import RopeSpec, sink_attention
    from ..testing import ATOL, budget_report

    clock = _Clock(plan.budget_s["correctness"] * 0.6)
    dev = plan.device
    rows: List[Dict[str, Any]] = []
    truncated = False
    g = torch.Generator().manual_seed(0)
    for name, B, Lq, Lk, Hq, Hkv, D, rope_name, kw_fn in _cases(plan):
        for dtype in (torch.float16, torch.bfloat16):
            for with_mass in (False, True):
                if clock.out():
                    truncated = True
                    break
                q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).to(dev)
                k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).to(dev)
                v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).to(dev)
                rope = None if rope_name is None else getattr(RopeSpec, rope_name)(D)
                kw = kw_fn(B, Lk)
                if "key_shift" in kw:
                    kw["key_shift"] = kw["key_shift"].to(dev)
                mq = (Lq // 3, Lq) if with_mass else None
                t0 = time.perf_counter()
                row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "mass": with_mass,
                       "shape": {"B": B, "Lq": Lq, "Lk": Lk, "Hq": Hq, "Hkv": Hkv, "D": D},
                       "variant": "none" if not kw or kw.get("sink_len") == 0 else
                       ("perkey" if "key_shift" in kw else "sink"), "errors": {}, "error": None}
                try:
                    res = sink_attention(q, k, v, rope=rope, return_lse=True, return_mass=with_mass,
                                         mass_q_range=mq, backend="triton", **kw)
                    rep = budget_report(res, q, k, v, rope=rope, mass_q_range=mq, **kw)
                    row["errors"] = {o: {"err": e, "err_torch": et, "budget": 2 * et + ATOL}
                                     for o, (e, et) in rep.items()}
                except Exception as e:  # noqa: BLE001 - e.g. out of memory in the float64 oracle: reported
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                row["wall_s"] = time.perf_counter() - t0
                row["ok"] = row["error"] is None and all(x["err"] <= x["budget"] for x in row["errors"].values())
                rows.append(row)
                del q, k, v
    log(f"  correctness: {sum(r['ok'] for r in rows)}/{len(rows)} variants within budget")
    rollout = _rollout_vs_reference(plan, _Clock(max(clock.left(), 0) + plan.budget_s["correctness"] * 0.4))
    log(f"  rollout: {rollout['blocks']} blocks, max |diff| {rollout['max_abs_diff']:.2e}, ok={rollout['ok']}")
    return {"cases": rows, "rollout": rollout, "truncated": truncated,
            "ok": bool(rows) and all(r["ok"] for r in rows) and rollout["ok"]}


def _rollout_vs_reference(plan: Plan, clock: _Clock) -> Dict[str, Any]:
    """The same deep_forcing stream (float32, mass scoring) on the device (Triton) and on CPU (reference)."""
    from .. import RopeSpec
    from ..cache import CachePolicy, StreamingKVCache

    H, D, n = 2, 64, plan.rollout_tokens
    tol = 1e-3  # float32: kernel vs oracle differ by ~1e-6 per pass; Top-C picks must then agree exactly
    rope = RopeSpec.wan(D)
    mk = dict(num_layers=1, batch_size=1, num_heads=H, head_dim=D, tokens_per_frame=n, rope=rope,
              dtype=torch.float32)
    dev_cache = StreamingKVCache(CachePolicy.deep_forcing(), device=plan.device, backend="triton", **mk)
    ref_cache = StreamingKVCache(CachePolicy.deep_forcing(), device="cpu", backend="reference", **mk)
    g = torch.Generator().manual_seed(1)
    worst, frames_equal, blocks = 0.0, True, 0
    for blk in range(plan.rollout_blocks):
        if clock.out():
            break
        f0 = 3 * blk
        for _ in range(plan.rollout_passes):
            q, k, v = torch.randn(3, 1, 3 * n, H, D, generator=g).unbind(0)
            a = dev_cache.layers[0].attend(q.to(plan.device), k.to(plan.device), v.to(plan.device), start_frame=f0)
            b = ref_cache.layers[0].attend(q, k, v, start_frame=f0)
            worst = max(worst, (a.cpu() - b).abs().max().item())
        frames_equal = frames_equal and torch.equal(dev_cache.layers[0].frames().cpu(), ref_cache.layers[0].frames())
        blocks += 1
    return {"policy": "deep_forcing", "dtype": "float32", "blocks": blocks, "blocks_planned": plan.rollout_blocks,
            "passes_per_block": plan.rollout_passes, "tokens_per_frame": n, "max_abs_diff": worst, "tol": tol,
            "frames_equal": frames_equal, "ok": blocks > 0 and frames_equal and worst <= tol}


# ---------------------------------------------------------------------------------------------- 2. op timing
def time_ops(plan: Plan, log: Callable[[str], None]) -> Dict[str, Any]:
    """Section 2: the op and its peers at the production shape."""
    from .. import RopeSpec
    from ..rotation import rephase, rotation_tables
    from ..triton.op import sink_attention_cuda

    if plan.device == "cuda":  # the registered op, dispatcher included: what users call
        from .. import ops  # noqa: F401  (defines it)

        op_fn = torch.ops.deepforcing.sink_attention.default
    else:  # dry-run: the dispatcher would route CPU tensors to the C++ kernel
        op_fn = sink_attention_cuda
    clock = _Clock(plan.budget_s["op_timing"])
    dev, n, H, D = plan.device, plan.tokens_per_frame, plan.heads, plan.head_dim
    dtype = torch.bfloat16
    rope = RopeSpec.wan(D)
    Lq = plan.q_frames * n
    peers = _peers(dev)
    rows: List[Dict[str, Any]] = []
    truncated = False
    g = torch.Generator(device=dev).manual_seed(0)
    for kvf in plan.kv_frames:
        Lk = kvf * n
        q = torch.randn(1, Lq, H, D, device=dev, generator=g).to(dtype)
        k = torch.randn(1, Lk, H, D, device=dev, generator=g).to(dtype)
        v = torch.randn(1, Lk, H, D, device=dev, generator=g).to(dtype)
        sink = min(10, kvf) * n
        k_rot = rephase(k, rope, torch.tensor([6] * sink + [0] * (Lk - sink), device=dev))  # pre-rotated keys
        flops = 4.0 * Lq * Lk * H * D
        qt, kt, vt, krt = (x.transpose(1, 2) for x in (q, k, v, k_rot))
        for case, rephased, mass in (("plain", False, False), ("rephased", True, False), ("rephased_mass", True, True)):
            cos, sin, rot = rotation_tables(rope, sink if rephased else 0, 6 if rephased else 0, None, 1, Lk, q.device)
            impls: Dict[str, Callable[[], Any]] = {
                "triton": lambda cos=cos, sin=sin, rot=rot, mass=mass: _op(op_fn, q, k, v, cos, sin, rot, D, mass,
                                                                           Lq - n, Lq)}
            kk, kb = (krt, k_rot) if rephased else (kt, k)
            for pname, pfn in peers.items():
                if not mass:  # peers have no mass output: compared on the attention alone
                    impls[pname] = (lambda pfn=pfn, kk=kk, kb=kb: pfn(qt, kk, vt, q, kb, v))
            base = None
            for impl, fn in impls.items():
                if clock.out():
                    truncated = True
                    break
                try:
                    ms = _time_ms(fn, dev, plan.timing_reps)
                    err = None
                except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                    ms, err = None, f"{type(e).__name__}: {e}"[:300]
                if impl == "triton":
                    base = ms
                rows.append({"case": case, "kv_frames": kvf, "Lq": Lq, "Lk": Lk, "impl": impl, "ms": ms,
                             "tflops": None if ms is None else flops / (ms * 1e9),
                             "ratio_to_triton": None if (ms is None or not base) else ms / base, "error": err})
    log(f"  op timing: {sum(r['ms'] is not None for r in rows)} timings")
    return {"shape": {"B": 1, "Lq": Lq, "heads": H, "head_dim": D, "dtype": "bfloat16", "tokens_per_frame": n,
                      "kv_frames": list(plan.kv_frames)},
            "flops_rule": "4 * B * H * Lq * Lk * D per call (QK^T and PV); the mass pass is not counted",
            "peers": list(peers), "rows": rows, "truncated": truncated}


def _op(fn, q, k, v, cos, sin, rot, D, mass, m0, m1):
    return fn(q, k, v, cos, sin, rot, True, D ** -0.5, mass, m0, m1)


def _peers(dev: str) -> Dict[str, Callable]:
    """The attention implementations the op is compared with: ``fn(q_bhld, k_bhld, v_bhld, q, k, v)``."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peers: Dict[str, Callable] = {}

    def sdpa(backend):
        def run(qt, kt, vt, *_):
            if dev != "cuda":  # dry-run: CPU has neither backend; the default kernel keeps the step exercised
                return F.scaled_dot_product_attention(qt, kt, vt)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)
        return run

    peers["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    peers["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
        peers["flex_prerotated"] = lambda qt, kt, vt, *_: flex(qt, kt, vt)
    except Exception:  # noqa: BLE001 - an older torch
        pass
    try:
        from flash_attn import flash_attn_func  # noqa: F401

        if dev == "cuda":
            peers["flash_attn"] = lambda qt, kt, vt, q, k, v: flash_attn_func(q, k, v)
    except Exception:  # noqa: BLE001 - optional
        pass
    return peers


# ---------------------------------------------------------------------------------------------- 3. model
def run_model(plan: Plan, log: Callable[[str], None]) -> Dict[str, Any]:
    """Section 3: the model rolled out per policy, eager and compiled."""
    from ..cache import CachePolicy, StreamingKVCache
    from ..models import CausalWanModel, WanConfig
    from .rollout import ReleaseCache

    clock = _Clock(plan.budget_s["model"])
    dev = plan.device
    dtype = torch.bfloat16
    cfg = WanConfig.wan_1_3b() if plan.model == "wan_1_3b" else WanConfig.tiny()
    torch.manual_seed(0)
    with torch.device(dev):  # built on the device: initialising 1.3B parameters on the host takes minutes
        model = CausalWanModel(cfg).to(dtype=dtype).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0) if dev == "cpu" else None, zero_head=False)
    latent = tuple(getattr(cfg, "latent_size", (60, 104))) if plan.model == "wan_1_3b" else None
    spec = _geometry(model, cfg, latent)
    text = torch.randn(1, cfg.text_len or 16, cfg.text_dim, device=dev, dtype=dtype)
    rows: List[Dict[str, Any]] = []
    truncated = False
    vae = _vae_block_seconds(plan, clock) if plan.model == "wan_1_3b" or plan.mode == "dry-run" else None
    compile_backend = "eager" if plan.mode == "dry-run" else "inductor"  # dry-run: dynamo tracing, no codegen
    for compiled in ((False, True) if plan.compile_model else (False,)):
        runner = _compiled_blocks(model, compile_backend) if compiled else None
        for policy in ("sliding", "deep_forcing", "release"):
            if clock.out():
                truncated = True
                break
            mk = dict(num_layers=spec["num_layers"], batch_size=1, num_heads=spec["num_heads"],
                      head_dim=spec["head_dim"], tokens_per_frame=spec["tokens_per_frame"], rope=model.rope,
                      dtype=dtype)
            if policy == "release":
                cache = ReleaseCache(device=dev, **mk)
            else:
                pol = CachePolicy.sliding() if policy == "sliding" else CachePolicy.deep_forcing()
                cache = StreamingKVCache(pol, device=dev, check_finite=False, **mk)
            if compiled:  # the cache's host-side schedule stays eager (see tests/model/test_compile.py)
                for layer in cache.layers:
                    layer.attend = torch.compiler.disable(layer.attend)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                times = _model_blocks(model, cache, text, spec, plan.model_blocks, dev, clock)
                err = None
            except Exception as e:  # noqa: BLE001 - e.g. a compile failure: reported, the rest still runs
                times, err = [], f"{type(e).__name__}: {e}"[:500]
            steady = times[1:] if len(times) > 1 else times  # block 0 pays warm-up / compilation
            med = sorted(steady)[len(steady) // 2] if steady else None
            vae_s = vae["block_s"] if vae and vae.get("block_s") else None
            rows.append({"policy": policy, "compile": compiled, "blocks": len(times), "per_block_s": times,
                         "per_block_s_median": med,
                         "fps": None if not med else VIDEO_FRAMES_PER_BLOCK / med,
                         "fps_with_vae": None if not (med and vae_s) else VIDEO_FRAMES_PER_BLOCK / (med + vae_s),
                         "peak_memory_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                         "error": err})
            log(f"  model {policy} compile={compiled}: {len(times)} blocks, median {med}")
        del runner
        _uncompile(model)
    return {"model": plan.model, "dtype": "bfloat16", "latent_size": list(latent) if latent else None,
            "compile_backend": compile_backend,
            "tokens_per_frame": spec["tokens_per_frame"], "passes_per_block": 5, "fps_rule": FPS_RULE,
            "vae": vae, "rows": rows, "truncated": truncated}


def _geometry(model, cfg, latent) -> Dict[str, int]:
    spec = model.cache_spec(latent) if hasattr(model, "cache_spec") else None
    if spec is not None:
        return {"num_layers": spec.num_layers, "num_heads": spec.num_heads, "head_dim": spec.head_dim,
                "tokens_per_frame": spec.tokens_per_frame, "grid": cfg.token_grid(latent)}
    return {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
            "tokens_per_frame": cfg.tokens_per_frame(latent), "grid": cfg.token_grid(latent)}


def _model_blocks(model, cache, text, spec, blocks: int, dev: str, clock: _Clock) -> List[float]:
    """Per-block seconds of ``blocks`` blocks, 5 passes each (4 denoising steps + the clean pass that writes the
    cache), random latents (timing only)."""
    cfg = model.config
    h, w = spec["grid"]
    ph, pw = cfg.patch_size[1], cfg.patch_size[2]
    g = torch.Generator(device=dev).manual_seed(0)
    times = []
    with torch.no_grad():
        for b in range(blocks):
            if clock.out():
                break
            x = torch.randn(1, 3, cfg.in_dim, h * ph, w * pw, device=dev, generator=g, dtype=torch.bfloat16)
            _sync(dev)
            t0 = time.perf_counter()
            for t in (1000.0, 750.0, 500.0, 250.0, 0.0):
                x = model(x, torch.full((1, 3), t, device=dev), text, cache=cache, start_frame=3 * b).to(x.dtype)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    return times


def _compiled_blocks(model, backend: str):
    """Compile each transformer block (``backend``: inductor on a GPU): projections, norms, RoPE, cross-attention
    and FFN; the cache call runs eager (the caller wraps it). The blocks share one code object, so the recompile
    limit is raised to cover all of them."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(model.blocks))
    for blk in model.blocks:
        blk._gpu_check_eager = blk.forward
        blk.forward = torch.compile(blk.forward, backend=backend)
    return model


def _uncompile(model) -> None:
    for blk in model.blocks:
        if hasattr(blk, "_gpu_check_eager"):
            blk.forward = blk._gpu_check_eager
            del blk._gpu_check_eager


def _vae_block_seconds(plan: Plan, clock: _Clock) -> Dict[str, Any]:
    """Seconds to stream-decode one 3-frame latent block with a random Wan VAE (full size on a GPU, tiny in
    dry-run); None with the reason when the VAE cannot be built here."""
    try:
        from ..video.vae import WanVAE

        dev = plan.device
        if plan.mode == "dry-run":
            vae, hw = WanVAE.tiny(dtype=torch.float32, device=dev), (4, 4)
        else:
            vae = WanVAE.tiny(dtype=torch.bfloat16, device=dev, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4),
                              num_res_blocks=2)
            hw = (60, 104)
        dec = vae.stream_decoder()
        C = vae.latent_channels
        g = torch.Generator(device=dev).manual_seed(0)
        lat = [torch.randn(1, 3, C, *hw, device=dev, generator=g).to(next(vae.parameters()).dtype)
               for _ in range(3)]
        dec.decode(lat[0])  # the first block decodes 1 + 4 * 2 frames
        times = []
        for x in lat[1:]:
            _sync(dev)
            t0 = time.perf_counter()
            dec.decode(x)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return {"block_s": min(times), "latent_size": list(hw), "error": None}
    except Exception as e:  # noqa: BLE001 - diffusers missing, memory: reported
        return {"block_s": None, "latent_size": None, "error": f"{type(e).__name__}: {e}"[:300]}


# ---------------------------------------------------------------------------------------------- driver
def run_gpu_check(mode: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every section for ``mode`` (``"full"``, ``"quick"``, ``"dry-run"``); returns the JSON-able result."""
    plan = Plan.make(mode)
    t_all = time.perf_counter()
    result: Dict[str, Any] = {"schema": SCHEMA, "mode": mode, "env": env_info(plan.device)}
    walls: Dict[str, float] = {}
    for name, fn in (("correctness", check_correctness), ("op_timing", time_ops), ("model", run_model)):
        t0 = time.perf_counter()
        log(f"{name} ...")
        try:
            result[name] = fn(plan, log)
            result[name]["error"] = result[name].get("error")
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
            result[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"  {name} failed: {result[name]['error']}")
        walls[name] = time.perf_counter() - t0
    result["budget_s"] = plan.budget_s
    result["section_wall_s"] = walls
    result["wall_s"] = time.perf_counter() - t_all
    return result
