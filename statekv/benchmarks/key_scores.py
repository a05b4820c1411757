"""Kernel benchmark: the torch key-score attention (output + per-key mass) against plain SDPA (output only).

The shapes are a StateKV prefill step's: the text prefix (q == kv, causal), and a chunk attending to
[prefix | full state | itself]. Logits are drawn flat (spread 1) to peaked (spread 8: a plain float32 softmax of
them has many probabilities below the smallest normal float, subnormal or underflowed to 0, whose exp takes the
CPU's slow path: the case of issue #21). Every implementation runs on the same inputs,
interleaved in every repetition; the figures are medians of `repeats` (each the median of `inner` calls), timed
by `clock` (default: this process's CPU time, steadier on a shared machine with one thread). `run` returns a
JSON-ready dict; `format_table` renders it.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from statekv.ops.attention import attention, attention_sdpa

Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], Any]


@dataclass
class KeyScoreShapes:
    """A prefill step of the mid benchmark model (8 heads / 4 KV heads, head dim 64, 128 tokens per chunk)."""

    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 64
    prefix: int = 20
    capacity: int = 512  # carried state (StateKV(512) of docs/benchmarks.md)
    chunk: int = 128

    def cases(self) -> dict[str, tuple[int, int]]:
        """{name: (q, kv)}: the prefix call and a chunk after a full state."""
        return {"prefix": (self.prefix, self.prefix),
                "chunk": (self.chunk, self.prefix + self.capacity + self.chunk)}


def default_impls() -> dict[str, Impl]:
    """The two paths the engine picks between on CPU: with key scores (StateKV) and without (Full)."""
    return {
        "sdpa": lambda q, k, v, scaling: attention_sdpa(q, k, v, scaling=scaling),
        "key_scores": lambda q, k, v, scaling: attention(q, k, v, scaling=scaling, key_scores=True, backend="torch"),
    }


def below_tiny_fraction(query: torch.Tensor, key: torch.Tensor, scaling: float) -> float:
    """Fraction of a plain float32 softmax's probabilities below the smallest normal float32 (subnormal, or
    underflowed to 0: either way a slow exp), for unmasked logits (GQA by repeating the keys)."""
    k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    s = (scaling * query.double() @ k.double().transpose(-1, -2)).log_softmax(dim=-1)  # float64: no underflow
    return float((s < math.log(torch.finfo(torch.float32).tiny)).double().mean())


def run(shapes: KeyScoreShapes = KeyScoreShapes(), *, spreads: tuple[float, ...] = (1.0, 4.0, 8.0),
        impls: dict[str, Impl] | None = None, repeats: int = 7, inner: int = 5, threads: int = 1, seed: int = 0,
        clock: Callable[[], float] = time.process_time) -> dict[str, Any]:
    """Time every implementation on every (case, spread); returns rows with ms per call and the ratio to SDPA."""
    impls = impls or default_impls()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    rows = []
    try:
        for case, (q_len, kv_len) in shapes.cases().items():
            for spread in spreads:
                g = torch.Generator().manual_seed(seed)
                query = torch.randn(1, shapes.heads, q_len, shapes.head_dim, generator=g) * spread
                key = torch.randn(1, shapes.kv_heads, kv_len, shapes.head_dim, generator=g) * spread
                value = torch.randn(1, shapes.kv_heads, kv_len, shapes.head_dim, generator=g)
                scaling = shapes.head_dim ** -0.5
                times: dict[str, list[float]] = {name: [] for name in impls}
                for name, fn in impls.items():  # warm-up
                    fn(query, key, value, scaling)
                for _ in range(repeats):
                    for name, fn in impls.items():
                        calls = []
                        for _ in range(inner):
                            start = clock()
                            fn(query, key, value, scaling)
                            calls.append(clock() - start)
                        times[name].append(statistics.median(calls))
                ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                rows.append({"case": case, "q": q_len, "kv": kv_len, "spread": spread,
                             "below_tiny_fraction": below_tiny_fraction(query, key, scaling), "ms": ms,
                             "ratio_to_sdpa": {name: m / ms["sdpa"] for name, m in ms.items()} if "sdpa" in ms
                             else None})
    finally:
        torch.set_num_threads(threads_before)
    return {"benchmark": "key_scores", "shapes": asdict(shapes), "repeats": repeats, "inner": inner,
            "threads": threads or threads_before, "torch": torch.__version__,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    """One line per (case, spread): ms per call of each implementation and its ratio to SDPA."""
    load = report["load_average"]
    lines = [f"key-score attention vs SDPA: {report['shapes']}, threads={report['threads']}, medians of "
             f"{report['repeats']}x{report['inner']}, load average before {load['before'][0]:.2f} after "
             f"{load['after'][0]:.2f}"]
    for r in report["rows"]:
        cells = "  ".join(f"{name} {ms:.2f} ms" + (f" ({r['ratio_to_sdpa'][name]:.2f}x)" if r["ratio_to_sdpa"] else "")
                          for name, ms in r["ms"].items())
        lines.append(f"{r['case']:>6} q={r['q']:<4} kv={r['kv']:<4} spread={r['spread']:<4g} "
                     f"p < tiny {r['below_tiny_fraction']:.1%}: {cells}")
    return "\n".join(lines)
