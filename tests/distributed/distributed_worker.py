"""One rank of a distributed test: ``python tests/distributed/distributed_worker.py SCENARIO [ARGS...]`` under the torchrun
environment (set by :func:`deepforcing_kernels.distributed.testing.launch_local`). Prints ``OK <scenario>`` on
success; asserts otherwise (non-zero exit). Not collected by pytest (no ``test_`` prefix)."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from deepforcing_kernels.distributed.comm import SequenceComm, reference_heads, shard_tokens
from deepforcing_kernels.distributed.launch import (
    ParallelError,
    check_divisible,
    check_same_settings,
    init_from_env,
    run_ranked,
)
from deepforcing_kernels.distributed.reduce import HeadReducer, sum_in_rank_order


def _same_on_all_ranks(t: torch.Tensor, comm: SequenceComm) -> bool:
    g = comm.all_gather(t.contiguous())
    return all(torch.equal(g[0], g[r]) for r in range(comm.world))


def scenario_comm() -> int:
    info = init_from_env(timeout_s=60, device="cpu")  # joins once; a second call reuses the group
    comm = SequenceComm()
    P, r = comm.world, comm.rank
    assert (P, r) == (info["world_size"], info["rank"])
    g = torch.Generator().manual_seed(1234)  # the same full tensors on every rank
    for dtype in (torch.float32, torch.bfloat16):
        for (b, nf, fs, h, d) in [(1, 3, 6 * P, 2 * P, 8), (2, 1, P, P, 4), (2, 3, 4 * P, 3 * P, 6)]:
            full = [torch.randn(b, nf * fs, h, d, generator=g).to(dtype) for _ in range(3)]
            full[1][0, 0, 0, 0] = float("inf")  # data movement must carry any bits (adversarial values)
            full[2][:, -1] = -0.0
            local = [shard_tokens(x, r, P, nf) for x in full]
            assert local[0].shape == (b, nf * fs // P, h, d)
            heads = comm.tokens_to_heads(local, nf)
            for x, y in zip(full, heads):
                want = reference_heads(x, r, P)
                assert y.shape == want.shape and torch.equal(y, want), "tokens_to_heads != single-process slice"
                assert torch.equal(y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   want.contiguous().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
            back = comm.heads_to_tokens(heads[0], nf)
            assert torch.equal(back, local[0]), "heads_to_tokens is not the inverse of tokens_to_heads"
            # gather of local token outputs restores the frame-major block
            assert torch.equal(comm.gather(local[2].flatten(2), nf), full[2].flatten(2))
    # the reducer: rank-order sum, bit-identical everywhere, equal to the sum of every rank's partials
    red = HeadReducer(comm, record=True)
    for shape in [(1, 7), (2, 33), (3, 1)]:
        parts = torch.randn((P,) + shape, generator=g) * torch.logspace(-6, 6, shape[1])  # wide dynamic range
        total = red(parts[r].clone())
        assert torch.equal(total, sum_in_rank_order(parts)), "reducer != rank-ordered sum of partials"
        assert _same_on_all_ranks(total, comm)
    try:
        red(torch.zeros(2, 3, dtype=torch.float64))
        raise AssertionError("float64 score accepted")
    except ValueError:
        pass
    assert red.calls == 3 and len(red.history) == 3
    print("OK comm", flush=True)
    return 0


def scenario_checks(kind: str) -> int:
    """Bad input, through run_ranked: exit code 1, one line on rank 0."""
    def body() -> int:
        info = init_from_env(timeout_s=30, device="cpu")
        P, r = info["world_size"], info["rank"]
        if kind == "heads":
            check_divisible(num_heads=2 * P + 1, num_kv_heads=None, tokens_per_frame=4 * P, world=P)
        elif kind == "tokens":
            check_divisible(num_heads=P, num_kv_heads=None, tokens_per_frame=4 * P + 1, world=P)
        elif kind == "settings":
            check_same_settings({"policy": "deep_forcing", "seed": 7 if r == P - 1 else 0, "frames": 6})
        elif kind == "ok":
            check_divisible(num_heads=2 * P, num_kv_heads=P, tokens_per_frame=4 * P, world=P)
            check_same_settings({"policy": "deep_forcing", "seed": 0, "frames": 6})
            print("OK checks", flush=True)
            return 0
        raise AssertionError("the check did not raise")

    run_ranked(body, rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]))
    return 2  # unreachable: run_ranked exits


def scenario_kill() -> int:
    """Rank 1 dies (SIGKILL) after the first collective; the others keep calling collectives."""
    def body() -> int:
        init_from_env(timeout_s=float(os.environ.get("DF_TEST_TIMEOUT", "20")), device="cpu")
        comm = SequenceComm()
        x = torch.ones(4, 8)
        comm.all_gather(x)
        if comm.rank == 1:
            os.kill(os.getpid(), 9)
        print(f"WAIT_FROM {time.time():.3f}", flush=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120:
            comm.all_gather(x)
            time.sleep(0.01)
        return 0

    run_ranked(body, rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]))
    return 2


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: a zombie counts as alive until its parent (the launcher, polling) reaps it
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def scenario_stuck() -> int:
    """Rank 1 stops answering (sleeps) while alive; the others must time out, not hang.

    Rank 1 sleeps until every other rank has ended (9 s at most): from their side it is stuck for as long as they
    live, and the launch ends as soon as it can instead of always 9 s on."""
    def body() -> int:
        init_from_env(timeout_s=float(os.environ.get("DF_TEST_TIMEOUT", "5")), device="cpu")
        comm = SequenceComm()
        pids = comm.all_gather(torch.tensor([os.getpid()], dtype=torch.int64)).flatten().tolist()
        if comm.rank == 1:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 9 and any(_alive(p) for r, p in enumerate(pids) if r != 1):
                time.sleep(0.05)
            time.sleep(0.5)  # ends well after them, whoever polls the exits
            return 0
        print(f"WAIT_FROM {time.time():.3f}", flush=True)
        comm.all_gather(torch.ones(3))
        return 0

    run_ranked(body, rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]))
    return 2



# ---------------------------------------------------------------------------------------------- rollouts
POLICIES = {
    "deep_forcing_mass": lambda CP: CP.deep_forcing(window_frames=9, sink_frames=3, budget_frames=7, recent_frames=3,
                                                     score="mass"),
    "deep_forcing_logits": lambda CP: CP.deep_forcing(window_frames=9, sink_frames=3, budget_frames=7,
                                                       recent_frames=3, score="logits", unify_topc_rope=True),
    "deep_sink": lambda CP: CP.deep_sink(window_frames=9, sink_frames=3),
    "sliding": lambda CP: CP.sliding(window_frames=6),
    # window 6, tape 3: the tape replays in the last two blocks (backward, then forward)
    "rolling_sink": lambda CP: CP.rolling_sink(window_frames=6, frame_tokens=None),
    # window 8, sink 1, 2 memories: rolls (and folds into the memories) at f0 = 6 (the first), 9, 12
    "memrope": lambda CP: CP.memrope(window_frames=8, sink_frames=1),
    # window 9 = sink 1 + memory 5 + recent 3: rolls at f0 = 9, 12, each clean pass admitting (GRAB over heads
    # of both ranks) and editing (TAME, per head)
    "tethercache": lambda CP: CP.tethercache(window_frames=9, sink_frames=1, recent_frames=3),
    # LoL's head jitter: every rank's cache and rotation take its heads' one-process scales (the sink re-phases)
    "deep_sink_jitter": lambda CP: CP.deep_sink(window_frames=9, sink_frames=3).with_head_jitter(0.8, 1),
    # the commit rule: each clean pass reads the newest committed frames (the shadow, per rank's heads)
    "rolling_sink_commit": lambda CP: CP.rolling_sink(window_frames=6, frame_tokens=None, commit_rule=True),
    "deep_forcing_commit": lambda CP: CP.deep_forcing(window_frames=9, sink_frames=3, budget_frames=7, recent_frames=3,
                                                       score="mass", commit_rule=6),
}
LATENT = (6, 8)  # 3 x 4 = 12 tokens per frame: divisible by 2 and 3
FRAMES = 15      # 5 blocks: compressions (deep_forcing) / rolls (sliding, deep_sink) in the last two


def tiny_model(heads: int):
    from deepforcing_kernels.models import CausalWanModel, WanConfig

    cfg = WanConfig.tiny(num_heads=heads, dim=24 * heads, ffn_dim=48 * heads, latent_size=LATENT)
    model = CausalWanModel(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0), zero_head=False)
    return model.eval()


def _layout(cache):
    """What must agree across ranks and with the single process, layer by layer: frames, kinds, shifts, reuse."""
    out = []
    for layer in cache.layers:
        reuse = layer.reuse_counts()
        out.append((layer.frames().tolist(), list(layer.kinds()), layer.shifts().tolist(),
                    None if reuse is None else reuse.tolist()))
    return out


def scenario_rollout(heads: str, *policies: str) -> int:
    """SP rollout == single-process rollout (latents to fp32 rounding; Top-C, layouts identical on all ranks;
    K/V bytes per rank 1/P), and a resumed SP rollout continues exactly."""
    from deepforcing_kernels.cache import CachePolicy
    from deepforcing_kernels.distributed.ulysses import SequenceParallelWan
    from deepforcing_kernels.driver import generate

    if not dist.is_initialized():
        init_from_env(timeout_s=60, device="cpu")
    comm = SequenceComm()
    P, r = comm.world, comm.rank
    model = tiny_model(int(heads))
    text = torch.randn(1, 16, model.config.text_dim, generator=torch.Generator().manual_seed(5))
    for name in policies:
        policy = POLICIES[name](CachePolicy)
        # the single-process reference, run once (rank 0) and sent to everyone: per block the latents, the
        # layout, and every layer's keys and values
        ref = [None]
        if r == 0:
            single = generate(model, text, FRAMES, policy, seed=3, latent_size=LATENT, progress=False)
            ref[0] = [(blk, _layout(single.cache), [(ls.keys(), ls.values()) for ls in single.cache.layers])
                      for blk in single]
        dist.broadcast_object_list(ref, src=0)
        sp = SequenceParallelWan(model, comm, record_topc=True)
        par = generate(sp, text, FRAMES, policy, seed=3, latent_size=LATENT, progress=False)
        worst = 0.0
        states, blocks = {}, []
        for blk, ((a, lay_single, kv_single), b) in enumerate(zip(ref[0], par)):
            blocks.append(b)
            # latents: the same to fp32 rounding on every rank
            worst = max(worst, (a - b).abs().max().item())
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{name} block {blk}: latents differ by {worst}"
            assert _same_on_all_ranks(b, comm), f"{name} block {blk}: ranks hold different latents"
            # cache layouts: identical on every rank and equal to the single process's
            lay = _layout(par.cache)
            gathered = [None] * P
            dist.all_gather_object(gathered, lay)
            assert all(g == gathered[0] for g in gathered), f"{name} block {blk}: layouts differ across ranks"
            assert lay == lay_single, f"{name} block {blk}: layout differs from the single process"
            for (ks, vs), lp in zip(kv_single, par.cache.layers):
                kp = lp.keys()
                h = ks.shape[2] // P
                assert kp.shape[2] == h and kp.numel() * kp.element_size() * P == ks.numel() * ks.element_size()
                assert torch.allclose(kp, ks[:, :, r * h:(r + 1) * h], rtol=1e-5, atol=1e-5), \
                    f"{name} block {blk}: this rank's keys are not the single process's heads"
                assert torch.allclose(lp.values(), vs[:, :, r * h:(r + 1) * h], rtol=1e-5, atol=1e-5)
            if blk == 3:
                states = par.state_dict()  # after the first compression: carried mass, reuse counters, qbuf
        # Top-C (GRAB): every rank reduced to bit-identical totals (hence identical selections), one per compression
        hist = sp.reduce_over_heads.history
        compresses = policy.compresses or bool(policy.tether_frames)  # TetherCache: GRAB scores reduce too
        assert (len(hist) > 0) == compresses, f"{name}: {len(hist)} Top-C reductions"
        counts = [None] * P
        dist.all_gather_object(counts, len(hist))
        assert len(set(counts)) == 1
        for t in hist:
            assert _same_on_all_ranks(t, comm), f"{name}: ranks reduced to different Top-C scores"
        # resume: a new SP rollout from the state after block 4 (frame 12) continues bit for bit
        par2 = generate(SequenceParallelWan(model, comm), text, FRAMES, policy, seed=3, latent_size=LATENT,
                        progress=False, resume_from=states)
        resumed = torch.cat(list(par2), dim=1)
        assert torch.equal(resumed, torch.cat(blocks[4:], dim=1)), f"{name}: the resumed run does not continue exactly"
        if r == 0:
            print(f"{name}: P={P} heads={heads} max|latent diff|={worst:.3g} topc_reductions={len(hist)}",
                  flush=True)
    print("OK rollout", flush=True)
    return 0


def scenario_all(heads: str, *policies: str) -> int:
    """One launch for everything that passes: the collectives, the consistent checks, the rollouts."""
    from deepforcing_kernels.distributed.ulysses import check_same_weights

    scenario_comm()
    P = dist.get_world_size()
    check_divisible(num_heads=int(heads), num_kv_heads=None, tokens_per_frame=4 * P, world=P)
    check_same_settings({"policy": "deep_forcing", "seed": 0, "frames": 6})
    model, comm = tiny_model(int(heads)), SequenceComm()
    check_same_weights(model, comm)
    if comm.rank == P - 1:
        with torch.no_grad():
            model.blocks[1].ffn[0].weight[3, 5] = torch.nextafter(model.blocks[1].ffn[0].weight[3, 5],
                                                                  torch.tensor(1.0))  # one bit on one rank
    try:
        check_same_weights(model, comm)
        raise AssertionError("a one-bit weight difference was not detected")
    except ParallelError as e:
        assert f"differ between rank 0 and rank {P - 1}" in str(e)
    return scenario_rollout(heads, *policies)


def scenario_compile() -> int:
    """The all-to-alls trace into one torch.compile graph (functional collectives), with the same results."""
    init_from_env(timeout_s=120, device="cpu")
    comm = SequenceComm()
    comm.stats.enabled = True  # the clock must stay out of the graph

    def f(q, k, v):
        a, b, c = comm.tokens_to_heads((q, k, v), 3)
        return comm.heads_to_tokens(a * 2, 3), b, c

    full = torch.randn(1, 3 * 4 * comm.world, 2 * comm.world, 8, generator=torch.Generator().manual_seed(0))
    loc = shard_tokens(full, comm.rank, comm.world, 3)
    out, b, _ = torch.compile(f, backend="aot_eager", fullgraph=True)(loc, loc, loc)
    assert torch.equal(out, loc * 2) and torch.equal(b, reference_heads(full, comm.rank, comm.world))
    print("OK compile", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ fork server
# A rank started as a fresh interpreter spends seconds before its scenario begins: `import torch`, then
# torch._dynamo, which torch.compile and the model's imports pull in (seconds of CPU a rank on a 2-core machine,
# more than most scenarios take). `serve` pays that once: it imports everything the scenarios import and forks
# the ranks of each launch from there (tests/distributed/rank_forks.py is the client). Nothing has run yet at
# the fork (no process group, no thread: fork-safe), and each child runs its scenario exactly as `__main__`
# below does, with its own environment, stdout and stderr files, and exit code.
def _warm_imports() -> None:
    import torch._dynamo  # noqa: F401  (what the compile scenario's torch.compile imports)

    from deepforcing_kernels.cache import CachePolicy  # noqa: F401
    from deepforcing_kernels.distributed.ulysses import SequenceParallelWan, check_same_weights  # noqa: F401
    from deepforcing_kernels.driver import generate  # noqa: F401
    from deepforcing_kernels.models import CausalWanModel, WanConfig  # noqa: F401


def _child(req: dict, rank: int, proto_fd: int) -> None:
    """In the forked child: become rank ``rank`` of the request and run its scenario; never returns."""
    code = 1
    try:
        os.close(proto_fd)
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(req["dir"], f"{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(req["env"])
        os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
        name, args = req["argv"][0], req["argv"][1:]
        sys.argv = [__file__, *req["argv"]]
        code = globals()[f"scenario_{name}"](*args) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # what the interpreter does with an uncaught exception: the traceback, exit code 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _launch(reqs: list) -> list:
    """Fork the ``nprocs`` ranks of every launch in ``reqs`` (all at once: see serve) and reap them; ranks alive
    after their launch's ``timeout_s`` are killed and reported with returncode None (as
    :func:`deepforcing_kernels.distributed.testing.launch_local` does)."""
    import signal

    t0 = time.perf_counter()
    procs = []  # (launch, rank, pid)
    for i, req in enumerate(reqs):
        for r in range(req["nprocs"]):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, r, req["proto_fd"])
            procs.append((i, r, pid))
    ends: dict = {}
    while len(ends) < len(procs):
        for k, (i, r, pid) in enumerate(procs):
            if k not in ends:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    ends[k] = (os.waitstatus_to_exitcode(status), time.perf_counter() - t0, time.time())
                elif time.perf_counter() - t0 >= reqs[i]["timeout_s"]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    ends[k] = (None, time.perf_counter() - t0, time.time())
        time.sleep(0.01)
    return [[{"rank": r, "returncode": ends[k][0], "seconds": ends[k][1], "ended_at": ends[k][2]}
             for k, (j, r, _) in enumerate(procs) if j == i] for i in range(len(reqs))]


def serve() -> None:
    """Read one JSON line a request on stdin (a list of launches to run side by side: the sequence-parallel
    rollouts wait on each other's collectives about half the time, so two geometries at once fill both cores),
    answer one JSON line of every launch's rank exits; stop at EOF."""
    import json

    _warm_imports()
    proto = os.dup(1)
    os.dup2(2, 1)  # a stray print of the server cannot garble the answers
    with os.fdopen(proto, "w") as answers:
        for line in sys.stdin:
            reqs = [dict(req, proto_fd=proto) for req in json.loads(line)]
            answers.write(json.dumps(_launch(reqs)) + "\n")
            answers.flush()


if __name__ == "__main__":
    torch.set_num_threads(1)
    name, args = sys.argv[1], sys.argv[2:]
    code = serve() if name == "serve" else globals()[f"scenario_{name}"](*args)
    # as the package's own ranks do (distributed.launch): flush and leave without interpreter teardown, where a
    # live Gloo process group's threads can abort the process ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
