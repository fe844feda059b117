"""The ``deepforcing`` command line: ``demo``, ``generate``, ``trace``, ``bench``, ``gpu-check``, ``serve``, ``convert``.

Each subcommand lives in :mod:`deepforcing_kernels.commands` as a module (or package) with
``add_arguments(parser)`` and ``run(args) -> int``, imported only when it runs, so ``deepforcing --help`` stays
fast and imports no torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMANDS = {
    "demo": "a short tour: generation demo (or the op on each backend)",
    "generate": "generate a long video block by block: prompt -> mp4, or latents (.pt)",
    "trace": "run the cache schedule alone and draw it",
    "bench": "benchmark the op, the compression step and whole rollouts",
    "gpu-check": "correctness, op timing and model rollouts on one CUDA GPU (--dry-run: tiny, on CPU)",
    "serve": "watch and steer streams live in the browser (a local page; the model fixed at start)",
    "convert": "an original Wan2.1 folder + a causal-DiT checkpoint -> a Hub folder (DeepForcingPipeline)",
}


def _quiet_rank() -> bool:
    """True on a rank other than 0 of a ``torchrun`` job: an error every rank finds alike (same command line) is
    printed by rank 0 alone, the others exit 1 silently."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return rank is not None and world is not None and rank.strip() not in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``deepforcing generate: error: ...``) and exit code 1, like every
    other error of the command line (under ``torchrun``: on rank 0 only)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if _quiet_rank():
            self.exit(1)
        self.exit(1, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None), so ``deepforcing --help`` lists
    the commands without importing torch."""
    parser = _Parser(prog="deepforcing", description="Deep Forcing kernels and generation driver")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}  # type: ignore[attr-defined]  - name -> its parser, to name it in an error
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        parser.commands[name] = p  # type: ignore[attr-defined]
        if command is None or command == name:
            mod = importlib.import_module(f"deepforcing_kernels.commands.{name.replace('-', '_')}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand that was given them ("deepforcing generate: error: ...")
        getattr(parser, "commands", {}).get(getattr(args, "command", None), parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):  # a user error: one line, exit code 1
            if getattr(args, "parallel", None) and _quiet_rank():
                return 1  # a --parallel check before the ranks meet: the same on every rank, rank 0 says it
            print(f"deepforcing {args.command}: error: {' '.join(e.code.split())}", file=sys.stderr)
            return 1
        raise
