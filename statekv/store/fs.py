"""URI -> (fsspec filesystem, path): local paths, file:// and s3:// (s3fs), with explicit S3 settings.

Only bytes move here; tensors are (de)serialised in `serde`. AWS credentials come from the usual environment
variables unless `StorageOptions` (or a plain dict of s3fs/fsspec options) says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass
class StorageOptions:
    """Settings for an S3-compatible store (MinIO, moto, ...); unset fields fall back to the AWS env vars."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    region: str | None = None
    anon: bool = False

    def to_fsspec(self) -> dict[str, Any]:
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        opts: dict[str, Any] = {"client_kwargs": client} if client else {}
        for name in ("key", "secret", "token"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.anon:
            opts["anon"] = True
        return opts


StorageOptionsLike = StorageOptions | dict[str, Any] | None


def fsspec_options(uri: str, storage_options: StorageOptionsLike) -> dict[str, Any]:
    """Options for `fsspec.url_to_fs`: a dict is taken as is; `endpoint_url`/`region` are moved where s3fs wants them."""
    if storage_options is None:
        opts: dict[str, Any] = {}
    elif isinstance(storage_options, StorageOptions):
        opts = storage_options.to_fsspec()
    else:
        opts = dict(storage_options)
        client = dict(opts.pop("client_kwargs", {}) or {})
        if "endpoint_url" in opts:
            client["endpoint_url"] = opts.pop("endpoint_url")
        if "region" in opts:
            client["region_name"] = opts.pop("region")
        if client:
            opts["client_kwargs"] = client
    if uri.startswith(("s3://", "s3a://")):
        # listings must see other writers' commits: no instance reuse across calls with stale directory caches
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("use_listings_cache", False)
    return opts


def resolve(uri: str | os.PathLike, storage_options: StorageOptionsLike = None,
            filesystem: fsspec.AbstractFileSystem | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `uri`; `filesystem` overrides the one the URI would give."""
    uri = os.fspath(uri)
    if filesystem is not None:
        return filesystem, filesystem._strip_protocol(uri).rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri, **fsspec_options(uri, storage_options))
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(getattr(fs, "fs", fs), LocalFileSystem) or isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so readers see the old object or the new one, never a partial one."""
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # rename is atomic on one POSIX filesystem
    else:
        fs.pipe_file(path, data)  # an S3 PUT is atomic: the key has the old or the new object
