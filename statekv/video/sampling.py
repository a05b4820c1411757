"""Which frames of a video to feed the model: the qwen-vl-utils fps recipe, uniform in presentation time.

Knows nothing about decoding; readers turn the chosen indices into pixels. Frames are chosen by their
presentation timestamps (PTS) when the reader knows them, so variable-frame-rate footage (phones) is sampled
evenly in time and every sampled frame is stamped with the time it is really shown at. Without timestamps (frame
arrays, sources that cannot tell) a constant rate is assumed: frame i is at i / fps.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from statekv.errors import EmptyVideoError, VideoError

logger = logging.getLogger(__name__)

FRAME_FACTOR = 2  # temporal_patch_size: the vision tower consumes frames in pairs


@dataclass(frozen=True)
class SamplingConfig:
    """How many frames to sample and how many pixels each may keep after resizing."""

    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4  # fewer than this only when the video itself is shorter
    # None = no cap: streaming prefill is linear in length, so the fps asked for is the fps given. A cap lowers
    # the fps of longer videos (with a warning) to bound tokens and store size.
    max_frames: int | None = None
    min_pixels: int | None = None  # per frame, after resize; None: the checkpoint's preprocessor config
    max_pixels: int | None = None  # per frame, after resize; None: the checkpoint's preprocessor config

    def __post_init__(self) -> None:
        if not isinstance(self.fps, numbers.Real) or not math.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"SamplingConfig.fps must be a positive finite number, got {self.fps!r}")
        for name in ("min_frames", "max_frames", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is None and (name == "max_frames" or name.endswith("pixels")):
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SamplingConfig.{name} must be a positive integer, got {value!r}")
        if self.max_frames is not None and self.min_frames > self.max_frames:
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
    timestamps: np.ndarray  # float64 (n,), seconds from the first frame: presentation time of each sampled frame
    video_fps: float  # native (average) fps of the source
    total_frames: int  # frames in the source
    sampled_fps: float  # the fps given: n / duration
    requested_fps: float = 0.0  # the fps asked for (SamplingConfig.fps); above sampled_fps when capped
    duration: float = 0.0  # seconds the source covers: last frame's time + its display duration
    capped: bool = False  # max_frames lowered the fps below the one asked for

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


def _check_times(frame_times: np.ndarray, total_frames: int, source: object) -> np.ndarray:
    times = np.asarray(frame_times, dtype=np.float64)
    if times.shape != (total_frames,) or not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0):
        raise VideoError(source, f"frame times must be {total_frames} finite non-decreasing seconds")
    return times - times[0]


def _duration(times: np.ndarray, video_fps: float, exact: bool) -> float:
    """Seconds from the first frame to the end of the last, which is shown as long as the interval before it.

    `exact` (times derived from the constant rate) keeps the recipe's `total / fps`; measured times are rounded
    to microseconds so that a 10 s clip is not 9.999999 s (and two frames short after flooring).
    """
    if exact or len(times) < 2 or times[-1] <= 0:
        return len(times) / video_fps
    return round(float(times[-1] + (times[-1] - times[-2])), 6)


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame whose time is nearest each target (the earlier one on a tie)."""
    right = np.clip(np.searchsorted(times, targets, side="left"), 1, len(times) - 1)
    left = right - 1
    return np.where(targets - times[left] <= times[right] - targets, left, right).astype(np.int64)


