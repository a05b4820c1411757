"""Placeholder wiring for `statekv serve`: replaced by the serve work (add_arguments / run / main)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this command's flags on `parser`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("statekv serve: not available yet")
