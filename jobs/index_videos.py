"""Placeholder wiring for `statekv index_videos`: replaced by the index_videos work (add_arguments / run / main)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this command's flags on `parser`."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit("statekv index_videos: not available yet")
