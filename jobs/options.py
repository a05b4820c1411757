"""Command-line options shared by the commands that prefill videos (`statekv prefill`, `statekv index`)."""

from __future__ import annotations

import argparse

# The names of statekv.policies.POLICIES (a test keeps them equal), spelled out so that building the parser, and
# so `--help`, does not import torch.
POLICY_NAMES = ("full", "window", "statekv")


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """Policy, sampling, chunking and storage flags, with the same names and defaults everywhere."""
    parser.add_argument("--policy", default="statekv", choices=POLICY_NAMES, help="carried-state policy")
    parser.add_argument("--capacity", type=int, default=4096, help="carried tokens per layer (statekv, window)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--min-pixels", type=int, default=None, help="minimum pixels per frame after resizing")
    parser.add_argument("--max-pixels", type=int, default=None, help="maximum pixels per frame after resizing")
    parser.add_argument("--chunks-per-step", type=int, default=1, help="temporal chunks (frame pairs) per model call")
    parser.add_argument("--int8", action="store_true", help="store K/V as int8 with scales")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo videos whose cache is committed already (default: skip them, so a rerun resumes)")