def sample_frames(
    total_frames: int,
    video_fps: float,
    config: SamplingConfig,
    *,
    frame_times: np.ndarray | None = None,
    source: object = "<frames>",
) -> FrameSampling:
    """Pick frames evenly spaced in time at `config.fps`, clamped to [min_frames, max_frames], rounded down to even.

    Follows qwen-vl-utils' `smart_nframes` (floor of the clamped count, no rounding first) on the video's duration.
    `frame_times` (float (total_frames,), seconds, presentation order) makes the choice uniform in presentation
    time and stamps each frame with its own time; without them frame i is at i / video_fps. A video shorter than
    `min_frames` (rounded up to even) gives all its frames, the last one repeated when the count is odd, so a
    1-frame video samples [0, 0]: n is always even and >= 2. When `max_frames` lowers the fps below the one asked
    for, a warning is logged and `capped` is set; `requested_fps` and `sampled_fps` record both.
    """
    if total_frames <= 0:
        raise EmptyVideoError(source, "video has no frames")
    if not math.isfinite(video_fps) or video_fps <= 0:
        raise VideoError(source, f"invalid frame rate {video_fps!r}")
    times = (np.arange(total_frames, dtype=np.float64) / float(video_fps) if frame_times is None
             else _check_times(frame_times, total_frames, source))
    duration = _duration(times, float(video_fps), exact=frame_times is None)
    min_n = _ceil_even(config.min_frames)
    capped = False
    if total_frames < min_n:
        indices = np.arange(total_frames, dtype=np.int64)
        if total_frames % FRAME_FACTOR:
            indices = np.append(indices, indices[-1])
    else:
        wanted = duration * config.fps
        limit = total_frames if config.max_frames is None else min(config.max_frames, total_frames)
        max_n = _floor_even(limit)
        n = max(FRAME_FACTOR, _floor_even(min(max(wanted, min_n), max_n)))
        uncapped = max(FRAME_FACTOR, _floor_even(min(max(wanted, min_n), total_frames)))
        capped = n < uncapped
        if frame_times is None:  # constant rate: the reference recipe, exactly
            indices = np.linspace(0, total_frames - 1, n).round().astype(np.int64)
        else:
            indices = _nearest(times, np.linspace(0.0, times[-1], n))
    timestamps = times[indices]  # float64 (n,)
    sampled_fps = len(indices) / duration
    if capped:
        logger.warning(
            "video %s: max_frames=%d lowers the sampling rate from %.3g to %.3g fps (%.1f s of video); "
            "raise --max-frames to keep %.3g fps", source, config.max_frames, config.fps, sampled_fps, duration,
            config.fps)
    indices.setflags(write=False)
    timestamps.setflags(write=False)
    return FrameSampling(
        indices=indices,
        timestamps=timestamps,
        video_fps=float(video_fps),
        total_frames=int(total_frames),
        sampled_fps=float(sampled_fps),
        requested_fps=float(config.fps),
        duration=float(duration),
        capped=bool(capped),
    )


def sample_source(video: object, config: SamplingConfig) -> FrameSampling:
    """`sample_frames` for an opened video source, using its presentation times when it offers `frame_times`."""
    times = getattr(video, "frame_times", None)
    return sample_frames(video.num_frames, video.fps, config, frame_times=times, source=video.source)


def segment(source: str, sampling: FrameSampling, *, size: tuple[int, int], start: float = 0.0,
            first_frame: int = 0, offset: float = 0.0) -> dict:
    """What a cache records of one prefilled source, so each of its frames maps back to that source.

    `size` is the source's (width, height); `start` the source time (s) of its first frame (a clip's window);
    `first_frame` / `offset` where its sampled frames and times begin in the cache (non-zero when appended).
    A cache frame at time t of this segment is at source time `start + t - offset`.
    """
    return {"source": str(source), "window": [float(start), float(start) + sampling.duration],
            "frames": [int(first_frame), int(first_frame) + sampling.num_frames], "offset": float(offset),
            "size": [int(size[0]), int(size[1])], "requested_fps": sampling.requested_fps,
            "sampled_fps": sampling.sampled_fps}


def take_all(num_frames: int, fps: float) -> FrameSampling:
    """Every frame of an already-sampled frame array, at `fps`: nothing is dropped or repeated."""
    indices = np.arange(num_frames, dtype=np.int64)
    timestamps = indices / float(fps)
    indices.setflags(write=False)
    timestamps.setflags(write=False)
    return FrameSampling(indices=indices, timestamps=timestamps, video_fps=float(fps), total_frames=int(num_frames),
                         sampled_fps=float(fps), requested_fps=float(fps), duration=num_frames / float(fps))


def resume_timing(segments: list[dict], timestamps: list[float], duration: float, sampled_fps: float,
                  new: dict, *, frame_size: tuple[int, int], new_frame_size: tuple[int, int]) -> tuple[float, list[dict]]:
    """Where a source appended to a cached stream starts (cache seconds), and the segments with it added.

    `new` is the appended source's `segment`; the stream's resized `frame_size` (H, W) must equal the new
    source's `new_frame_size`: the model's patch grid cannot change mid-stream, and squeezing another shape into
    it would distort every appended frame, so a different size is refused with a VideoError naming the source.
    Caches without a recorded duration continue one sampled interval after their last frame.
    """
    if tuple(new_frame_size) != tuple(frame_size):
        width, height = new["size"]
        was = f" of {segments[-1]['size'][0]}x{segments[-1]['size'][1]}" if segments else ""
        raise VideoError(new["source"], f"frame size {width}x{height} (resized {new_frame_size[1]}x"
                         f"{new_frame_size[0]}) differs from the cached stream{was} (resized {frame_size[1]}x"
                         f"{frame_size[0]}); append only clips of the same frame size, or prefill it as a new cache")
    if duration > 0:
        offset = float(duration)
    else:
        offset = timestamps[-1] + 1.0 / sampled_fps if timestamps else 0.0
    lo = len(timestamps)
    added = dict(new, frames=[lo, lo + new["frames"][1] - new["frames"][0]], offset=offset)
    return offset, [*segments, added]
