"""Peak memory of a streaming prefill into the store does not grow with the video.

Regression: the store's writer held finished chunk rows up to 16 MiB before one Parquet write, and that write (one
Arrow table of all held rows, then its encoding) took several times the held bytes. A clip whose chunks stayed under
the bound never paid it during the prefill; a longer one did: peak RSS grew by ~0.3 MB per chunk of a tiny model
(1-minute clip ~605 MB, 4-minute clip ~680 MB) until the bound. Each length runs in its own process, so the
measurement (the process's peak RSS) holds only that prefill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames, write_video

CHILD = textwrap.dedent("""
    import json, resource, sys, tempfile
    import torch
    torch.set_num_threads(1)
    from statekv import Engine, StateKV
    from statekv.store import prefill_to_store
    from statekv.video import SamplingConfig

    checkpoint, video = sys.argv[1], sys.argv[2]
    # the CLI's defaults: 2 fps, the checkpoint's pixel bounds (126 tokens of ~130 KB of K/V per chunk here)
    engine = Engine.from_pretrained(checkpoint, policy=StateKV(capacity=256), device="cpu", dtype=torch.float32,
                                    sampling=SamplingConfig(fps=2.0))
    with tempfile.TemporaryDirectory() as out:
        manifest = prefill_to_store(engine, video, out + "/cache")
    print(json.dumps({"chunks": manifest["totals"]["chunks"],
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def peak_rss(checkpoint: str, video: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, checkpoint, video], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_of_a_4x_longer_video_stays_within_3_percent(tmp_path):
    checkpoint = str(save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl"))
    videos = {}
    for seconds in (60, 240):  # sampled at the video's own 2 fps: 60 and 240 chunks
        videos[seconds] = str(tmp_path / f"{seconds}s.mp4")
        write_video(videos[seconds], synthetic_frames(2 * seconds, 112, 168, seed=1), fps=2.0)
    short, long = peak_rss(checkpoint, videos[60]), peak_rss(checkpoint, videos[240])
    assert (short["chunks"], long["chunks"]) == (60, 240)
    growth = long["peak_mb"] / short["peak_mb"] - 1
    assert growth < 0.03, f"peak RSS {short['peak_mb']:.0f} MB -> {long['peak_mb']:.0f} MB for a 4x longer video"
