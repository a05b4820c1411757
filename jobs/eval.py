"""Fidelity harness: `python -m jobs.eval --model DIR --video clip.mp4 --question "..." --settings window:64 statekv:64`.

Compares each setting with `Full` on the same videos and questions (KL and top-1 agreement of the first answer
token, greedy agreement, stored bytes, bytes read per question, latency; prefill FLOPs with `--flops`); with
`--dataset` (a multiple-choice table in VideoMME's layout) it also scores accuracy. Progress goes to stderr. Writes report.json, report.md and
fidelity.png to --out and prints the Markdown table. Random weights say nothing about real accuracy.

`--proxy` measures accuracy where it means something: the shipped proxy model (statekv/proxy: a tiny Qwen2-VL
trained here on generated videos whose one-word answers sit in known frames) on its held-out videos of each
`--lengths`, every question type, every setting (by default every method at two budgets); with `--reference` it
also checks that `Full` through statekv answers as the plain transformers model does.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
from pathlib import Path


DEFAULT_SETTINGS = ["window:4096", "statekv:4096"]
# the proxy's videos hold 4 tokens a chunk (2 frames): 32-96 video tokens at 16-48 frames; budgets of 16 and 32
# tokens, retrieval of 2 and 4 chunks, write-time compression to a quarter and a half
PROXY_SETTINGS = ["window:16", "window:32", "statekv:16", "statekv:32", "infinipot:16", "infinipot:32",
                  "infinipot-stream:16", "infinipot-stream:32", "infinipot-cache:32", "topk:2", "topk:4",
                  "adaptive:2", "adaptive:4", "segments:2", "segments:4", "guided:0.25", "guided:0.5", "full+int8"]
SHIPPED_FLOORS = Path("<the shipped weights' floors>")  # what a bare --floors means


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The harness's flags (shared by `python -m jobs.eval` and `statekv eval`)."""
    p.add_argument("--model", help="checkpoint directory or hub id (with --proxy: the shipped proxy model)")
    p.add_argument("--settings", nargs="+", metavar="SPEC",
                   help="settings to compare with full: full, window:N, statekv:N[:DECAY], infinipot:N, topk:K, "
                        "topk:K:question (ReKV's query), adaptive:K, segments:K, guided:KEEP, ..., any +int8 (statekv/eval/settings.py lists them; "
                        f"default {' '.join(DEFAULT_SETTINGS)}, with --proxy {' '.join(PROXY_SETTINGS)})")
    p.add_argument("--proxy", action="store_true",
                   help="evaluate on the proxy task's held-out videos (accuracy per question type and length)")
    p.add_argument("--lengths", default="16,32,48", help="with --proxy: video lengths in frames, comma-separated")
    p.add_argument("--videos-per-length", type=int, default=10, help="with --proxy: held-out videos per length")
    p.add_argument("--types", help="with --proxy: question types, comma-separated (default: all)")
    p.add_argument("--reference", action="store_true",
                   help="with --proxy: also answer with the plain transformers model; Full must agree with it")
    p.add_argument("--floors", nargs="?", type=Path, const=SHIPPED_FLOORS, metavar="FILE",
                   help="with --proxy: the regression guard — evaluate the held-out set and settings recorded in "
                        "FILE (default: the shipped weights' floors) and exit 1 when a setting's accuracy falls "
                        "below its floor or Full stops answering as the plain model")
    p.add_argument("--record-floors", type=Path, metavar="FILE",
                   help="with --proxy: write each setting's accuracy less --margin to FILE as its floor")
    p.add_argument("--margin", type=float, default=0.1,
                   help="with --record-floors: how far below the measured accuracy a floor lies")
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
    then what to evaluate and the settings. Sets `args.model` (checked), `args.items`, `args.videos` (in-memory
    videos by name: the proxy's) and `args.parsed_settings`."""
    from jobs.checks import check_model

    if args.flops and args.no_flops:
        p.error("--flops and --no-flops contradict each other")
    if not args.proxy:
        given = [f for f, v in (("--reference", args.reference), ("--types", args.types),
                                ("--floors", args.floors), ("--record-floors", args.record_floors)) if v]
        if given:
            p.error(f"{given[0]} goes with --proxy")
        if args.model is None:
            p.error("the following arguments are required: --model (or --proxy)")
    elif args.video or args.question or args.questions_file or args.dataset:
        p.error("--proxy evaluates its own held-out videos: drop --video/--question/--questions-file/--dataset")
    if args.proxy and args.model is None:
        from statekv.proxy import checkpoint_path

        args.model = str(checkpoint_path())
    args.model = check_model(args.model)
    try:
        if args.floors is not None:
            _take_the_floors_set(args)
        args.items, args.videos = _proxy_items(args) if args.proxy else (_items(args), None)
        from statekv.eval import parse_settings

        args.parsed_settings = parse_settings(args.settings or (PROXY_SETTINGS if args.proxy else DEFAULT_SETTINGS))
    except (ValueError, OSError) as err:
        p.error(str(err))


def _take_the_floors_set(args: argparse.Namespace) -> None:
    """--floors: the held-out set and the settings are the file's (a guard compares like with like), and Full is
    checked against the plain model."""
    from statekv.proxy.floors import FLOORS, read_floors

    if args.floors == SHIPPED_FLOORS:
        args.floors = FLOORS
    args.floors_record = read_floors(args.floors, args.model)
    record = args.floors_record
    args.lengths = ",".join(str(n) for n in record["lengths"])
    args.videos_per_length = record["videos_per_length"]
    args.types = ",".join(record["types"])
    args.settings = list(record["floors"])
    args.reference = True


def _proxy_items(args: argparse.Namespace):
    from statekv.proxy.evaluate import proxy_items
    from statekv.proxy.task import QUESTION_TYPES

    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths: comma-separated frame counts, got {args.lengths!r}") from None
    if any(n < 2 for n in lengths) or args.videos_per_length < 1:
        raise ValueError("--lengths must be >= 2 frames and --videos-per-length >= 1")
    types = tuple(t.strip() for t in args.types.split(",")) if args.types else QUESTION_TYPES
    return proxy_items(lengths, args.videos_per_length, types)


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
    max_new_tokens = args.max_new_tokens
    if args.proxy:
        from statekv.proxy.evaluate import MAX_NEW_TOKENS

        max_new_tokens = min(max_new_tokens, MAX_NEW_TOKENS)  # one-word answers
    with tempfile.TemporaryDirectory(prefix="statekv-eval-") as tmp:
        report = run_fidelity(engine, items, settings, store_root=args.store or tmp, max_new_tokens=max_new_tokens,
                              measure_flops=args.flops, videos=args.videos,
                              progress=lambda line: print(f"[eval] {line}", file=sys.stderr, flush=True))
        if args.reference:
            _check_full_against_the_plain_model(args, engine, report)
        paths = report.write(args.out, plot=not args.no_plot)
    print(report.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if args.record_floors is not None:
        _record_floors(args, report)
    if args.floors is not None:
        return _guard(args, report)
    return 0


def _record_floors(args: argparse.Namespace, report) -> None:
    from statekv.proxy.floors import make_floors

    floors = make_floors(report.summary(), model_dir=args.model, lengths=[int(n) for n in args.lengths.split(",")],
                         videos_per_length=args.videos_per_length, types=list(dict.fromkeys(i.kind for i in args.items)),
                         margin=args.margin, command="python -m jobs.eval " + " ".join(sys.argv[1:]))
    args.record_floors.write_text(json.dumps(floors, indent=1) + "\n")
    print(f"wrote the floors to {args.record_floors}", file=sys.stderr)


def _guard(args: argparse.Namespace, report) -> int:
    """--floors: exit status 1, with one line per failure, when a setting is below its floor or Full does not
    answer as the plain transformers model."""
    from statekv.proxy.floors import below_floors

    failures = below_floors(report.summary(), args.floors_record)
    agreement = report.meta.get("full_agrees_with_plain_model")
    if agreement is not None and agreement < 1.0:
        failures.insert(0, f"full: answered as the plain transformers model on {agreement:.1%} of the questions")
    for line in failures:
        print(f"statekv eval: below the floor: {line}", file=sys.stderr)
    if not failures:
        print(f"[eval] every setting at or above its floor ({args.floors})", file=sys.stderr)
    return 1 if failures else 0


def _check_full_against_the_plain_model(args: argparse.Namespace, engine, report) -> None:
    """--reference: the plain transformers model answers every proxy item; record and print how often `Full`
    through statekv gave the same answer (it must be always: otherwise accuracy measures statekv, not the model)."""
    from statekv.proxy.evaluate import plain_model_answers
    from statekv.testing.reference import reference_model

    adapter = engine.adapter
    model = reference_model(args.model, dtype=adapter.dtype)
    frames = args.videos[args.items[0].video][0]
    size = adapter.frame_size(frames.shape[1], frames.shape[2], engine.sampling)
    plain = plain_model_answers(model, adapter, args.items, args.videos, size, layout=engine.layout)
    full = {r.item: r.predicted for r in report.items if r.setting == "full"}
    same = sum(full[k] == v for k, v in plain.items())
    report.meta["full_agrees_with_plain_model"] = same / len(plain)
    report.meta["plain_model_accuracy"] = sum(plain[i.item_id] == i.expected for i in args.items) / len(plain)
    print(f"[eval] Full through statekv answered as the plain transformers model on {same}/{len(plain)} questions",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        args.check(args)
        from jobs.checks import quiet_transformers

        quiet_transformers()
        sys.exit(run(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"statekv eval: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
