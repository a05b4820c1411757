"""Fidelity harness: `python -m jobs.eval --model DIR --video clip.mp4 --question "..." --settings window:64 statekv:64`.

Compares each setting with `Full` on the same videos and questions (KL and top-1 agreement of the first answer
token, greedy agreement, stored bytes, bytes read per question, latency; prefill FLOPs with `--flops`); with
`--dataset` (a multiple-choice table in VideoMME's layout) it also scores accuracy. Progress goes to stderr. Writes report.json, report.md and
fidelity.png to --out and prints the Markdown table. Random weights say nothing about real accuracy.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The harness's flags (shared by `python -m jobs.eval` and `statekv eval`)."""
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--settings", nargs="+", default=["window:4096", "statekv:4096"], metavar="SPEC",
                   help="settings to compare with full: full, window:N, statekv:N[:DECAY], any +int8")
    p.add_argument("--video", action="append", default=[], help="a video (repeat; with --question)")
    p.add_argument("--question", action="append", default=[], help="a question asked about every --video")
    p.add_argument("--questions-file", type=Path, help="JSONL rows {video, question} (open questions)")
    p.add_argument("--dataset", type=Path, help="multiple-choice table (.jsonl/.json/.csv/.parquet, VideoMME layout)")
    p.add_argument("--video-dir", help="folder of the dataset's videos (<dir>/<videoID>.mp4 or relative paths)")
    p.add_argument("--limit", type=int, help="evaluate only the first N dataset rows")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer")
    p.add_argument("--fps", type=float, help="sampling fps (default: the model's default)")
    p.add_argument("--store", help="where the settings' caches are written (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=Path("bench/eval"), help="folder for report.json/.md and the plot")
    p.add_argument("--flops", action="store_true",
                   help="count each prefill's FLOPs (exact, but the prefills run many times slower)")
    p.add_argument("--no-flops", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.set_defaults(check=functools.partial(check_arguments, p))


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) before anything heavy: the model path is checked first (exit 1, no torch import),
    then what to evaluate and the settings. Sets `args.model` (checked), `args.items` and `args.parsed_settings`."""
    from jobs.checks import check_model

    if args.flops and args.no_flops:
        p.error("--flops and --no-flops contradict each other")
    args.model = check_model(args.model)
    try:
        args.items = _items(args)
        from statekv.eval import parse_settings

        args.parsed_settings = parse_settings(args.settings)
    except (ValueError, OSError) as err:
        p.error(str(err))


def _items(args: argparse.Namespace):
    from statekv.eval import EvalItem, load_choice_dataset

    items = [EvalItem(video=v, question=q) for v in args.video for q in args.question]
    if args.video and not args.question or args.question and not args.video:
        raise ValueError("--video and --question go together")
    if args.questions_file:
        for n, line in enumerate(args.questions_file.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if "video" not in row or "question" not in row:
                    raise ValueError(f"{args.questions_file}, line {n + 1}: needs 'video' and 'question'")
                items.append(EvalItem(video=str(row["video"]), question=str(row["question"])))
    if args.dataset:
        items += load_choice_dataset(args.dataset, video_dir=args.video_dir, limit=args.limit)
    if not items:
        raise ValueError("nothing to evaluate: give --video/--question, --questions-file or --dataset")
    return items


def run(args: argparse.Namespace) -> int:
    """Run the harness from parsed flags; prints the table, returns an exit status."""
    import torch

    import statekv
    from statekv.eval import run_fidelity

    settings, items = args.parsed_settings, args.items
    videos = len({item.video for item in items})
    print(f"[eval] {len(settings)} settings ({', '.join(s.name for s in settings)}) x {videos} video(s), "
          f"{len(items)} question(s)" + ("; counting prefill FLOPs (slow)" if args.flops else ""),
          file=sys.stderr, flush=True)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    sampling = statekv.SamplingConfig(fps=args.fps) if args.fps else None
    engine = statekv.Engine.from_pretrained(args.model, device=args.device, dtype=dtype, sampling=sampling)
    with tempfile.TemporaryDirectory(prefix="statekv-eval-") as tmp:
        report = run_fidelity(engine, items, settings, store_root=args.store or tmp,
                              max_new_tokens=args.max_new_tokens, measure_flops=args.flops,
                              progress=lambda line: print(f"[eval] {line}", file=sys.stderr, flush=True))
        paths = report.write(args.out, plot=not args.no_plot)
    print(report.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        args.check(args)
        sys.exit(run(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"statekv eval: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
