"""Benchmark the Ray indexing pipeline: videos/hour, frames/s for 1 and 2 actors, where the actors' time goes."""

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
    parser.add_argument("--store-buffer-mib", type=float, nargs="+", default=[16.0],
                        help="store write buffers to compare side by side (0: each chunk's row group written at once)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every setting, interleaved")
    parser.add_argument("--workdir", help="folder for the videos and stores (default: a new temp folder; a tmpfs "
                                          "such as /dev/shm keeps disk latency out of the store's share)")
    args = parser.parse_args(argv)
    from pipelines.indexing.bench import run_bench, shares_table, write_json

    result = run_bench(model=args.model, videos=args.videos, frames=args.frames, actor_counts=tuple(args.actors),
                       gpus_per_actor=args.gpus_per_actor, height=args.height, width=args.width,
                       address=args.address, store_buffer_mib=tuple(args.store_buffer_mib), repeats=args.repeats,
                       workdir=args.workdir)
    print(json.dumps(result["runs"], indent=1))
    print(shares_table(result))
    print(f"written to {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
