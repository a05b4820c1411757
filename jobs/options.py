"""Command-line options shared by the commands that prefill videos (`statekv prefill`, `statekv index`)."""

from __future__ import annotations

import argparse

# The names of statekv.policies.POLICIES (a test keeps them equal), spelled out so that building the parser, and
# so `--help`, does not import torch.
POLICY_NAMES = ("full", "window", "statekv", "infinipot")

VIDEO_BACKENDS = ("auto", "decord", "pyav")  # statekv.video.BACKENDS, spelled out: --help imports no decoder


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """Policy, sampling, chunking and storage flags, with the same names and defaults everywhere."""
    parser.add_argument("--policy", default="statekv", choices=POLICY_NAMES, help="carried-state policy")
    parser.add_argument("--capacity", type=int, default=4096, help="carried tokens per layer and KV head (statekv, window; the budget of infinipot)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="cap on sampled frames per video (default: no cap); a cap that lowers the fps of a "
                             "long video is warned about, and the manifest records requested and sampled fps")
    parser.add_argument("--backend", default="auto", choices=list(VIDEO_BACKENDS),
                        help="video decoder: auto = PyAV, falling back to decord when PyAV cannot open or decode")
    parser.add_argument("--min-pixels", type=int, default=None, help="minimum pixels per frame after resizing")
    parser.add_argument("--max-pixels", type=int, default=None, help="maximum pixels per frame after resizing")
    parser.add_argument("--chunks-per-step", type=int, default=1,
                        help="chunks per model call; with k > 1 the chunks of a step attend to each other in full and "
                             "the policy selects once per step, so statekv/window results differ from k = 1 "
                             "(full does not); recorded with the cache, a resume must use the same value")
    parser.add_argument("--int8", action="store_true", help="store K/V as int8 with scales")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo videos whose cache is committed already (default: skip them, so a rerun resumes)")
