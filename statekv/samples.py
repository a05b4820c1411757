"""Embedded defaults for running without downloads: a tiny random checkpoint and a synthetic sample video.

They let the main job and the tests run on a fresh machine with no model hub and no data set. Answers from the
tiny model are random-weight tokens: the point is the whole path, not the words.
"""

from __future__ import annotations

import os
from pathlib import Path

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
