"""Methods benchmark: `python -m jobs.bench_methods --out bench/methods` (see statekv/benchmarks/methods.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/methods"), help="folder for methods.json and reports")
    p.add_argument("--lengths", type=int, nargs="*", default=[32, 128, 512],
                   help="chunks of the cold-S3 videos (none: skip that part)")
    p.add_argument("--frames", type=int, default=48, help="frames of the fidelity videos")
    p.add_argument("--settings", nargs="+", default=None,
                   help="compare only these setting specs (and full), e.g. guided:0.25; default: every method")
    p.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen2_5_vl"], help="tiny checkpoints to use")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from statekv.benchmarks.methods import run

    result = run(args.out, lengths=tuple(args.lengths), frames=args.frames, settings=args.settings,
                 families=tuple(args.families))
    (args.out / "methods.json").write_text(json.dumps(result, indent=2, default=str))
    for family, table in result["fidelity"].items():
        print(f"## {family}\n\n{table['markdown']}")
    print(json.dumps(result["cold_retrieval"], indent=2))


if __name__ == "__main__":
    main()
