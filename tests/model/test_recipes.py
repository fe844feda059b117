"""Causal Forcing as a base model: the recipes' schedules against the authors' scheduler (thu-ml/Causal-Forcing
@ 1fc7bbc: utils/scheduler.py FlowMatchScheduler as utils/wan_wrapper.py builds it, pipeline/causal_inference.py's
step-list warp and its first-chunk list), the driver's per-block schedule, every policy frame-wise, resume, and
the command line's weights choice (generator vs generator_ema)."""
import pytest
import torch

from deepforcing_kernels.cli import main
from deepforcing_kernels.driver import generate
from deepforcing_kernels.models import CausalWanModel, WanConfig
from deepforcing_kernels.presets import POLICY_NAMES, RECIPE_NAMES, make_policy, recipe
from deepforcing_kernels.sampler import warp_timesteps

LAT = (4, 4)


def their_warped(steps, shift=5.0):
    """The authors' code re-derived: FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) with
    set_timesteps(1000): sigmas = linspace(1, 0, 1001)[:-1] shifted; timesteps = 1000 * sigmas; then
    cat(timesteps, [0])[1000 - steps]."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    table = torch.cat([sigmas * 1000, torch.tensor([0.0])])
    return [float(table[1000 - int(t)]) for t in steps]


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_steps_warp_as_the_authors_scheduler(name):
    r = recipe(name)
    for steps in (r["denoising_steps"], r["first_block_steps"]):
        if steps is not None:
            assert warp_timesteps(steps) == pytest.approx(their_warped(steps), abs=1e-3)


def test_recipe_table_holds_the_authors_configs():
    # configs/causal_forcing_dmd_{chunkwise,framewise,framewise_2step,framewise_1step}.yaml and README's --use_ema
    assert recipe("causal_forcing_chunkwise") == dict(block_frames=3, denoising_steps=[1000, 750, 500, 250],
                                                      first_block_steps=None, use_ema=False)
    assert recipe("causal_forcing_framewise")["block_frames"] == 1 and recipe("causal_forcing_framewise")["use_ema"]
    assert recipe("causal-forcing++-2step")["denoising_steps"] == [1000, 500]
    assert recipe("causal_forcing_pp_1step")["denoising_steps"] == [1000]
    assert recipe("causal_forcing_pp_1step")["first_block_steps"] == [1000, 750, 500, 250]
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("causal_forcing_3step")


def tiny_model(seed=0):
    m = CausalWanModel(WanConfig.tiny(latent_size=LAT)).eval()
    m.init_weights(generator=torch.Generator().manual_seed(seed), zero_head=False)
    return m


def recorded(model):
    """Wrap ``model`` so that every call's (start_frame, timestep) is recorded."""
    calls = []
    forward = model.forward

    def rec(x, t, ctx, **kw):
        calls.append((kw["start_frame"], float(t.flatten()[0])))
        return forward(x, t, ctx, **kw)

    model.forward = rec
    return calls


@pytest.mark.parametrize("prefix", [False, True])
def test_the_first_generated_block_takes_its_own_steps(prefix):
    model = tiny_model()
    calls = recorded(model)
    text = torch.randn(1, 16, model.text_dim)
    r = recipe("causal_forcing_pp_2step")
    policy = make_policy("deep_forcing", block_frames=r["block_frames"])
    kw = {}
    if prefix:  # an image as the stream's first frame (Causal Forcing's frame-wise I2V): the next block is first
        kw["prefix_latents"] = torch.randn(1, 1, model.latent_channels, *LAT)
    generate(model, text, 5, policy, 0, progress=False, denoising_steps=r["denoising_steps"],
             first_block_steps=r["first_block_steps"], **kw).run()
    per_block = {}
    for f0, t in calls:
        per_block.setdefault(f0, []).append(t)
    first, rest = warp_timesteps(r["first_block_steps"]), warp_timesteps(r["denoising_steps"])
    start = 1 if prefix else 0
    if prefix:
        assert per_block[0] == [0.0]  # the image: one clean pass
    # (the model sees float32 timesteps)
    assert per_block[start] == pytest.approx(first + [0.0], rel=1e-6)
    for f0 in range(start + 1, 5):
        assert per_block[f0] == pytest.approx(rest + [0.0], rel=1e-6)


