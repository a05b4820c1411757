"""`CacheStore`: the one front door to the caches under a root, `<root>/<video_id>/` on a local disk or S3.

The query service, the command line and the indexing job read and write caches only through it; the modules
behind it each have one job (manifest: schema, checks and reading the committed one; catalog: listing; reader /
writer: tensors <-> Parquet). One filesystem client serves every call (a new S3 client per call costs more than
a small read). Importing this module imports no tensor library: checking what is committed (`version`,
`manifest`, `list`, `reconcile`) stays free of torch; `load`, `writer`, `save` and `prefill` import the reader and
writer on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import fsspec

from statekv.store import catalog
from statekv.store.catalog import CacheListing
from statekv.store.errors import CacheNotFoundError
from statekv.store.fs import StorageOptionsLike, resolve
from statekv.store.manifest import manifest_version, read_manifest

if TYPE_CHECKING:
    import torch

    from statekv.cache import ModelInfo, VideoKVCache
    from statekv.store.writer import CacheWriter


class CacheStore:
    """The committed caches under `root`, addressed by video id."""

    def __init__(self, root: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                 filesystem: fsspec.AbstractFileSystem | None = None) -> None:
        self.root = os.fspath(root).rstrip("/") or "/"
        self.storage_options = storage_options
        self.fs, self.path = resolve(self.root, storage_options, filesystem)

    @classmethod
    def of_cache(cls, uri: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                 filesystem: fsspec.AbstractFileSystem | None = None) -> tuple["CacheStore", str]:
        """(the store holding the cache at `uri` = `<root>/<video_id>`, that video id): how a command that is
        given one cache's URI addresses it."""
        text = os.fspath(uri).rstrip("/")
        root, _, video_id = text.rpartition("/")
        if not video_id or root.endswith(":/") or root.endswith(":"):
            raise ValueError(f"cache URI {text!r} is not <root>/<video_id>")
        return cls(root or ".", storage_options=storage_options, filesystem=filesystem), video_id

    def __repr__(self) -> str:
        return f"CacheStore({self.root!r})"

    def uri(self, video_id: str) -> str:
        """Where the cache of `video_id` lives."""
        return f"{self.root}/{video_id}"

    # --- what is committed (no tensor library) ---------------------------------------------------------------

    def version(self, video_id: str) -> str | None:
        """The committed manifest's version (S3 ETag / MD5 of its bytes) at the cost of one HEAD; None when no
        cache is committed. Equal to a loaded cache's `manifest_version` while it is the committed one."""
        try:
            return manifest_version(self.uri(video_id), filesystem=self.fs)
        except CacheNotFoundError:
            return None

    def manifest(self, video_id: str) -> dict[str, Any]:
        """The committed, validated manifest (CacheNotFoundError / CacheCorruptError / CacheUnavailableError)."""
        return read_manifest(self.uri(video_id), filesystem=self.fs)

    def list(self, *, use_catalog: bool = True) -> CacheListing:
        """The committed caches, by video id, plus `invalid` (see `statekv.store.catalog.list_caches`)."""
        return catalog.list_caches(self.root, filesystem=self.fs, use_catalog=use_catalog)

    def reconcile(self, video_id: str, manifest: dict[str, Any]) -> None:
        """Make sure the root's catalog lists this committed manifest (a kill after a commit may have lost it)."""
        catalog.reconcile(self.uri(video_id), manifest, filesystem=self.fs)

    def rebuild_catalog(self) -> CacheListing:
        """Scan every manifest and replace the catalog's snapshot with what it finds."""
        return catalog.rebuild(self.root, filesystem=self.fs)

    # --- tensors (the reader and writer import torch) ----------------------------------------------------------

    def load(self, video_id: str, *, lazy: bool = True, chunks: Iterable[int] | None = None,
             layers: Iterable[int] | None = None, verify: bool = True,
             expect_model: "ModelInfo | None" = None) -> "VideoKVCache":
        """The committed cache, reading its manifest once (see `statekv.store.reader.load_cache`): with
        `expect_model`, a cache of another model or token layout is refused before any tensor is read."""
        from statekv.store.reader import load_cache

        return load_cache(self.uri(video_id), chunks=chunks, layers=layers, lazy=lazy, filesystem=self.fs,
                          verify=verify, expect_model=expect_model)

    def summary_keys(self, video_id: str, layer: int, *, chunks: Iterable[int] | None = None
                     ) -> "tuple[list[int], torch.Tensor]":
        """(chunk indices, (C, Hkv, D) mean keys) at `layer`: the retrieval index, without reading K/V."""
        from statekv.store.reader import load_summary_keys

        return load_summary_keys(self.uri(video_id), layer, chunks=chunks, filesystem=self.fs)

    def writer(self, video_id: str, **kwargs: Any) -> "CacheWriter":
        """A `CacheWriter` for `video_id` (mode, int8, ... as its keyword arguments)."""
        from statekv.store.writer import CacheWriter

        return CacheWriter(self.uri(video_id), filesystem=self.fs, **kwargs)

    def save(self, video_id: str, cache: "VideoKVCache", **kwargs: Any) -> dict[str, Any]:
        """Write an in-memory cache (all its chunks); returns the manifest."""
        from statekv.store.writer import save_cache

        return save_cache(cache, self.uri(video_id), filesystem=self.fs, **kwargs)

    def prefill(self, engine: Any, video: Any, video_id: str, **kwargs: Any) -> dict[str, Any]:
        """Prefill `video` straight into the cache of `video_id` (see `statekv.store.prefill.prefill_to_store`;
        a video on the store's object store is read with its storage options unless `storage_options` is given)."""
        from statekv.store.prefill import prefill_to_store

        return prefill_to_store(engine, video, self.uri(video_id), storage_options=self.storage_options,
                                filesystem=self.fs, **kwargs)

    def sweep(self, video_id: str, **kwargs: Any) -> list[str]:
        """Delete what the committed manifest does not name, once old enough (see `statekv.store.writer.sweep`)."""
        from statekv.store.writer import sweep

        return sweep(self.uri(video_id), filesystem=self.fs, **kwargs)
