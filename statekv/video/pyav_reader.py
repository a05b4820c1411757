"""PyAV backend: streams from paths or file objects and decodes sequentially, keeping only requested frames.

Seeking by frame index is unreliable across containers, so every read is one forward decoding pass from the
start that stops after the last requested frame; memory holds only the frames asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from statekv.errors import EmptyVideoError, VideoDecodeError
from statekv.video.source import check_indices, presentation_times

logger = logging.getLogger(__name__)


class PyAVReader:
    """A `VideoSource` decoding with PyAV (FFmpeg).

    The whole file is demuxed once at open (its bytes are read, nothing is decoded) to collect every packet's
    presentation timestamp: `frame_times` (float64 (num_frames,), seconds from the first frame, None when the
    packets carry none). Frames come upright: a display rotation (phones' portrait video) is applied, as decord
    and players do. Frame count: the container's `stream.frames` when it states one, else the number of
    non-empty packets (Matroska/WebM). fps: `stream.average_rate`, falling back to `guessed_rate`.
    """

    def __init__(
        self,
        target: str | BinaryIO,
        source: str,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self._target = target  # local path or a seekable binary file object
        self._closed = False
        self._on_close: Callable[[], None] | None = None
        self._probe()
        self._on_close = on_close  # the caller keeps cleanup duty until construction succeeds

    def _probe(self) -> None:
        import av

        with self._open() as container:
            stream = self._video_stream(container)
            rate = stream.average_rate or stream.guessed_rate
            if not rate or rate <= 0:
                raise VideoDecodeError(self.source, "pyav: unknown frame rate")
            self.fps = float(rate)
            num_frames = int(stream.frames or 0)
            try:
                first = next(container.decode(stream), None)
            except av.FFmpegError as err:
                raise VideoDecodeError(self.source, f"pyav: {err}") from err
            if first is None:
                raise EmptyVideoError(self.source, "video stream has no decodable frames")
            self._coded = (int(first.height), int(first.width))
            # phones store portrait video as landscape plus a display rotation; show it upright, as players do
            self._turns = (int(getattr(first, "rotation", 0) or 0) // 90) % 4  # counterclockwise quarter turns
            self.height, self.width = self._coded[::-1] if self._turns % 2 else self._coded
        packets, pts = self._packet_times()
        self.num_frames = num_frames if num_frames > 0 else packets
        self.frame_times = None if pts is None else presentation_times(np.sort(pts), self.num_frames)

    def _open(self) -> Any:
        """Open a fresh container positioned at the start of the file."""
        import av

        if not isinstance(self._target, str):
            self._target.seek(0)
        try:
            return av.open(self._target, mode="r")
        except av.FFmpegError as err:
            raise VideoDecodeError(self.source, f"pyav: {err}") from err

    def _video_stream(self, container: Any) -> Any:
        if not container.streams.video:
            raise EmptyVideoError(self.source, "container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return stream

    def _packet_times(self) -> tuple[int, np.ndarray | None]:
        """Number of non-empty packets and their presentation times in seconds (None when any lacks a pts)."""
        import av

        times: list[float] = []
        missing = False
        with self._open() as container:
            stream = self._video_stream(container)
            base = stream.time_base
            try:
                for packet in container.demux(stream):
                    if packet.size <= 0:
                        continue
                    if packet.pts is None or base is None:
                        missing = True
                        times.append(0.0)
                    else:
                        times.append(float(packet.pts * base))
            except av.FFmpegError as err:
                raise VideoDecodeError(self.source, f"pyav: {err}") from err
        return len(times), None if missing else np.asarray(times, dtype=np.float64)

    def _decode_sorted(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """Yield one (H, W, 3) frame per entry of non-decreasing `indices`, in a single decoding pass."""
        import av

        if len(indices) == 0:
            return
        k, decoded = 0, 0
        with self._open() as container:
            stream = self._video_stream(container)
            try:
                for frame in container.decode(stream):
                    i = decoded
                    decoded += 1
                    if indices[k] != i:
                        continue
                    rgb = frame.to_ndarray(format="rgb24", width=self._coded[1], height=self._coded[0])
                    if self._turns:
                        rgb = np.ascontiguousarray(np.rot90(rgb, self._turns))  # (H, W, 3) as displayed
                    while k < len(indices) and indices[k] == i:
                        yield rgb
                        k += 1
                    if k == len(indices):
                        return
            except av.FFmpegError as err:
                raise VideoDecodeError(self.source, f"pyav: {err} (after {decoded} frames)") from err
        if decoded == 0:
            raise EmptyVideoError(self.source, "video stream has no decodable frames")
        raise VideoDecodeError(
            self.source,
            f"pyav: stream ended after {decoded} frames but frame {indices[k]} was requested "
            f"(container reports {self.num_frames})",
        )

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Return uint8 (n, H, W, 3) RGB frames at `indices` from one forward decoding pass."""
        indices = check_indices(indices, self.num_frames, self.source)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)  # (n, H, W, 3)
        for j, rgb in zip(order, self._decode_sorted(indices[order])):
            out[j] = rgb
        return out

    def iter_batches(self, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
        """Yield uint8 (b, H, W, 3) batches from one decoding pass when `indices` are non-decreasing.

        The container stays open between batches; unsorted indices fall back to one pass per batch.
        """
        indices = check_indices(indices, self.num_frames, self.source)
        if np.any(np.diff(indices) < 0):
            for start in range(0, len(indices), batch_frames):
                yield self.read(indices[start : start + batch_frames])
            return
        batch: list[np.ndarray] = []
        for rgb in self._decode_sorted(indices):
            batch.append(rgb)
            if len(batch) == batch_frames:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def close(self) -> None:
        """Run the opener's cleanup (closing a stream it opened, removing a temporary file) once."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> PyAVReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
