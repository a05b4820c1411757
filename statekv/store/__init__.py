"""Cache store: a `VideoKVCache` as Parquet objects + a manifest under `<root>/<video_id>/` (local or S3).

    with CacheWriter("s3://bucket/caches/vid1") as w:
        cache = engine.prefill(video, sink=w.write_chunk, keep_chunks=False)
        w.commit(cache)
    cache = load_cache("s3://bucket/caches/vid1")          # lazy: chunks read on first access

Bytes move through fsspec (`fs`), tensors are (de)serialised in `serde`; the layout is in `format` and
docs/cache-format.md.
"""

from __future__ import annotations

import os
from typing import Any

from statekv.store import serde
from statekv.store.errors import CacheCorruptError, CacheNotFoundError, CacheStoreError, CacheVersionError
from statekv.store.fs import StorageOptions
from statekv.store.reader import CacheEntry, LazyChunks, list_caches, load_cache, load_summary_keys, read_manifest
from statekv.store.writer import CacheWriter, save_cache

__all__ = [
    "CacheCorruptError", "CacheEntry", "CacheNotFoundError", "CacheStoreError", "CacheVersionError", "CacheWriter",
    "LazyChunks",
    "StorageOptions", "list_caches", "load_cache", "load_summary_keys", "prefill_to_store", "read_manifest",
    "save_cache",
]


def prefill_to_store(engine, video, uri: str | os.PathLike, *, mode: str = "overwrite", int8: bool = False,
                     resume: bool = False, storage_options: Any = None, filesystem: Any = None,
                     writer_kwargs: dict[str, Any] | None = None, **prefill_kwargs: Any) -> dict[str, Any]:
    """Prefill `video` straight into the store at `uri` (chunks streamed, none kept); returns the manifest.

    mode "skip" returns the committed manifest without prefilling. `resume=True` continues the committed cache's
    video with `video` (its carried state) and appends the new chunks. The manifest's `skipped` key says whether
    this call wrote anything.
    """
    writer_kwargs = dict(writer_kwargs or {})
    # the video is stat-ed (size, etag) with the options it is read with, else the store's
    writer_kwargs.setdefault("source_storage_options", prefill_kwargs.get("storage_options") or storage_options)
    if resume:
        base = load_cache(uri, storage_options=storage_options, filesystem=filesystem,
                          expect_fingerprint=engine.model_info().fingerprint)
        writer = CacheWriter(uri, mode="append", storage_options=storage_options, filesystem=filesystem,
                             **writer_kwargs)
        prefill_kwargs["resume_from"] = base
    else:
        writer = CacheWriter(uri, mode=mode, int8=int8, storage_options=storage_options, filesystem=filesystem,
                             **writer_kwargs)
    with writer:
        if writer.skipped:
            return {**writer.existing, "skipped": True}
        cache = engine.prefill(video, sink=writer.write_chunk, keep_chunks=False, **prefill_kwargs)
        return {**writer.commit(cache), "skipped": False}
