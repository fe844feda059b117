"""`deepforcing trace` (not implemented yet)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise SystemExit("deepforcing trace is not implemented yet")
