"""The interface every decoded video offers (`VideoSource`), an in-memory one, and bounded batch iteration.

Backends (decord, PyAV) live in their own modules; this one imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from statekv.errors import EmptyVideoError, VideoError
from statekv.profiling import DECODE, timed_iter


@runtime_checkable
class VideoSource(Protocol):
    """A video whose frames can be read by index; what `open_video` returns."""

    source: str  # path/URL/name, for error messages
    num_frames: int
    fps: float
    height: int
    width: int

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Return uint8 (n, H, W, 3) RGB frames at `indices` (any order, duplicates allowed)."""
        ...

    def close(self) -> None:
        """Release decoder state and any temporary files."""
        ...


@runtime_checkable
class BatchedVideoSource(VideoSource, Protocol):
    """A source that streams batches in one pass more cheaply than repeated `read` calls."""

    def iter_batches(self, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
        """Yield uint8 (b, H, W, 3) batches, b <= batch_frames, covering `indices` in order."""
        ...


def check_indices(indices: np.ndarray | list[int], num_frames: int, source: str) -> np.ndarray:
    """Return `indices` as int64 (n,), raising IndexError when one is outside [0, num_frames)."""
    arr = np.asarray(indices)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"video {source!r}: indices must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_frames):
        raise IndexError(
            f"video {source!r}: frame indices must lie in [0, {num_frames}), got [{arr.min()}, {arr.max()}]"
        )
    return arr


def presentation_times(times: np.ndarray, num_frames: int) -> np.ndarray | None:
    """float64 (num_frames,) seconds from the first frame when `times` (a reader's PTS in seconds) are usable:
    finite, one per frame, non-decreasing. None otherwise, and sampling then assumes a constant frame rate."""
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (num_frames,) or not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0):
        return None
    return times - times[0]


def iter_frame_batches(video: VideoSource, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
    """Yield the frames at `indices` in order as uint8 (b, H, W, 3) batches with b <= batch_frames.

    Memory is bounded by `batch_frames` whatever the video length. Sources that decode sequentially (PyAV) stream
    all batches from one decoding pass; others get one `read` per batch. Arguments are checked at call time.
    """
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    indices = check_indices(indices, video.num_frames, video.source)
    if isinstance(video, BatchedVideoSource):
        return timed_iter(DECODE, video.iter_batches(indices, batch_frames))
    return timed_iter(DECODE, (video.read(indices[start : start + batch_frames])
                               for start in range(0, len(indices), batch_frames)))


class FramesSource:
    """A `VideoSource` over frames already in memory, so arrays take the same path as files."""

    def __init__(self, frames: np.ndarray, fps: float, *, source: str = "<frames>") -> None:
        self.source = str(source)
        if not isinstance(frames, np.ndarray):
            raise VideoError(self.source, f"frames must be a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(
                self.source, f"frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} {tuple(frames.shape)}"
            )
        if frames.shape[0] == 0:
            raise EmptyVideoError(self.source, "frames array has no frames")
        if not math.isfinite(fps) or fps <= 0:
            raise VideoError(self.source, f"fps must be a positive finite number, got {fps!r}")
        self._frames = frames  # (T, H, W, 3)
        self.num_frames, self.height, self.width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
        self.fps = float(fps)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Return a copy of the frames at `indices`: uint8 (n, H, W, 3)."""
        return self._frames[check_indices(indices, self.num_frames, self.source)]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> FramesSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClipSource:
    """The frames of `base` within [start, end) seconds of presentation time, as a video of its own.

    Its `frame_times` start at 0; `start_time` is where in `base` its first frame is, which a cache records as its
    window so that each frame maps back to the source. NaN for `start` / `end` means the start / end of `base`.
    """

    def __init__(self, base: VideoSource, start: float, end: float) -> None:
        self.base, self.source, self.fps = base, base.source, base.fps
        self.height, self.width = base.height, base.width
        times = getattr(base, "frame_times", None)
        if times is None:
            times = np.arange(base.num_frames, dtype=np.float64) / base.fps
        first = 0 if math.isnan(start) else int(np.searchsorted(times, start - 1e-6, side="left"))
        last = base.num_frames if math.isnan(end) else int(np.searchsorted(times, end - 1e-6, side="left"))
        if last <= first:
            raise EmptyVideoError(base.source, f"no frames in [{start}, {end}) s of a {base.num_frames}-frame video")
        self.offset, self.num_frames = first, last - first
        self.start_time = float(times[first])
        self.frame_times = times[first:last] - times[first]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) frames at clip `indices`."""
        return self.base.read(check_indices(indices, self.num_frames, self.source) + self.offset)

    def iter_batches(self, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
        """The clip's frames at `indices` in bounded batches, streamed by `base` when it can."""
        return iter_frame_batches(self.base, check_indices(indices, self.num_frames, self.source) + self.offset,
                                  batch_frames)

    def close(self) -> None:
        """Close `base`."""
        self.base.close()
