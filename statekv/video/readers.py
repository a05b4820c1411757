"""`open_video`: find a video's bytes (local path, `file://`, any fsspec URL, file object) and pick a decoder.

Backends: "pyav" (streams, one forward pass, host memory flat in video length), "decord" (random access) and
"auto": PyAV, falling back to decord when PyAV cannot open the file or fails while decoding it (the frames not yet
read then come from decord). Where neither can decode, one `VideoDecodeError` names the file and both reasons.
PyAV leads because it decoded every codec of docs/benchmarks.md ("Decoders"), AV1 included, and because decord's
decoder thread runs ahead of the reader: between two reads separated by model work it buffers frames until the
next seek, so decord's host memory grows with the stretch of video between keyframes. decord reads file objects
fully into memory, so for remote URLs it gets a local temporary copy, removed when the reader is closed; PyAV
streams remote objects through an fsspec file object instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
import numpy as np

from statekv.errors import EmptyVideoError, VideoDecodeError, VideoError, VideoNotFoundError
from statekv.video.decord_reader import DecordReader
from statekv.video.pyav_reader import PyAVReader
from statekv.video.source import FramesSource, VideoSource, iter_frame_batches

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FallbackReader", "FramesSource", "VideoSource", "iter_frame_batches", "open_video"]

BACKENDS = ("auto", "decord", "pyav")
_LOCAL_PROTOCOLS = (None, "file", "local")


def open_video(
    source: str | os.PathLike | BinaryIO,
    *,
    backend: str = "auto",
    storage_options: dict[str, Any] | None = None,
    name: str | None = None,
) -> VideoSource:
    """Open a video for reading frames by index; close it (or use `with`) to free decoders and temporary files.

    `storage_options` go to fsspec for remote URLs (e.g. `{"client_kwargs": {"endpoint_url": ...}}` for S3) and
    are ignored for local paths and file objects. `name` is what errors and the reader's `source` call a local
    file (default: its path), e.g. the object a local scratch copy was fetched from. Raises VideoNotFoundError,
    VideoDecodeError or EmptyVideoError (an empty file is one, before any decoder runs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if hasattr(source, "read"):
        name = getattr(source, "name", None) or getattr(source, "path", None)
        name = name if isinstance(name, str) else "<file object>"
        if backend == "decord":
            return DecordReader(source, name)  # decord copies the whole stream into memory
        return PyAVReader(source, name)  # "auto" streams file objects with PyAV

    location = os.fspath(source)
    if isinstance(location, bytes):
        location = os.fsdecode(location)
    protocol, path = fsspec.core.split_protocol(location)
    if protocol in _LOCAL_PROTOCOLS:
        name = name or location
        if not os.path.isfile(path):
            reason = "not a file (a directory)" if os.path.isdir(path) else "no such file"
            raise VideoNotFoundError(name, reason)
        check_not_empty(path, name)
        return _open_path(path, name, backend, cleanup=None)
    name = location

    fs, path = fsspec.core.url_to_fs(name, **(storage_options or {}))
    if backend == "pyav":
        try:
            stream = fs.open(path, "rb")
        except FileNotFoundError as err:
            raise VideoNotFoundError(name, "no such file") from err
        return _construct(lambda: PyAVReader(stream, name, on_close=stream.close), stream.close)
    local = _download(fs, path, name)
    _construct(lambda: check_not_empty(local, name), lambda: _remove(local))
    return _open_path(local, name, backend, cleanup=lambda: _remove(local))


def check_not_empty(path: str, name: str) -> None:
    """EmptyVideoError for a 0-byte local file (decoders would only say "Invalid data found")."""
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(name, "empty file (0 bytes)")


def _construct(build: Callable[[], VideoSource], cleanup: Callable[[], None] | None) -> VideoSource:
    """Build a reader; on failure run `cleanup`, which a successful reader instead runs on close."""
    try:
        return build()
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise


def _open_path(path: str, name: str, backend: str, *, cleanup: Callable[[], None] | None) -> VideoSource:
    """Open a local file with `backend`; "auto" is PyAV, falling back to decord (at open or while decoding)."""
    if backend == "pyav":
        return _construct(lambda: PyAVReader(path, name, on_close=cleanup), cleanup)
    if backend == "decord":
        return _construct(lambda: DecordReader(path, name, on_close=cleanup), cleanup)
    try:
        return FallbackReader(PyAVReader(path, name), lambda: DecordReader(path, name), on_close=cleanup)
    except EmptyVideoError:  # FFmpeg found no video frames: decord (FFmpeg too) would only say it less clearly
        if cleanup is not None:
            cleanup()
        raise
    except VideoError as err:
        logger.debug("pyav failed on %s (%s); retrying with decord", name, err.reason)
        pyav_error = err
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise
    try:
        return _construct(lambda: DecordReader(path, name, on_close=cleanup), cleanup)
    except ImportError:
        raise pyav_error from None
    except VideoError as err:
        raise type(pyav_error)(name, f"{pyav_error.reason}; {err.reason}") from err


class FallbackReader:
    """A `VideoSource` reading with `primary` until it fails to decode, then with the reader `fallback()` opens.

    Frames already read stay as they are; the rest come from the fallback, which must see the same video (frame
    count and size), else the error says so. Timing (`fps`, `frame_times`) is the primary's.
    """

    def __init__(self, primary: VideoSource, fallback: Callable[[], VideoSource], *,
                 on_close: Callable[[], None] | None = None) -> None:
        self._primary, self._open_fallback = primary, fallback
        self._fallback: VideoSource | None = None
        self.source, self.num_frames, self.fps = primary.source, primary.num_frames, primary.fps
        self.height, self.width = primary.height, primary.width
        self.frame_times = getattr(primary, "frame_times", None)
        self._on_close = on_close
        self._closed = False

    @property
    def backend(self) -> str:
        """Name of the reader in use: the primary's class until a decoding error switched to the fallback."""
        return type(self._fallback or self._primary).__name__

    def _switch(self, err: VideoError) -> VideoSource:
        if self._fallback is not None:
            return self._fallback
        try:
            fallback = self._open_fallback()
        except ImportError:
            raise err from None
        except VideoError as other:
            raise type(other)(self.source, f"{err.reason}; {other.reason}") from other
        logger.warning("video %s: %s; continuing with %s", self.source, err.reason, type(fallback).__name__)
        if (fallback.num_frames, fallback.height, fallback.width) != (self.num_frames, self.height, self.width):
            fallback.close()
            raise VideoDecodeError(self.source, f"{err.reason}; {type(fallback).__name__} sees "
                                                f"{fallback.num_frames} frames of {fallback.width}x{fallback.height}"
                                                f", not {self.num_frames} of {self.width}x{self.height}")
        self._primary.close()
        self._fallback, self._primary_error = fallback, err
        return fallback

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Return uint8 (n, H, W, 3) RGB frames at `indices`."""
        if self._fallback is None:
            try:
                return self._primary.read(indices)
            except VideoDecodeError as err:
                self._switch(err)
        with self._both_reasons():
            return self._fallback.read(indices)

    @contextlib.contextmanager
    def _both_reasons(self) -> Iterator[None]:
        """Errors of the fallback also say why the primary was given up."""
        try:
            yield
        except VideoError as err:
            raise type(err)(self.source, f"{self._primary_error.reason}; {err.reason}") from err

    def iter_batches(self, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
        """Yield uint8 (b, H, W, 3) batches, streamed by the primary (one PyAV pass); after a decoding error the
        frames not yet yielded stream from the fallback."""
        done = 0
        if self._fallback is None:
            try:
                for batch in iter_frame_batches(self._primary, indices, batch_frames):
                    done += len(batch)
                    yield batch
                return
            except VideoDecodeError as err:
                self._switch(err)
        if done < len(indices):
            with self._both_reasons():
                yield from iter_frame_batches(self._fallback, indices[done:], batch_frames)

    def close(self) -> None:
        """Close both readers and run the opener's cleanup (removing a temporary file) once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._primary.close()
            if self._fallback is not None:
                self._fallback.close()
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> FallbackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _download(fs: fsspec.AbstractFileSystem, path: str, name: str) -> str:
    """Copy a remote object to a local temporary file and return its path."""
    suffix = posixpath.splitext(path)[1]
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""  # helps FFmpeg's format probe
    fd, local = tempfile.mkstemp(prefix="statekv-video-", suffix=suffix)
    os.close(fd)
    try:
        fs.get_file(path, local)
    except FileNotFoundError as err:
        _remove(local)
        raise VideoNotFoundError(name, "no such file") from err
    except BaseException:
        _remove(local)
        raise
    logger.debug("downloaded %s to %s", name, local)
    return local


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
