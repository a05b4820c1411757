"""Stable video ids that are safe as object names: derived from a path relative to an input root, or validated.

Pure string arithmetic (no I/O): the same relative path gives the same id on every run and machine, so a cache's
location `<root>/<video_id>/` is deterministic and re-running an indexing job finds what it committed before.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

MAX_LEN = 120
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED_PREFIXES = ("parts-",)  # the store's attempt folders
SEPARATOR = "--"  # stands for "/" between path components
# The whole rule of `validate_video_id` as one regular expression, for places that need a pattern (an OpenAPI
# schema, the query service's request checks): a letter or digit first, then letters, digits, '.', '_', '-', at most
# MAX_LEN characters, not starting with a reserved prefix, not ending with '.'.
VIDEO_ID_PATTERN = rf"^(?!{'|'.join(map(re.escape, _RESERVED_PREFIXES))})[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LEN - 1}}}(?<!\.)$"
_PATTERN = re.compile(VIDEO_ID_PATTERN)


def short_hash(text: str, n: int = 8) -> str:
    """First `n` hex digits of the SHA-1 of `text`."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def is_valid_video_id(video_id: object) -> bool:
    """Whether `video_id` is a safe object name (the rule `validate_video_id` explains when it is not)."""
    return isinstance(video_id, str) and _PATTERN.fullmatch(video_id) is not None


def validate_video_id(video_id: str) -> str:
    """Return `video_id` if it is a safe object name; raise ValueError naming the rule it breaks."""
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"video id must be a non-empty string, got {video_id!r}")
    if len(video_id) > MAX_LEN:
        raise ValueError(f"video id {video_id!r} is longer than {MAX_LEN} characters")
    if not _VALID.fullmatch(video_id):
        raise ValueError(f"video id {video_id!r} must start with a letter or digit and contain only "
                         "letters, digits, '.', '_' and '-'")
    if video_id.startswith(_RESERVED_PREFIXES) or video_id.endswith("."):
        raise ValueError(f"video id {video_id!r} is reserved (starts with 'parts-' or ends with '.')")
    return video_id


def video_id_from_path(relative_path: str) -> str:
    """The id of the video at `relative_path` (relative to the input root, '/'-separated).

    The extension is dropped and '/' becomes '--'; any other unsafe character becomes '_'. When that changed
    anything beyond those two rules (or the name had to be shortened), a short hash of the full relative path is
    appended so that different paths do not collapse onto one id.
    """
    rel = relative_path.replace("\\", "/").strip("/")
    if not rel:
        raise ValueError("cannot derive a video id from an empty path")
    stem, _ = posixpath.splitext(rel)
    parts = [p for p in (stem or rel).split("/") if p not in ("", ".")]
    joined = SEPARATOR.join(parts)
    safe = _SAFE.sub("_", joined).lstrip("._-")
    changed = safe != joined
    if len(safe) > MAX_LEN - 9:
        safe, changed = safe[: MAX_LEN - 9].rstrip("._-"), True
    if not safe or safe.startswith(_RESERVED_PREFIXES) or safe.endswith("."):
        safe, changed = ("v" + safe).rstrip("."), True
    return f"{safe}-{short_hash(rel)}" if changed else safe


def disambiguate(ids_and_paths: list[tuple[str, str]]) -> list[str]:
    """Make derived ids unique: an id shared by several paths gets a short hash of each path appended."""
    counts: dict[str, int] = {}
    for vid, _ in ids_and_paths:
        counts[vid] = counts.get(vid, 0) + 1
    out = []
    for vid, path in ids_and_paths:
        out.append(vid if counts[vid] == 1 else f"{vid[: MAX_LEN - 9]}-{short_hash(path)}")
    return out
