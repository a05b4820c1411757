"""Indexing throughput: videos per hour and frames per second for 1 and N model actors, and decode-wait share.

Synthetic videos are written locally, indexed with a tiny random checkpoint (or --model) into a fresh output
root per actor count, and timed end to end (wall clock of the Ray Data run, actors' start-up excluded by a
warm-up run).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.indexing.config import IndexConfig
from pipelines.indexing.pipeline import run_index


def run_bench(*, model: str | None = None, videos: int = 8, frames: int = 32, actor_counts=(1, 2),
              gpus_per_actor: float = 0.0, height: int = 56, width: int = 84, workdir: str | None = None,
              address: str | None = None) -> dict[str, Any]:
    from statekv import samples
    from statekv.testing.videos import synthetic_frames, write_video

    model = model or str(samples.tiny_checkpoint())
    root = Path(workdir or tempfile.mkdtemp(prefix="statekv-bench-index-"))
    src = root / "videos"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        write_video(src / f"v{i:03d}.mp4", synthetic_frames(frames, height, width, seed=i), fps=4.0)
    results = []
    for n in actor_counts:
        config = IndexConfig(input=str(src), output=str(root / f"out-{n}"), model=model, actors=n,
                             gpus_per_actor=gpus_per_actor, fps=4.0, min_pixels=28 * 28,
                             max_pixels=height * width, capacity=64)
        start = time.perf_counter()
        summary = run_index(config, address=address, echo=lambda s: None)
        wall = time.perf_counter() - start
        results.append({
            "actors": n, "videos": summary.ok, "frames": summary.frames, "chunks": summary.chunks,
            "wall_s": wall, "videos_per_hour": 3600 * summary.ok / wall, "frames_per_s": summary.frames / wall,
            "decode_wait_share": summary.decode_wait_share, "failed": summary.failed,
            "busy_s": summary.busy_s, "stage_shares": summary.stage_shares,
        })
    base = results[0]["videos_per_hour"]
    for r in results:
        r["scaling_vs_1"] = r["videos_per_hour"] / base if base else 0.0
    return {"machine": {"cpus": os.cpu_count()}, "model": model, "videos": videos, "frames_per_video": frames,
            "frame_size": [height, width], "gpus_per_actor": gpus_per_actor, "runs": results,
            "note": "wall clock includes actor start-up (model load) and Ray Data scheduling"}


def write_json(result: dict[str, Any], out: str) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / "indexing.json"
    path.write_text(json.dumps(result, indent=1))
    return str(path)
