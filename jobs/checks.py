"""Cheap checks an entry point runs before anything heavy (loading a model, starting Ray): each raises the error the
library would raise later, naming the input and the reason, but in milliseconds instead of after a model load.

Only light imports here (no torch, transformers or ray at module level).
"""

from __future__ import annotations

import os
from typing import Any

from statekv.errors import EmptyVideoError, VideoNotFoundError
from statekv.locate import locate_checkpoint
from statekv.video_ids import validate_video_id


def is_local(uri: str) -> bool:
    """True for a local path (or file:// URL), False for s3://, http:// and other remote URLs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri)


def check_model(name: str) -> str:
    """The checkpoint to load (a local directory made absolute), or ModelNotFoundError at once."""
    return locate_checkpoint(name)[0]


def check_video(video: str) -> None:
    """A local video must exist and hold bytes (remote ones are checked when they are opened)."""
    if not is_local(video):
        return
    if not os.path.isfile(local_path(video)):
        reason = "is a directory, not a video file" if os.path.isdir(local_path(video)) else "no such file"
        raise VideoNotFoundError(video, reason)
    if os.path.getsize(local_path(video)) == 0:
        raise EmptyVideoError(video, "empty file (0 bytes)")


def check_cache_uri(uri: str) -> str:
    """The video id of a cache location `<root>/<video_id>`: the same rule the store and the service apply."""
    video_id = uri.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    try:
        return validate_video_id(video_id)
    except ValueError as err:
        raise ValueError(f"cache location {uri!r}: {err}") from None


def check_root(root: str, storage_options: Any = None) -> None:
    """A cache root or input must exist: a local directory, or an S3 prefix holding at least one object."""
    if is_local(root):
        if not os.path.exists(local_path(root)):
            raise FileNotFoundError(f"{root!r}: no such directory")
        return
    from statekv.store.fs import resolve

    fs, path = resolve(root, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{root!r}: no such bucket or prefix")


def check_index_input(spec: str, storage_options: Any = None) -> None:
    """An `index` input (prefix, glob, manifest, shard) must match something."""
    is_glob = any(c in spec for c in "*?[")
    if is_local(spec):
        import glob

        found = glob.glob(local_path(spec)) if is_glob else os.path.exists(local_path(spec))
    else:
        from statekv.store.fs import resolve

        fs, path = resolve(spec, storage_options)
        found = fs.glob(path) if is_glob else fs.exists(path)
    if not found:
        raise FileNotFoundError(f"input {spec!r}: no such file, directory or prefix")


def quiet_transformers() -> None:
    """No weight-loading / writing progress bars unless -v: they would drown the command's own output. And each
    transformers message once: its own handler prints it, and with CI set transformers also propagates it to the
    root logger, whose handler (ours) printed it a second time."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_propagation()
    if not logging.getLogger().isEnabledFor(logging.INFO):
        hf_logging.disable_progress_bar()
