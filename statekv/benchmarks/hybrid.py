"""Hybrid benchmark: prefill FLOPs and per-chunk latency against chunk index for `Full` and `StateKV` on a random
Qwen3.5 (3 Gated DeltaNet layers per full-attention layer) beside the same model with every layer full attention.

Both models are `Qwen3_5ForConditionalGeneration` checkpoints of the same width, depth, heads and vision tower
(`statekv.testing.checkpoints.save_tiny_checkpoint("qwen3_5", layer_types=...)`), so the only difference is the
layer types. Per chunk: FLOPs (cumulative `count_flops` total read at each `progress` call; chunk 0 includes the
text prefix) and wall time (a separate run, `time.perf_counter` at each `progress` call). It answers how much of
Full's growing per-chunk cost the hybrid removes by itself (only 1 layer in 4 attends over the video) and how much
StateKV removes on top (that layer's per-chunk cost stops growing at the capacity). Linear layers' FLOPs include
transformers' padding of each call to 64 tokens (its chunked delta-rule kernel).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from statekv.engine import Engine
from statekv.policies import Full, StateKV
from statekv.profiling import count_flops
from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

FPS = 2.0
MID = dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, vision_depth=2, vision_dim=64)


def _per_chunk(engine: Engine, frames, *, flops: bool) -> list[float]:
    """FLOPs or seconds of each chunk of one prefill (cumulative readings at each progress call, differenced)."""
    marks: list[float] = []
    if flops:
        with torch.inference_mode(), count_flops() as counter:
            engine.prefill(frames, fps=FPS, keep_chunks=False,
                           progress=lambda done, total: marks.append(float(counter.get_total_flops())))
        start = 0.0
    else:
        start = time.perf_counter()
        with torch.inference_mode():
            engine.prefill(frames, fps=FPS, keep_chunks=False,
                           progress=lambda done, total: marks.append(time.perf_counter()))
    return [b - a for a, b in zip([start, *marks[:-1]], marks)]


def run_hybrid_benchmark(*, num_frames: int = 64, frame_size: tuple[int, int] = (128, 192),
                         capacity_chunks: int = 4, model: dict[str, Any] | None = None,
                         workdir: str | Path | None = None) -> dict[str, Any]:
    """{(model, policy): {"flops": [per chunk], "seconds": [per chunk]}} plus the settings; see the module doc."""
    model = dict(MID if model is None else model)
    layers = model["num_layers"]
    kinds = {"hybrid": None, "attention": ["full_attention"] * layers}
    sampling = SamplingConfig(fps=FPS, min_pixels=frame_size[0] * frame_size[1],
                              max_pixels=frame_size[0] * frame_size[1])
    frames = synthetic_frames(num_frames, *frame_size, seed=0)
    results: dict[str, Any] = {"model": model, "frames": num_frames, "frame_size": list(frame_size), "runs": {}}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name, layer_types in kinds.items():
            path = save_tiny_checkpoint(Path(tmp) / name, "qwen3_5", layer_types=layer_types, **model)
            probe = Engine.from_pretrained(str(path), policy=Full(), sampling=sampling, dtype=torch.float32)
            tokens = probe.prefill(frames[:2], fps=FPS).chunk_tokens[0]
            for policy in (Full(), StateKV(capacity=capacity_chunks * tokens)):
                engine = Engine(probe.adapter, policy=policy, sampling=sampling)
                _per_chunk(engine, frames[:4], flops=False)  # warm-up
                results["runs"][f"{name}/{policy.name}"] = {
                    "flops": _per_chunk(engine, frames, flops=True),
                    "seconds": _per_chunk(engine, frames, flops=False),
                    "tokens_per_chunk": tokens, "capacity": getattr(policy, "capacity", None),
                    "linear_layers": list(probe.adapter.layout.linear_layers),
                }
    return results


def format_table(results: dict[str, Any], at: Sequence[int] | None = None) -> str:
    """Markdown: per run, MFLOPs and ms of chunks `at` (default first, 1/4, 1/2, last) and total GFLOPs."""
    runs = results["runs"]
    n = len(next(iter(runs.values()))["flops"])
    at = list(at) if at is not None else sorted({1, n // 4, n // 2, n - 1})
    head = "| model / policy | " + " | ".join(f"chunk {i} MFLOPs" for i in at) + " | " + \
        " | ".join(f"chunk {i} ms" for i in at) + " | total GFLOPs |"
    rows = [head, "| --- |" + " ---: |" * (2 * len(at) + 1)]
    for name, run in runs.items():
        f, s = run["flops"], run["seconds"]
        rows.append(f"| {name} | " + " | ".join(f"{f[i] / 1e6:.1f}" for i in at) + " | " +
                    " | ".join(f"{s[i] * 1e3:.1f}" for i in at) + f" | {sum(f) / 1e9:.2f} |")
    return "\n".join(rows)