def test_first_block_steps_resume_bit_for_bit_and_refuse_another_schedule():
    model = tiny_model()
    text = torch.randn(1, 16, model.text_dim)
    policy = make_policy("deep_forcing", block_frames=1)
    kw = dict(denoising_steps=[1000, 500], first_block_steps=[1000, 750, 500, 250], progress=False)
    whole = torch.cat(list(generate(model, text, 26, policy, 3, **kw)), 1)
    ro = generate(model, text, 26, policy, 3, **kw)
    head = [next(ro) for _ in range(24)]
    state = ro.state_dict()
    tail = list(generate(model, text, 26, policy, 3, resume_from=state, **kw))
    assert torch.equal(torch.cat(head + tail, 1), whole)
    with pytest.raises(ValueError, match="first_timesteps"):
        generate(model, text, 26, policy, 3, resume_from=state, denoising_steps=[1000, 500], progress=False)
    with pytest.raises(ValueError, match="first_block_steps"):
        generate(model, text, 26, policy, 3, first_block_steps=[], progress=False)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_runs_frame_wise(name):
    """Causal Forcing's issue #39: the training-free methods ran chunk-wise only. Frame-wise, past the window (so
    compressing policies compress and the tape replays), deterministic across two runs."""
    model = tiny_model()
    text = torch.randn(1, 16, model.text_dim)
    policy = make_policy(name, block_frames=1)
    runs = [torch.cat(list(generate(model, text, 30, policy, 1, progress=False)), 1) for _ in range(2)]
    assert runs[0].shape[1] == 30 and torch.isfinite(runs[0]).all() and torch.equal(*runs)


GEN = ["generate", "--model", "tiny", "--latent-size", "4", "4", "--no-progress", "--frames", "6"]


def _cli(args, capsys):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


def test_cli_recipe_picks_the_weights_and_resume_keeps_the_recipe(tmp_path, capsys):
    from deepforcing_kernels.driver import load_run

    cfg = WanConfig.tiny()
    gen, ema = CausalWanModel(cfg), CausalWanModel(cfg)
    gen.init_weights(generator=torch.Generator().manual_seed(1), zero_head=False)
    ema.init_weights(generator=torch.Generator().manual_seed(2), zero_head=False)
    # the authors' training checkpoints: the DiT under WanDiffusionWrapper's "model." in generator / generator_ema
    ck = tmp_path / "causal_forcing.pt"
    torch.save({"generator": {"model." + k: v for k, v in gen.state_dict().items()},
                "generator_ema": {"model." + k: v for k, v in ema.state_dict().items()}}, ck)
    torch.save(ema.state_dict(), tmp_path / "ema_only.pt")
    torch.save(gen.state_dict(), tmp_path / "gen_only.pt")
    outs = {}
    for tag, extra in (("framewise", ["--recipe", "causal_forcing_framewise", "--checkpoint", str(ck)]),
                       ("framewise_ema", ["--recipe", "causal_forcing_framewise", "--checkpoint",
                                          str(tmp_path / "ema_only.pt")]),
                       ("chunkwise", ["--recipe", "causal_forcing_chunkwise", "--checkpoint", str(ck)]),
                       ("chunkwise_gen", ["--recipe", "causal_forcing_chunkwise", "--checkpoint",
                                          str(tmp_path / "gen_only.pt")]),
                       ("framewise_noema", ["--recipe", "causal_forcing_framewise", "--no-ema", "--checkpoint",
                                            str(ck)]),
                       ("framewise_gen", ["--recipe", "causal_forcing_framewise", "--checkpoint",
                                          str(tmp_path / "gen_only.pt")])):
        out = tmp_path / f"{tag}.pt"
        rc, err = _cli(GEN + extra + ["--out", str(out)], capsys)
        assert rc == 0, err
        outs[tag] = load_run(str(out))["latents"]
    assert torch.equal(outs["framewise"], outs["framewise_ema"])  # the recipe took generator_ema
    assert torch.equal(outs["chunkwise"], outs["chunkwise_gen"])  # and here generator
    assert torch.equal(outs["framewise_noema"], outs["framewise_gen"])  # --no-ema overrides the recipe
    assert not torch.equal(outs["framewise"], outs["framewise_gen"])
    # a resume under another schedule is one line, and the run is left as it was
    run = tmp_path / "framewise.pt"
    rc, err = _cli(GEN[:-1] + ["9", "--checkpoint", str(ck), "--out", str(run), "--resume"], capsys)
    assert rc == 1 and len(err) == 1 and "cannot resume" in err[0], err
    assert torch.equal(load_run(str(run))["latents"], outs["framewise"])
    # --ema on a checkpoint without EMA weights: one line naming the flag
    torch.save({"generator": {"model." + k: v for k, v in gen.state_dict().items()}}, tmp_path / "no_ema.pt")
    rc, err = _cli(GEN + ["--ema", "--checkpoint", str(tmp_path / "no_ema.pt"), "--out", str(tmp_path / "y.pt")],
                   capsys)
    assert rc == 1 and len(err) == 1 and "generator_ema" in err[0] and not (tmp_path / "y.pt").exists(), err


@pytest.mark.parametrize("extra, needle", [
    (["--recipe", "causal_forcing_3step"], "--recipe"), (["--steps", "1000,1500"], "--steps"),
    (["--steps", ""], "--steps"), (["--first-block-steps", "a,b"], "--first-block-steps"),
    (["--block-frames", "0"], "--block-frames"), (["--block-frames", "4"], "--frames"),
    (["--ema", "--no-ema"], "--no-ema"),
])
def test_bad_recipe_flags_are_one_line(tmp_path, capsys, extra, needle):
    rc, err = _cli(GEN + extra + ["--out", str(tmp_path / "o.pt")], capsys)
    assert rc in (1, 2) and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []
