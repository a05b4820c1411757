"""The `statekv` command line: prefill a video into a stored cache, ask it questions, inspect and list caches,
index a video archive with Ray (`index`) and serve questions over HTTP (`serve`).

An entry point only: it parses arguments, calls the library (or the Ray glue in `pipelines/`) and prints. Errors a user can act on (a missing
video or cache, a corrupt object, a model mismatch, bad arguments) are one line on stderr and exit status 1 or 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from jobs.options import add_prefill_options

EXIT_ERROR = 1
EXIT_USAGE = 2


def _add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, a local S3 server, ...)")
    parser.add_argument("--region", help="S3 region (default: from the AWS environment)")


def _storage(args: argparse.Namespace) -> dict[str, Any] | None:
    from statekv.store import StorageOptions

    if not (getattr(args, "endpoint_url", None) or getattr(args, "region", None)):
        return None
    return StorageOptions(endpoint_url=args.endpoint_url, region=args.region)


def _add_model_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--model", required=required,
                        help="checkpoint directory or hub id" + ("" if required else
                                                                  " (default: the model recorded in the cache)"))
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statekv", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("prefill", help="prefill a video and store its cache",
                            description="Prefill VIDEO chunk by chunk and write its cache to --out.")
    p.add_argument("video", metavar="VIDEO", help="video path or URL (s3://...)")
    _add_model_args(p, required=True)
    p.add_argument("--out", required=True, metavar="URI", help="cache location: <root>/<video_id> (local or s3://)")
    add_prefill_options(p)
    p.add_argument("--mode", choices=["overwrite", "skip"], default="overwrite",
                   help="what to do when a committed cache exists at --out")
    p.add_argument("--resume", action="store_true", help="append VIDEO's frames to the committed cache at --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_storage_args(p)

    p = commands.add_parser("ask", help="answer a question from a stored cache",
                            description="Answer QUESTION from the cache at URI, without prefilling the video.")
    p.add_argument("uri", metavar="URI", help="cache location")
    p.add_argument("question", metavar="QUESTION")
    _add_model_args(p, required=False)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_storage_args(p)

    p = commands.add_parser("inspect", help="describe a stored cache",
                            description="Print model, policy, frames, tokens, duration, bytes, state size.")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_storage_args(p)

    p = commands.add_parser("ls", help="list committed caches under a root",
                            description="List the committed caches under ROOT with their sizes.")
    p.add_argument("root", metavar="ROOT")
    _add_storage_args(p)

    from jobs import index_videos, serve

    p = commands.add_parser("index", help="index a video archive into caches with Ray",
                            description=index_videos.__doc__.split("\n")[0])
    index_videos.add_arguments(p)
    p = commands.add_parser("serve", help="answer questions over stored caches over HTTP (Ray Serve)",
                            description=serve.__doc__.split("\n")[0])
    serve.add_arguments(p)

    p = commands.add_parser("demo", help="the main job on embedded defaults",
                            description="Prefill a sample video into a local store with a tiny model (or --model), "
                                        "then answer a question from the stored cache.")
    p.add_argument("--model", help="checkpoint (default: a tiny random Qwen2-VL built locally)")
    p.add_argument("--video", help="video (default: a synthetic sample video)")
    p.add_argument("--out", help="cache root (default: ~/.cache/statekv/caches)")
    p.add_argument("--question", default="What happens in the video?")
    p.add_argument("--capacity", type=int, default=512,
                   help="carried tokens per layer (small by default so the sample video exceeds it)")
    p.add_argument("--device", help="cuda or cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would drown the command's own output
    from statekv.errors import StateKVError

    from jobs import index_videos, serve

    handler = {"prefill": cmd_prefill, "ask": cmd_ask, "inspect": cmd_inspect, "ls": cmd_ls, "demo": cmd_demo,
               "index": index_videos.run, "serve": serve.run}
    try:
        return handler[args.command](args)
    except (StateKVError, FileNotFoundError, ValueError, OSError) as err:
        print(f"statekv {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"statekv {args.command}: interrupted", file=sys.stderr)
        return 130


def _engine(model: str, args: argparse.Namespace, policy=None, sampling=None, chunks_per_step: int = 1):
    import torch

    from statekv import Engine

    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return Engine.from_pretrained(model, policy=policy, device=args.device, dtype=dtype, sampling=sampling,
                                  chunks_per_step=chunks_per_step)


def cmd_prefill(args: argparse.Namespace) -> int:
    from statekv.policies import make_policy
    from statekv.store import prefill_to_store
    from statekv.video import SamplingConfig

    settings = {} if args.policy == "full" else {"capacity": args.capacity}
    policy = make_policy(args.policy, **settings)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    sampling = SamplingConfig(fps=args.fps, max_frames=args.max_frames, **pixels)
    engine = _engine(args.model, args, policy=policy, sampling=sampling, chunks_per_step=args.chunks_per_step)
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="prefill", unit="chunk", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = prefill_to_store(engine, args.video, args.out, mode=args.mode, int8=args.int8, resume=args.resume,
                                  storage_options=_storage(args), progress=progress, backend=args.backend)
    finally:
        if bar is not None:
            bar.close()
    print(_describe(result))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from statekv.store import load_cache, read_manifest

    storage = _storage(args)
    manifest = read_manifest(args.uri, storage_options=storage)
    model = args.model or manifest["model"]["name_or_path"]
    engine = _engine(model, args)
    cache = load_cache(args.uri, storage_options=storage)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)
    if args.stream:
        for event in engine.stream(cache, args.question, **options):
            print(event.text, end="", flush=True)
        print()
    else:
        print(engine.ask(cache, args.question, **options).text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from statekv.store import read_manifest
    from statekv.store.describe import format_manifest

    manifest = read_manifest(args.uri, storage_options=_storage(args))
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(args.uri, manifest))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from statekv.store import list_caches
    from statekv.store.describe import human_bytes

    entries = list_caches(args.root, storage_options=_storage(args))
    for entry in entries:
        print(f"{entry.video_id}\t{human_bytes(entry.bytes)}\t{entry.uri}")
    print(f"{len(entries)} committed cache(s) under {args.root}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from statekv import StateKV, samples
    from statekv.store import load_cache, prefill_to_store
    from statekv.store.describe import format_manifest

    model = args.model or str(samples.tiny_checkpoint())
    video = args.video or str(samples.sample_video())
    root = args.out or str(samples.DEFAULT_HOME / "caches")
    uri = f"{root.rstrip('/')}/sample"
    engine = _engine(model, argparse.Namespace(device=args.device, dtype=None), policy=StateKV(capacity=args.capacity))
    start = time.perf_counter()
    prefill_to_store(engine, video, uri, mode="overwrite")
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    cache = load_cache(uri)
    answer = engine.ask(cache, args.question, max_new_tokens=24)
    answer_s = time.perf_counter() - start
    print(format_manifest(uri, _manifest_of(uri)))
    print(f"prefill + store: {prefill_s:.2f} s; load + answer: {answer_s:.2f} s")
    print(f"question: {args.question}")
    print(f"answer:   {answer.text!r}")
    return 0


def _manifest_of(uri: str) -> dict[str, Any]:
    from statekv.store import read_manifest

    return read_manifest(uri)


def _describe(manifest: dict[str, Any]) -> str:
    from statekv.store.describe import human_bytes

    if manifest.get("skipped"):
        return f"skipped: a committed cache already exists for {manifest['video_id']}"
    totals = manifest["totals"]
    return (f"committed {manifest['video_id']}: {totals['chunks']} chunks, {totals['tokens']} video tokens, "
            f"{human_bytes(totals['bytes'])}")


if __name__ == "__main__":
    sys.exit(main())
