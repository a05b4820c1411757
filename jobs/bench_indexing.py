"""Benchmark the Ray indexing pipeline: videos/hour, frames/s for 1 and 2 actors, share of time waiting on decode."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_indexing", description=__doc__)
    parser.add_argument("--out", default="bench/indexing", help="folder for indexing.json")
    parser.add_argument("--model", help="checkpoint (default: the tiny random Qwen2-VL)")
    parser.add_argument("--videos", type=int, default=8, help="synthetic videos per run")
    parser.add_argument("--frames", type=int, default=32, help="frames per synthetic video (4 fps)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to compare")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--height", type=int, default=56)
    parser.add_argument("--width", type=int, default=84)
    parser.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    args = parser.parse_args(argv)
    from pipelines.indexing.bench import run_bench, write_json

    result = run_bench(model=args.model, videos=args.videos, frames=args.frames, actor_counts=tuple(args.actors),
                       gpus_per_actor=args.gpus_per_actor, height=args.height, width=args.width,
                       address=args.address)
    print(json.dumps(result["runs"], indent=1))
    print(f"written to {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
