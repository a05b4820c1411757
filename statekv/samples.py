"""Embedded defaults for running without downloads: a tiny random checkpoint, a synthetic sample video, and a
video of the proxy task (statekv/proxy/task.py) for the trained proxy model that ships with the package.

They let the main job and the tests run on a fresh machine with no model hub and no data set. Answers from the
tiny random model are random-weight tokens (the point is the whole path); the proxy model answers its task's
questions right, so `statekv demo` can be checked by looking at the video.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path(os.environ.get("STATEKV_HOME", Path.home() / ".cache" / "statekv"))


def tiny_checkpoint(family: str = "qwen2_vl", *, home: Path = DEFAULT_HOME) -> Path:
    """Path of a tiny random checkpoint of `family`, written on first use."""
    import json

    from statekv.testing.checkpoints import preprocessor_config, save_tiny_checkpoint

    path = home / f"tiny-{family}"
    if not (path / "config.json").exists():
        tmp = home / f".tiny-{family}.partial"
        save_tiny_checkpoint(tmp, family)
        tmp.rename(path)
    elif not (path / "video_preprocessor_config.json").exists():  # written by statekv < 0.2
        (path / "video_preprocessor_config.json").write_text(json.dumps(preprocessor_config(family), indent=1))
    return path


def sample_video(*, home: Path = DEFAULT_HOME, seconds: float = 8.0, fps: float = 8.0) -> Path:
    """Path of a short synthetic MP4 (a square moving over a gradient), written on first use."""
    from statekv.testing.videos import synthetic_frames, write_video

    path = home / "sample.mp4"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / ".sample.partial.mp4"
        write_video(tmp, synthetic_frames(int(seconds * fps), 112, 168), fps=fps)
        tmp.rename(path)
    return path


DEMO_SEED = 2  # the proxy video `statekv demo` shows (a held-out seed: the model never trained on it)
DEMO_FRAMES = 24  # 12 s at 2 fps: 12 chunks


def proxy_video(*, home: Path = DEFAULT_HOME, num_frames: int = DEMO_FRAMES, seed: int = DEMO_SEED
                ) -> tuple[Path, Any]:
    """Path of a proxy-task video (56 x 56 px, 2 fps, lossless H.264 RGB so that decoding gives back its exact
    pixels) and the `ProxyVideo` it was drawn from (what it shows, its questions). Written on every call (a few
    KB), so the file always shows what the installed generator says it shows."""
    from statekv.proxy.task import held_out_seed, make_video
    from statekv.testing.videos import write_video

    video = make_video(num_frames, held_out_seed(num_frames, seed))
    path = home / f"proxy-{num_frames}f-{seed}.mp4"
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".proxy-{num_frames}f-{seed}.{os.getpid()}.partial.mp4"
    write_video(tmp, video.frames, fps=video.fps, lossless=True)
    tmp.replace(path)
    return path, video
