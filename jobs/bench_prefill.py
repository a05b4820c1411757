"""Prefill benchmark: `python -m jobs.bench_prefill --out DIR [--size tiny|mid] [--frames 8 16 ...] [--capacity N]
[--repeats N] [--device cpu|cuda] [--dtype float32|bfloat16] [--policies full statekv] [--no-one-shot]
[--inits wide default]`.

Prefills synthetic videos of growing length with Full, Window and StateKV on a random Qwen2-VL, and the same
frames through one plain transformers forward (the printed ratio per length and the StateKV crossover), once per
checkpoint init (default: both the widened "wide" init and the model class's "default" one, one after the other),
writes DIR/<init>/prefill.json (raw numbers, config, versions, load average) and DIR/<init>/prefill.png, and prints
a summary table per init and both crossovers. With --checkpoint, that checkpoint only, into DIR. The logic lives
in `statekv.benchmarks.prefill`.
"""

from __future__ import annotations

import argparse
import logging

import torch

from statekv.benchmarks.prefill import (DEFAULT_FRAMES, MODEL_SIZES, POLICY_NAMES, BenchConfig, format_crossovers,
                                       format_table, run_benchmark, run_inits)
from statekv.testing.checkpoints import INITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (prefill.json, prefill.png)")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny", help="random model size")
    parser.add_argument("--frames", type=int, nargs="+", default=list(DEFAULT_FRAMES),
                        help="sampled frames per video (even; two frames per chunk)")
    parser.add_argument("--capacity", type=int, default=None,
                        help="Window/StateKV capacity in tokens (default: four chunks' tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--height", type=int, default=None, help="frame height (default per size)")
    parser.add_argument("--width", type=int, default=None, help="frame width (default per size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on cpu, steady on a shared machine; 0: torch's default)")
    parser.add_argument("--checkpoint", default=None, help="benchmark this Qwen2-VL checkpoint instead")
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=list(INITS),
                        help="weight inits of the random checkpoint, each run in turn (default: all; wide = N(0, 0.2), "
                             "peaked attention; default = the model class's own init)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICY_NAMES), default=list(POLICY_NAMES),
                        help="policies to run (default: all)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared CPU with one thread)")
    parser.add_argument("--no-one-shot", action="store_true",
                        help="skip the one-shot plain transformers forward (ratios, crossover)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the benchmark; returns {init: report} ({"checkpoint": report} with --checkpoint)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = BenchConfig(size=args.size, frames=args.frames, capacity=args.capacity, repeats=args.repeats,
                         device=args.device, dtype=args.dtype, height=args.height, width=args.width, threads=args.threads,
                         checkpoint=args.checkpoint, policies=args.policies, clock=args.clock, one_shot=not args.no_one_shot,
                         measure_flops=not args.no_flops,
                         measure_memory=not args.no_memory)
    log = lambda msg: print(f"[bench_prefill] {msg}", flush=True)  # noqa: E731
    if args.checkpoint is not None:
        reports = {"checkpoint": run_benchmark(config, args.out, log=log)}
    else:
        reports = run_inits(config, args.inits, args.out, log=log)
    for report in reports.values():
        print(format_table(report))
        print(f"json: {report['files']['json']}")
        print(f"png:  {report['files']['png']}")
    print(format_crossovers(reports))
    return reports


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
