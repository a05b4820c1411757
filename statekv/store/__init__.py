"""Cache store: a `VideoKVCache` as Parquet objects + a manifest under `<root>/<video_id>/` (local or S3).

The front door is `CacheStore` (statekv/store/cache_store.py), one per cache root:

    store = CacheStore("s3://bucket/caches")
    store.prefill(engine, "s3://bucket/videos/vid1.mp4", "vid1")   # chunks streamed to the store, none kept
    cache = store.load("vid1")                                       # lazy: chunks read on first access
    store.version("vid1"), store.manifest("vid1"), store.list()

Bytes move through fsspec (`fs`, which also makes commits single-winner), tensors are (de)serialised in
`serde`; the layout is in `format`, the manifest's schema, checks and reading in `manifest`, the root's listing
(and its index) in `catalog`, a cache <-> manifest mapping in `convert`, the error classes (and which are
retryable) in `errors`; see docs/cache-format.md.

The names below are imported on first use (PEP 562): the manifest, the catalog and `CacheStore` itself import
no tensor library, so a command that only checks what is committed (a rerun of `statekv prefill`) never imports
torch; loading and writing caches does.
"""

from __future__ import annotations

from statekv._lazy import lazy_attributes

_EXPORTS = {  # public name -> the module that defines it
    "CacheStore": "statekv.store.cache_store",
    "CacheChangedError": "statekv.store.errors", "CacheCorruptError": "statekv.store.errors",
    "CacheNotFoundError": "statekv.store.errors", "CacheStoreError": "statekv.store.errors",
    "CacheUnavailableError": "statekv.store.errors", "CacheVersionError": "statekv.store.errors",
    "ConcurrentWriteError": "statekv.store.errors",
    "StorageOptions": "statekv.store.fs",
    "CacheEntry": "statekv.store.catalog", "CacheListing": "statekv.store.catalog",
    "InvalidCache": "statekv.store.catalog", "list_caches": "statekv.store.catalog",
    "manifest_version": "statekv.store.manifest", "read_manifest": "statekv.store.manifest",
    "LazyChunks": "statekv.store.reader", "load_cache": "statekv.store.reader",
    "load_summary_keys": "statekv.store.reader",
    "CacheWriter": "statekv.store.writer", "footage_identity": "statekv.store.writer",
    "same_footage": "statekv.store.writer", "save_cache": "statekv.store.writer", "sweep": "statekv.store.writer",
    "prefill_to_store": "statekv.store.prefill",
}

__all__ = sorted([*_EXPORTS, "catalog"])


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
