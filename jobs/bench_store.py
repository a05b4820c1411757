"""Benchmark the cache store: `python -m jobs.bench_store --out bench/store.json`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="model dir or hub id (default: a tiny random Qwen2-VL)")
    p.add_argument("--num-chunks", type=int, default=200, help="chunks in the benchmark video (2 frames each)")
    p.add_argument("--large-chunks", type=int, default=24, help="chunks of the 7B-like layout cache (0: skip)")
    p.add_argument("--no-s3", action="store_true", help="skip the loopback moto S3 server")
    p.add_argument("--catalog-caches", type=int, default=500,
                   help="caches in the root whose listing cost is measured, scan vs catalog (0: skip)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from statekv.benchmarks.store import catalog_listing, run

    result = run(args.checkpoint, num_chunks=args.num_chunks, large_chunks=args.large_chunks, s3=not args.no_s3)
    if args.catalog_caches > 0:
        result["catalog_listing"] = catalog_listing(args.catalog_caches, s3=not args.no_s3)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
