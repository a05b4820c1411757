"""Errors of the cache store: each names the cache (URI or video id) and the part at fault."""

from __future__ import annotations

from statekv.errors import StateKVError


class CacheStoreError(StateKVError):
    """Base class of the store's errors."""


class CacheNotFoundError(CacheStoreError, FileNotFoundError):
    """No committed cache (no manifest.json) at `uri`."""

    def __init__(self, uri: str, reason: str = "no committed cache (manifest.json missing)") -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"cache {uri!r}: {reason}")


class CacheCorruptError(CacheStoreError, ValueError):
    """A stored object is truncated, altered or unreadable; `part` names the file, chunk and/or layer."""

    def __init__(self, video_id: str, part: str, reason: str) -> None:
        self.video_id = video_id
        self.part = part
        self.reason = reason
        super().__init__(f"cache of video {video_id!r} is corrupt at {part}: {reason}")


class CacheVersionError(CacheCorruptError):
    """The cache was written in a format version this statekv does not read (e.g. v1: re-index it)."""

    def __init__(self, video_id: str, reason: str) -> None:
        self.video_id = video_id
        self.part = "manifest.json"
        self.reason = reason
        CacheStoreError.__init__(self, f"cache of video {video_id!r}: {reason}")
