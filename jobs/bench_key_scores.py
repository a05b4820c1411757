"""Key-score attention against plain SDPA on prefill shapes: `python -m jobs.bench_key_scores [--out FILE]
[--spreads 1 4 8] [--repeats N] [--threads N]`. The logic lives in `statekv.benchmarks.key_scores`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from statekv.benchmarks.key_scores import format_table, run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--spreads", type=float, nargs="+", default=[1.0, 4.0, 8.0],
                        help="scale of the random queries and keys (1: flat attention; 8: peaked)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    with torch.inference_mode():
        report = run(spreads=tuple(args.spreads), repeats=args.repeats, threads=args.threads)
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
