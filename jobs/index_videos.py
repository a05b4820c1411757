"""Index a video archive (prefix, glob, manifest or .tar shards; local or s3://) into StateKV caches with Ray.

Two spellings, same flags:

    ray job submit --working-dir . -- python -m jobs.index_videos --input s3://videos/ --output s3://caches/ --model M
    statekv index s3://videos/ s3://caches/ --model M [--address auto]

Starts a local Ray cluster unless --address names one to join (and none at all when every input is already
committed or failed its probe). Prints one line per video and a summary; the per-video report is written as
Parquet under <output>/_reports/ as videos finish. Exit status 0 when the run finished (a video that failed, for
whatever reason, is a report row, not a failed job), 1 when the job itself could not run (its report, if any,
is still written and named on the error line).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.options import add_prefill_options


def add_arguments(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """Register this command's flags on `parser` (INPUT and OUTPUT positional, or --input/--output)."""
    if positional:
        parser.add_argument("input", metavar="INPUT", help="prefix, glob, manifest (.csv/.jsonl/.parquet) or .tar")
        parser.add_argument("output", metavar="OUTPUT", help="cache root (local or s3://)")
    else:
        parser.add_argument("--input", required=True, help="prefix, glob, manifest (.csv/.jsonl/.parquet) or .tar")
        parser.add_argument("--output", required=True, help="cache root (local or s3://)")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--address", help="Ray cluster to join ('auto' = this node's), given this shell's AWS_* "
                                           "storage variables and Ray token; default: start a local one")
    parser.add_argument("--actors", type=int, default=1, help="model actors (one model each)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (0: CPU actors)")
    parser.add_argument("--decode-cpus", type=float, default=1.0,
                        help="CPUs reserved per actor for its decode thread (and the model on CPU actors)")
    add_prefill_options(parser)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when the actor has a GPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--prefetch", type=int, default=4, help="decoded frame batches queued ahead, per actor")
    parser.add_argument("--scratch-dir", help="local folder for fetched videos (default: system temp)")
    parser.add_argument("--track-memory", action="store_true", help="record peak tensor memory per video")
    parser.add_argument("--probe-threads", type=int, default=16,
                        help="driver threads listing shards and probing inputs before the actors start")
    if not any(a.dest == "endpoint_url" for a in parser._actions):
        parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, a local S3 server, ...)")
        parser.add_argument("--region", help="S3 region (default: from the AWS environment)")


def config_from_args(args: argparse.Namespace):
    from pipelines.indexing import IndexConfig

    storage = {}
    if getattr(args, "endpoint_url", None):
        storage["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        storage["region"] = args.region
    return IndexConfig(
        input=args.input, output=args.output, model=args.model, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, decode_cpus=args.decode_cpus, prefill=args.settings, int8=args.int8,
        overwrite=args.overwrite, storage_options=storage,
        backend=args.backend, device=args.device, dtype=args.dtype, prefetch_batches=args.prefetch,
        scratch_dir=args.scratch_dir, track_memory=args.track_memory, probe_threads=args.probe_threads)


def run(args: argparse.Namespace) -> int:
    from pipelines.indexing import run_index

    run_index(config_from_args(args), address=args.address)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.index_videos", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    add_arguments(parser, positional=False)
    args = parser.parse_args(argv)
    args.check(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from statekv.errors import StateKVError

    try:
        return run(args)
    except (StateKVError, FileNotFoundError, ValueError) as err:
        print(f"index_videos: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
