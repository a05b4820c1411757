"""`open_video`: find a video's bytes (local path, `file://`, any fsspec URL, file object) and pick a decoder.

Backends: "decord" (random access; the default for paths), "pyav" (streams; the default for file objects) and
"auto" (decord, falling back to PyAV when decord is missing or cannot decode the file). decord reads file objects
fully into memory, so for remote URLs it gets a local temporary copy, removed when the reader is closed; PyAV
streams remote objects through an fsspec file object instead.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import fsspec

from statekv.errors import VideoError, VideoNotFoundError
from statekv.video.decord_reader import DecordReader
from statekv.video.pyav_reader import PyAVReader
from statekv.video.source import FramesSource, VideoSource, iter_frame_batches

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FramesSource", "VideoSource", "iter_frame_batches", "open_video"]

BACKENDS = ("auto", "decord", "pyav")
_LOCAL_PROTOCOLS = (None, "file", "local")


def open_video(
    source: str | os.PathLike | BinaryIO,
    *,
    backend: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> VideoSource:
    """Open a video for reading frames by index; close it (or use `with`) to free decoders and temporary files.

    `storage_options` go to fsspec for remote URLs (e.g. `{"client_kwargs": {"endpoint_url": ...}}` for S3) and
    are ignored for local paths and file objects. Raises VideoNotFoundError, VideoDecodeError or EmptyVideoError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if hasattr(source, "read"):
        name = getattr(source, "name", None) or getattr(source, "path", None)
        name = name if isinstance(name, str) else "<file object>"
        if backend == "decord":
            return DecordReader(source, name)  # decord copies the whole stream into memory
        return PyAVReader(source, name)  # "auto" streams file objects with PyAV

    name = os.fspath(source)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    protocol, path = fsspec.core.split_protocol(name)
    if protocol in _LOCAL_PROTOCOLS:
        if not os.path.isfile(path):
            reason = "not a file (a directory)" if os.path.isdir(path) else "no such file"
            raise VideoNotFoundError(name, reason)
        return _open_path(path, name, backend, cleanup=None)

    fs, path = fsspec.core.url_to_fs(name, **(storage_options or {}))
    if backend == "pyav":
        try:
            stream = fs.open(path, "rb")
        except FileNotFoundError as err:
            raise VideoNotFoundError(name, "no such file") from err
        return _construct(lambda: PyAVReader(stream, name, on_close=stream.close), stream.close)
    local = _download(fs, path, name)
    return _open_path(local, name, backend, cleanup=lambda: _remove(local))


def _construct(build: Callable[[], VideoSource], cleanup: Callable[[], None] | None) -> VideoSource:
    """Build a reader; on failure run `cleanup`, which a successful reader instead runs on close."""
    try:
        return build()
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise


def _open_path(path: str, name: str, backend: str, *, cleanup: Callable[[], None] | None) -> VideoSource:
    """Open a local file with `backend`; "auto" tries decord, then PyAV."""
    if backend == "pyav":
        return _construct(lambda: PyAVReader(path, name, on_close=cleanup), cleanup)
    if backend == "decord":
        return _construct(lambda: DecordReader(path, name, on_close=cleanup), cleanup)
    try:
        return DecordReader(path, name, on_close=cleanup)
    except ImportError as err:
        logger.debug("decord unavailable (%s); opening %s with PyAV", err, name)
        decord_error: VideoError | None = None
    except VideoError as err:
        logger.debug("decord failed on %s (%s); retrying with PyAV", name, err.reason)
        decord_error = err
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise
    try:
        return _construct(lambda: PyAVReader(path, name, on_close=cleanup), cleanup)
    except VideoError as err:
        if decord_error is None:
            raise
        raise type(err)(name, f"{err.reason}; {decord_error.reason}") from err


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
