"""Which frames of a video to feed the model: the qwen-vl-utils fps recipe, as pure arithmetic on frame counts.

Knows nothing about decoding; readers turn the chosen indices into pixels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from statekv.errors import EmptyVideoError, VideoError

FRAME_FACTOR = 2  # temporal_patch_size: the vision tower consumes frames in pairs


@dataclass(frozen=True)
class SamplingConfig:
    """How many frames to sample and how many pixels each may keep after resizing."""

    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4  # fewer than this only when the video itself is shorter
    max_frames: int = 768  # caps memory and tokens for long videos
    min_pixels: int | None = None  # per frame, after resize; None: the checkpoint's preprocessor config
    max_pixels: int | None = None  # per frame, after resize; None: the checkpoint's preprocessor config

    def __post_init__(self) -> None:
        if not isinstance(self.fps, numbers.Real) or not math.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"SamplingConfig.fps must be a positive finite number, got {self.fps!r}")
        for name in ("min_frames", "max_frames", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is None and name.endswith("pixels"):
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SamplingConfig.{name} must be a positive integer, got {value!r}")
        if self.min_frames > self.max_frames:
            raise ValueError(
                f"SamplingConfig.min_frames ({self.min_frames}) must be <= max_frames ({self.max_frames})"
            )
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"SamplingConfig.min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})"
            )


@dataclass(frozen=True, eq=False)
class FrameSampling:
    """The frames chosen from one video and the timing the model's rotary positions need."""

    indices: np.ndarray  # int64 (n,), non-decreasing, n even and >= 2
    timestamps: np.ndarray  # float64 (n,), seconds: index / video_fps
    video_fps: float  # native fps of the source
    total_frames: int  # frames in the source
    sampled_fps: float  # n / total_frames * video_fps

    @property
    def num_frames(self) -> int:
        """Number of sampled frames (n)."""
        return int(self.indices.shape[0])

    @property
    def second_per_grid_t(self) -> float:
        """Seconds covered by one temporal grid step (two sampled frames)."""
        return FRAME_FACTOR / self.sampled_fps


def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def sample_frames(
    total_frames: int, video_fps: float, config: SamplingConfig, *, source: object = "<frames>"
) -> FrameSampling:
    """Pick evenly spaced frames at `config.fps`, clamped to [min_frames, max_frames] and rounded down to even.

    Follows qwen-vl-utils' `smart_nframes` (floor of the clamped count, no rounding first). A video shorter than
    `min_frames` (rounded up to even) gives all its frames, the last one repeated when the count is odd, so a
    1-frame video samples [0, 0]: n is always even and >= 2.
    """
    if total_frames <= 0:
        raise EmptyVideoError(source, "video has no frames")
    if not math.isfinite(video_fps) or video_fps <= 0:
        raise VideoError(source, f"invalid frame rate {video_fps!r}")
    min_n = _ceil_even(config.min_frames)
    if total_frames < min_n:
        indices = np.arange(total_frames, dtype=np.int64)
        if total_frames % FRAME_FACTOR:
            indices = np.append(indices, indices[-1])
    else:
        max_n = _floor_even(min(config.max_frames, total_frames))
        n = total_frames / video_fps * config.fps
        n = max(FRAME_FACTOR, _floor_even(min(max(n, min_n), max_n)))
        indices = np.linspace(0, total_frames - 1, n).round().astype(np.int64)
    timestamps = indices / float(video_fps)  # float64
    indices.setflags(write=False)
    timestamps.setflags(write=False)
    return FrameSampling(
        indices=indices,
        timestamps=timestamps,
        video_fps=float(video_fps),
        total_frames=int(total_frames),
        sampled_fps=len(indices) / total_frames * float(video_fps),
    )
