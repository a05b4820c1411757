"""Indexing throughput: videos per hour and frames per second for 1 and N model actors, and where actor time goes.

Synthetic videos are written locally, indexed with a tiny random checkpoint (or --model) into a fresh output
root per run, and timed end to end (wall clock of the Ray Data run, including actor start-up and scheduling).
Each run also reports the actors' seconds per video and their shares by stage (fetch, decode, preprocess, vision
tower, language model, store writes, other: the run report's `<stage>_s` columns). Settings compared side by side
(`store_buffer_mib`: 0 writes each chunk's row group at once, as before the store buffered them) run interleaved,
`repeats` times, in one process, so that load on the machine falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.indexing.config import IndexConfig
from statekv.settings import PrefillSettings
from pipelines.indexing.pipeline import run_index
from pipelines.indexing.report import SHARE_NAMES


def run_bench(*, model: str | None = None, videos: int = 8, frames: int = 32, actor_counts=(1, 2),
              gpus_per_actor: float = 0.0, height: int = 56, width: int = 84, workdir: str | None = None,
              address: str | None = None, store_buffer_mib=(16.0,), repeats: int = 1) -> dict[str, Any]:
    from statekv import samples
    from statekv.testing.videos import synthetic_frames, write_video

    model = model or str(samples.tiny_checkpoint())
    root = Path(workdir or tempfile.mkdtemp(prefix="statekv-bench-index-"))
    src = root / "videos"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        write_video(src / f"v{i:03d}.mp4", synthetic_frames(frames, height, width, seed=i), fps=4.0)
    results = []
    for repeat in range(repeats):
        for n in actor_counts:
            for buffer in store_buffer_mib:
                config = IndexConfig(input=str(src), output=str(root / f"out-{n}-{buffer}-{repeat}"), model=model,
                                     actors=n, gpus_per_actor=gpus_per_actor, store_buffer_mib=buffer,
                                     prefill=PrefillSettings(fps=4.0, min_pixels=28 * 28, max_pixels=height * width,
                                                             capacity=64))
                start = time.perf_counter()
                summary = run_index(config, address=address, echo=lambda s: None)
                wall = time.perf_counter() - start
                results.append({
                    "actors": n, "store_buffer_mib": buffer, "repeat": repeat, "videos": summary.ok,
                    "frames": summary.frames, "chunks": summary.chunks, "wall_s": wall,
                    "videos_per_hour": 3600 * summary.ok / wall, "frames_per_s": summary.frames / wall,
                    "decode_wait_share": summary.decode_wait_share, "failed": summary.failed,
                    "actor_s_per_video": summary.busy_s / summary.ok if summary.ok else 0.0,
                    "stage_s_per_video": {k: v / summary.ok for k, v in summary.stage_s.items()} if summary.ok else {},
                    "stage_shares": summary.stage_shares,
                })
    base = results[0]["videos_per_hour"]
    for r in results:
        r["scaling_vs_1"] = r["videos_per_hour"] / base if base else 0.0
    return {"machine": {"cpus": os.cpu_count()}, "model": model, "videos": videos, "frames_per_video": frames,
            "frame_size": [height, width], "gpus_per_actor": gpus_per_actor, "runs": results,
            "note": "wall clock includes actor start-up (model load) and Ray Data scheduling; actor seconds and "
                    "shares are the actors' own time per video"}


def shares_table(result: dict[str, Any]) -> str:
    """A Markdown table: per setting (averaged over repeats), actor ms per video and the share of each stage."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in result["runs"]:
        groups.setdefault((r["actors"], r["store_buffer_mib"]), []).append(r)
    head = ["actors", "store buffer MiB", "actor ms/video", *SHARE_NAMES, "store ms/video"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (actors, buffer), runs in groups.items():
        mean = lambda f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
        cells = [str(actors), f"{buffer:g}", f"{1000 * mean(lambda r: r['actor_s_per_video']):.0f}",
                 *(f"{100 * mean(lambda r: r['stage_shares'].get(k, 0.0)):.1f}%" for k in SHARE_NAMES),
                 f"{1000 * mean(lambda r: r['stage_s_per_video'].get('store', 0.0)):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], out: str) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / "indexing.json"
    path.write_text(json.dumps(result, indent=1))
    return str(path)
