"""Errors of the cache store: each names the cache (URI or video id) and the part at fault.

Which error means what (callers such as the service map them to status codes by class, never by message):

| class | meaning | retry? |
| --- | --- | --- |
| `CacheNotFoundError` | no committed cache (no manifest) at the URI | no: prefill the video |
| `CacheCorruptError` | a checksum, size, schema or format check failed: the stored bytes are wrong | no: re-prefill |
| `CacheUnavailableError` | the store could not be read (dropped connection, timeout, I/O error) | yes, later |
| `CacheChangedError` | the cache was re-prefilled while it was being read (its old files are gone) | yes, at once |
| `ConcurrentWriteError` | another writer committed this cache first; this attempt was discarded | no (or re-run) |

`retryable` says the same on every class, so a caller can decide without a table of its own. A
`PermissionError` from the filesystem (denied credentials) is passed through unchanged.
"""

from __future__ import annotations

from statekv.errors import StateKVError


class CacheStoreError(StateKVError):
    """Base class of the store's errors."""

    retryable: bool = False


class CacheNotFoundError(CacheStoreError, FileNotFoundError):
    """No committed cache (no manifest.json) at `uri`."""

    def __init__(self, uri: str, reason: str = "no committed cache (manifest.json missing)") -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"cache {uri!r}: {reason}")


class CacheCorruptError(CacheStoreError, ValueError):
    """A stored object is truncated, altered, unreadable as Parquet, or its manifest breaks the schema (`part`
    names the file, chunk, layer or manifest field). Only checksum and format failures raise this."""

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
class CacheUnavailableError(CacheStoreError, ConnectionError):
    """The store did not deliver the bytes (a dropped connection, a timeout, an I/O error): retry later.

    A `ConnectionError`, so code that handles unreachable storage generically handles this too.
    """

    retryable = True

    def __init__(self, video_id: str, part: str, cause: BaseException) -> None:
        self.video_id = video_id
        self.part = part
        self.cause = cause
        super().__init__(f"cache of video {video_id!r}: the store failed while reading {part} "
                         f"({type(cause).__name__}: {cause}); retry")


class CacheChangedError(CacheStoreError):
    """The cache was re-prefilled (a new manifest committed) while a reader was using the old one: load it again."""

    retryable = True

    def __init__(self, video_id: str, created: str | None) -> None:
        self.video_id = video_id
        self.created = created
        super().__init__(f"cache of video {video_id!r} was replaced by a newer commit (created {created}) while "
                         "it was being read; load it again")


class ConcurrentWriteError(CacheStoreError):
    """Another writer committed this cache between this writer's start and its commit (single-winner commits)."""

    def __init__(self, uri: str, created: str | None) -> None:
        self.uri = uri
        self.created = created
        super().__init__(f"cache {uri!r}: another writer committed this cache at {created or 'an unknown time'} "
                         "while this one was writing; this attempt was discarded (its files removed)")
