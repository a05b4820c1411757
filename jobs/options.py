"""Command-line options shared by the commands that prefill videos (`statekv prefill`, `statekv index`)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

# The names of statekv.policies.POLICIES (a test keeps them equal), spelled out so that building the parser, and
# so `--help`, does not import torch.
POLICY_NAMES = ("full", "window", "statekv", "infinipot")

ANSWER_FROM = ("chunks", "state")  # statekv.cache.ANSWER_FROM, spelled out for the same reason

VIDEO_BACKENDS = ("auto", "decord", "pyav")  # statekv.video.BACKENDS, spelled out: --help imports no decoder

# The flags a cache's settings come from, with their defaults. Their parser default is None, so that a command can
# tell a flag given from one left out: `statekv prefill --resume` takes what was left out from the cache it resumes
# (and refuses a given one that differs); every other use fills in these defaults (`check_prefill_options`).
PREFILL_DEFAULTS: dict[str, Any] = {"policy": "statekv", "capacity": 4096, "answer_from": "chunks", "fps": 2.0,
                                    "chunks_per_step": 1, "int8": False}
VISION_BATCH_FRAMES = 16  # statekv.engine.DEFAULT_VISION_BATCH_FRAMES, spelled out for the same reason


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """Policy, sampling, chunking and storage flags, with the same names and defaults everywhere."""
    d = PREFILL_DEFAULTS
    parser.add_argument("--policy", choices=POLICY_NAMES, help=f"carried-state policy (default: {d['policy']})")
    parser.add_argument("--capacity", type=int, help="carried tokens per layer and KV head (statekv, window; the "
                                                      f"budget of infinipot) (default: {d['capacity']})")
    parser.add_argument("--answer-from", choices=ANSWER_FROM,
                        help="what the cache stores and answers from: every chunk's KV (chunks) or only the bounded "
                             "carried state (state: with --policy infinipot, bytes that do not grow with the video) "
                             f"(default: {d['answer_from']})")
    parser.add_argument("--compress-keep", type=float, default=None, metavar="FRACTION",
                        help="StreamKV write-time compression: each chunk stores only this fraction of its tokens per "
                             "layer, those the guidance prompt attends to most (default: store every token)")
    parser.add_argument("--guidance-prompt", default=None, metavar="TEXT",
                        help="the guidance prompt of --compress-keep (default: \"What is happening in this video?\")")
    parser.add_argument("--fps", type=float, help=f"frames sampled per second of video (default: {d['fps']})")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="cap on sampled frames per video (default: no cap); a cap that lowers the fps of a "
                             "long video is warned about, and the manifest records requested and sampled fps")
    parser.add_argument("--backend", default="auto", choices=list(VIDEO_BACKENDS),
                        help="video decoder: auto = PyAV, falling back to decord when PyAV cannot open or decode")
    parser.add_argument("--min-pixels", type=int, default=None, help="minimum pixels per frame after resizing")
    parser.add_argument("--max-pixels", type=int, default=None, help="maximum pixels per frame after resizing")
    parser.add_argument("--chunks-per-step", type=int,
                        help="chunks per model call; with k > 1 the chunks of a step attend to each other in full and "
                             "the policy selects once per step, so statekv/window results differ from k = 1 "
                             f"(full does not); recorded with the cache (default: {d['chunks_per_step']})")
    parser.add_argument("--vision-batch-frames", type=int, default=VISION_BATCH_FRAMES, metavar="N",
                        help="frames the vision tower encodes per call, in whole steps (at least one step): fewer "
                             "calls, while host memory holds N decoded frames and their pixels; the features equal "
                             "per-step encoding within float rounding. Not recorded: a resume may use another value")
    parser.add_argument("--int8", action="store_true", default=None, help="store K/V as int8 with scales")
    parser.set_defaults(check=functools.partial(check_prefill_options, parser))
    parser.add_argument("--overwrite", action="store_true",
                        help="redo videos whose cache is committed already (default: skip them, so a rerun resumes)")


def check_prefill_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors across the flags (exit 2); fills in the defaults of the flags left out (not for a resume: it
    takes them from its cache, `resume_settings`) and sets `args.compression` (settings or None)."""
    if not getattr(args, "resume", False):
        for name, value in PREFILL_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.compression = compression_settings(parser, args)
    if getattr(args, "vision_batch_frames", 1) < 1:
        parser.error(f"--vision-batch-frames must be >= 1, got {args.vision_batch_frames}")


def recorded_flags(manifest: dict[str, Any]) -> dict[str, Any]:
    """The value of each prefill flag that would make a cache like the committed one `manifest` describes."""
    config = manifest["prefill"]
    policy, sampling, compression = config["policy"], config["sampling"], config.get("compression") or {}
    return {"policy": policy["name"], "capacity": policy.get("capacity", policy.get("budget")),
            "answer_from": config.get("answer_from", "chunks"), "fps": sampling["fps"],
            "max_frames": sampling.get("max_frames"), "min_pixels": sampling.get("min_pixels"),
            "max_pixels": sampling.get("max_pixels"), "chunks_per_step": config["chunks_per_step"],
            "compress_keep": compression.get("keep"), "guidance_prompt": compression.get("prompt"),
            "int8": manifest["storage"] == "int8"}


def resume_settings(args: argparse.Namespace, manifest: dict[str, Any], where: str) -> None:
    """Refuse a prefill flag given for a resume whose value differs from the one the cache at `where` was made
    with (ValueError naming the flag, both values and the way out); fill in the cache's value for every flag left
    out. `--capacity` of `full` (which takes none) is the only flag with nothing to compare and is refused too."""
    for name, value in recorded_flags(manifest).items():
        given = getattr(args, name, None)
        if given is not None and given != value:
            flag = "--" + name.replace("_", "-")
            shown = "(not set)" if value is None else value
            raise ValueError(f"{where}: {flag} {given} differs from the cache's {flag} {shown}; a resume continues "
                             "with the settings the cache was made with (leave the flag out, or --overwrite to "
                             "prefill anew)")
        setattr(args, name, value)


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
