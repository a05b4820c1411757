"""decord backend: random access by frame index with `VideoReader.get_batch`.

decord reads a file object fully into memory, so remote videos reach it as local temporary files (see
`statekv.video.readers`). Its errors (`DECORDError`, `RuntimeError`) never leave this module unwrapped.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from statekv.errors import EmptyVideoError, VideoDecodeError
from statekv.video.source import check_indices, presentation_times

logger = logging.getLogger(__name__)


_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[20:11:54] /src/video/video_reader.cc:486: "


def _reason(err: BaseException) -> str:
    """decord's message on one line, without the C++ stack trace and source locations it adds."""
    text = str(err).strip().split("\n\nStack trace")[0]
    lines = [_LOG_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]
    return "decord: " + (" ".join(lines)[:500] if lines else type(err).__name__)


class DecordReader:
    """A `VideoSource` decoding with decord; frame count, fps and presentation times come from decord's index.

    `frame_times`: float64 (num_frames,) seconds from the first frame, from the packets' presentation timestamps.
    """

    def __init__(
        self,
        target: str | BinaryIO,
        source: str,
        *,
        num_threads: int = 0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        import decord  # ImportError is the caller's cue to fall back to PyAV

        self.source = source
        self._closed = False
        self._on_close: Callable[[], None] | None = None
        self._errors = (decord.DECORDError, RuntimeError)
        if not isinstance(target, str):
            target.seek(0)  # decord reads from the current position; PyAV always starts at 0
        try:
            self._vr = decord.VideoReader(target, ctx=decord.cpu(0), num_threads=num_threads)
            self.num_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps())
            if self.num_frames == 0:
                raise EmptyVideoError(source, "video has no frames")
            first = self._vr[0].asnumpy()  # (H, W, 3); proves the stream decodes
            times = np.asarray(self._vr.get_frame_timestamp(np.arange(self.num_frames))[:, 0], np.float64)
        except self._errors as err:
            raise VideoDecodeError(source, _reason(err)) from err
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise VideoDecodeError(source, f"decord: unknown frame rate ({self.fps})")
        self.height, self.width = int(first.shape[0]), int(first.shape[1])
        self.frame_times = presentation_times(times, self.num_frames)
        self._on_close = on_close  # the caller keeps cleanup duty until construction succeeds

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Return uint8 (n, H, W, 3) RGB frames at `indices`."""
        indices = check_indices(indices, self.num_frames, self.source)
        if len(indices) == 0:
            return np.empty((0, self.height, self.width, 3), dtype=np.uint8)
        try:
            return self._vr.get_batch(indices.tolist()).asnumpy()  # (n, H, W, 3)
        except self._errors as err:
            raise VideoDecodeError(self.source, _reason(err)) from err

    def close(self) -> None:
        """Drop the decoder and run the opener's cleanup (removing a temporary file) once."""
        if self._closed:
            return
        self._closed = True
        self._vr = None
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> DecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
