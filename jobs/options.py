"""Command-line options shared by the commands that prefill videos (`statekv prefill`, `statekv index`)."""

from __future__ import annotations

import argparse
import functools

# The names of statekv.policies.POLICIES (a test keeps them equal), spelled out so that building the parser, and
# so `--help`, does not import torch.
POLICY_NAMES = ("full", "window", "statekv", "infinipot")

ANSWER_FROM = ("chunks", "state")  # statekv.cache.ANSWER_FROM, spelled out for the same reason

VIDEO_BACKENDS = ("auto", "decord", "pyav")  # statekv.video.BACKENDS, spelled out: --help imports no decoder

VISION_BATCH_FRAMES = 16  # statekv.engine.DEFAULT_VISION_BATCH_FRAMES, spelled out for the same reason


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """Policy, sampling, chunking and storage flags, with the same names and defaults everywhere."""
    parser.add_argument("--policy", default="statekv", choices=POLICY_NAMES, help="carried-state policy")
    parser.add_argument("--capacity", type=int, default=4096, help="carried tokens per layer and KV head (statekv, window; the budget of infinipot)")
    parser.add_argument("--answer-from", default="chunks", choices=ANSWER_FROM,
                        help="what the cache stores and answers from: every chunk's KV (chunks) or only the bounded "
                             "carried state (state: with --policy infinipot, bytes that do not grow with the video)")
    parser.add_argument("--compress-keep", type=float, default=None, metavar="FRACTION",
                        help="StreamKV write-time compression: each chunk stores only this fraction of its tokens per "
                             "layer, those the guidance prompt attends to most (default: store every token)")
    parser.add_argument("--guidance-prompt", default=None, metavar="TEXT",
                        help="the guidance prompt of --compress-keep (default: \"What is happening in this video?\")")
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
    parser.add_argument("--vision-batch-frames", type=int, default=VISION_BATCH_FRAMES, metavar="N",
                        help="frames the vision tower encodes per call, in whole steps (at least one step): fewer "
                             "calls, while host memory holds N decoded frames and their pixels; the features equal "
                             "per-step encoding within float rounding. Not recorded: a resume may use another value")
    parser.add_argument("--int8", action="store_true", help="store K/V as int8 with scales")
    parser.set_defaults(check=functools.partial(check_prefill_options, parser))
    parser.add_argument("--overwrite", action="store_true",
                        help="redo videos whose cache is committed already (default: skip them, so a rerun resumes)")


def check_prefill_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors across the flags (exit 2); sets `args.compression` (settings or None)."""
    args.compression = compression_settings(parser, args)
    if getattr(args, "vision_batch_frames", 1) < 1:
        parser.error(f"--vision-batch-frames must be >= 1, got {args.vision_batch_frames}")


def compression_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """The write-time compression the flags ask for, as statekv.compression settings (None: store every token).

    Checked here so that a bad value is a usage error before any model loads (exit 2, naming the flag)."""
    keep, prompt = getattr(args, "compress_keep", None), getattr(args, "guidance_prompt", None)
    if keep is None:
        if prompt is not None:
            parser.error("--guidance-prompt needs --compress-keep (the fraction of tokens each chunk stores)")
        return None
    if not 0.0 < keep <= 1.0:
        parser.error(f"--compress-keep must be a fraction in (0, 1], got {keep}")
    if prompt is not None and not prompt.strip():
        parser.error("--guidance-prompt must not be empty")
    if getattr(args, "answer_from", "chunks") == "state":
        parser.error("--compress-keep shrinks the stored chunks, and --answer-from state stores none")
    settings: dict = {"name": "guided", "keep": keep}
    if prompt is not None:
        settings["prompt"] = prompt
    return settings
