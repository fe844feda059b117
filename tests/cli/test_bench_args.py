"""The stand-alone benches share their geometry and --threads flags (bench/args.py): same names, one bound."""
import pytest

from deepforcing_kernels.bench import crossattn, jitter


@pytest.mark.parametrize("main", [jitter.main, crossattn.main])
@pytest.mark.parametrize("threads", ["0", "-3", "5000"])
def test_bad_threads_is_one_line_and_exit_1(main, threads, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--threads", threads, "--repeats", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "--threads must be in 1..4096" in err[0] and threads in err[0]


@pytest.mark.parametrize("main", [jitter.main, crossattn.main])
def test_geometry_flags_are_the_same(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--dim", "--heads", "--layers", "--tokens-per-frame", "--repeats", "--threads"):
        assert flag in out


def test_cli_and_benches_word_the_thread_bound_alike(capsys):
    """`deepforcing generate --threads 5000` fails with the benches' own line (one bound, one wording)."""
    from deepforcing_kernels import cli

    rc = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--frames", "5", "--threads", "5000",
                   "--out", "unused.mp4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--threads must be in 1..4096, got 5000" in err[0]
