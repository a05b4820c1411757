"""Query-service benchmark: TTFT and decode tokens/s from a stored cache (cold from loopback S3, warm from the LRU)
vs prefilling again, at several video lengths; tokens/s and latency p50/p95/p99 at several concurrencies with
batching off and on (one run, side by side). JSON on stdout, the concurrency table on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model dir or hub id (default: a tiny random Qwen2-VL)")
    p.add_argument("--lengths", type=_ints, default=[16, 64, 256], help="video lengths in sampled frames")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="cold/warm/re-prefill repeats per length (median)")
    p.add_argument("--height", type=int, default=112)
    p.add_argument("--width", type=int, default=168)
    p.add_argument("--transport", choices=["serve", "inproc"], default="serve",
                   help="concurrency through the Serve deployment over HTTP, or threads on the plain class")
    p.add_argument("--batching", default="off,on",
                   help="batching modes measured one after the other in this run: off (one request at a time per "
                        "replica thread), on (concurrent questions about a video decoded together), or off,on")
    p.add_argument("--out", type=Path, default=None, help="write serving.json here (default: stdout only)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipelines.serving.bench import run_benchmark
    from statekv import samples

    model = args.model or str(samples.tiny_checkpoint())
    result = run_benchmark(model, lengths=args.lengths, concurrency=args.concurrency, requests=args.requests,
                           max_new_tokens=args.max_new_tokens, repeats=args.repeats, height=args.height,
                           width=args.width, transport=args.transport,
                           batching=tuple(m for m in args.batching.split(",") if m))
    text = json.dumps(result, indent=2)
    print(text)
    print(result["concurrency_table"], file=sys.stderr)  # tokens/s and p50/p99 per concurrency, side by side
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
