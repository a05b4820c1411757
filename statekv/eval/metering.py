"""`ReadMeter`: an fsspec filesystem wrapper that counts the bytes and requests read through it.

The store reads through whatever filesystem it is given (`load_cache(..., filesystem=...)`), so wrapping the real one
(local or S3) measures what a question actually costs in transfer, not what the manifest says the cache holds.
"""

from __future__ import annotations

import threading
from typing import Any

import fsspec


class _CountingFile:
    """A read-only file object that reports every read to its meter."""

    def __init__(self, f: Any, meter: "ReadMeter") -> None:
        self._f = f
        self._meter = meter

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._meter.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_CountingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


class ReadMeter:
    """Wraps a filesystem; `bytes_read` and `requests` count what went through `open(...).read` and `cat_file`."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs  # `statekv.store.fs.is_local` looks through `.fs`
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self.requests += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes_read = 0
            self.requests = 0

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
        data = self.fs.cat_file(path, *args, **kwargs)
        self.add(len(data))
        return data

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = self.fs.open(path, mode, **kwargs)
        return _CountingFile(f, self) if "r" in mode else f

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)
