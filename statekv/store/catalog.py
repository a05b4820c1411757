"""The root's catalog: list 100,000 caches in a few reads instead of one read per manifest.

    <root>/_catalog/snapshot.parquet        one row per cache (also invalid ones found by a scan), compacted
    <root>/_catalog/log/<time>-<rand>.json  one small object per commit since the snapshot

Every commit adds a log object (after its manifest: the catalog never lists an uncommitted cache). Listing reads
the snapshot (1 GET), lists the log (1 LIST per 1,000 entries) and reads the log objects (at most about
`COMPACT_AFTER`); a reader that finds more folds them into a new snapshot (a conditional write: one compactor
wins) and deletes the log objects it folded. A root without a snapshot is scanned once (every manifest) and the
snapshot written. A cache is the entry with the latest `created` for its video id.

The catalog is an index, not the truth: a cache folder deleted by hand stays listed until `rebuild`; loading a
cache always reads and verifies its own manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from statekv.store.fs import (TRANSPORT_ERRORS, StorageOptionsLike, is_local, join, put_atomic, put_if_version,
                              read_versioned, resolve)
from statekv.store.reader import CacheEntry, CacheListing, InvalidCache, scan

logger = logging.getLogger(__name__)

FOLDER = "_catalog"  # not a valid video id (ids start with a letter or digit)
SNAPSHOT = "snapshot.parquet"
LOG = "log"
COMPACT_AFTER = 32  # log objects a listing reads before it folds them into the snapshot

ENTRY_FIELDS = ["video_id", "chunks", "tokens", "bytes", "storage", "created", "fingerprint", "checksum",
                "layout_version"]
SCHEMA = pa.schema([
    pa.field("video_id", pa.string()), pa.field("chunks", pa.int64()), pa.field("tokens", pa.int64()),
    pa.field("bytes", pa.int64()), pa.field("storage", pa.string()), pa.field("created", pa.string()),
    pa.field("fingerprint", pa.string()), pa.field("checksum", pa.string()),
    pa.field("invalid", pa.string()),  # why a scan skipped this cache, else null
    pa.field("layout_version", pa.int64()),  # null in snapshots from before statekv 0.3: 1
])
_FAILURES = (OSError, *TRANSPORT_ERRORS)


def entry_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The catalog row of a committed manifest."""
    return {"video_id": manifest["video_id"], "chunks": manifest["totals"]["chunks"],
            "tokens": manifest["totals"]["tokens"], "bytes": manifest["totals"]["bytes"],
            "storage": manifest["storage"], "created": manifest["created"],
            "fingerprint": manifest["model"]["fingerprint"], "checksum": manifest["checksum"], "invalid": None,
            "layout_version": manifest["model"].get("layout_version", 1)}


def record(fs: fsspec.AbstractFileSystem, video_path: str, manifest: dict[str, Any]) -> None:
    """Add a committed manifest to its root's catalog log (after the commit; a failure only logs a warning: the
    cache is committed, and the next `rebuild` or scan lists it)."""
    root = video_path.rsplit("/", 1)[0]
    entry = {**entry_of(manifest), "video_id": video_path.rsplit("/", 1)[-1]}
    name = f"{_sortable_now()}-{uuid.uuid4().hex[:12]}.json"
    try:
        if is_local(fs):
            fs.makedirs(join(root, FOLDER, LOG), exist_ok=True)
        put_atomic(fs, join(root, FOLDER, LOG, name), json.dumps(entry).encode())
    except _FAILURES as e:
        logger.warning("committed %s but could not add it to the catalog (%s); `statekv.store.catalog.rebuild` "
                       "lists it again", video_path, e)


def _sortable_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def read(fs: fsspec.AbstractFileSystem, path: str, root: str):
    """The listing from the catalog (a `CacheListing`), building the snapshot by a scan if there is none."""

    snap = join(path, FOLDER, SNAPSHOT)
    for _ in range(3):
        logs = _log_names(fs, path)
        try:
            data, version = read_versioned(fs, snap)
        except FileNotFoundError:
            return _build(fs, path, root, expect=None)
        rows = {r["video_id"]: r for r in pq.read_table(pa.BufferReader(data)).to_pylist()}
        folded = _fold(fs, path, logs, rows)
        if folded is None:  # a compactor removed log objects after our snapshot read: read the newer snapshot
            continue
        if len(logs) > COMPACT_AFTER:
            _compact(fs, path, rows, logs, version)
        return _listing(CacheListing, root, rows)
    raise OSError(f"catalog of {root!r} kept changing while being read")


def rebuild(root: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
            filesystem: fsspec.AbstractFileSystem | None = None):
    """Scan every manifest under `root` and replace the catalog's snapshot with what it finds (returns it)."""
    root = os.fspath(root).rstrip("/")
    fs, path = resolve(root, storage_options, filesystem)
    try:
        version: str | None = read_versioned(fs, join(path, FOLDER, SNAPSHOT))[1]
    except FileNotFoundError:
        version = None
    return _build(fs, path, root, expect=version)


def _build(fs: fsspec.AbstractFileSystem, path: str, root: str, expect: str | None):

    started = _dt.datetime.now(_dt.timezone.utc).isoformat()
    listing = scan(fs, path, root)
    rows = {e.video_id: {**{k: getattr(e, k) for k in ENTRY_FIELDS}, "invalid": None} for e in listing}
    for bad in listing.invalid:  # found invalid at `started`: only a later commit replaces it
        rows[bad.video_id] = {"video_id": bad.video_id, "chunks": 0, "tokens": 0, "bytes": 0, "storage": "",
                              "created": started, "fingerprint": "", "checksum": "", "invalid": bad.reason,
                              "layout_version": None}
    logs = _log_names(fs, path)
    _fold(fs, path, logs, rows)  # commits during the scan
    if not rows and not logs:
        return _listing(CacheListing, root, rows)  # nothing here (perhaps no root): create nothing
    try:
        if _write_snapshot(fs, path, rows, expect) is not None:
            _remove_logs(fs, path, logs)
    except PermissionError as e:  # read-only credentials: list without writing the catalog
        logger.info("cannot write the catalog of %s (%s): listing by scan", root, e)
    return _listing(CacheListing, root, rows)


def _log_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    folder = join(path, FOLDER, LOG)
    if not is_local(fs):
        fs.invalidate_cache(folder)
    try:
        names = [fs._strip_protocol(p).rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json"))


def _fold(fs: fsspec.AbstractFileSystem, path: str, logs: list[str], rows: dict[str, dict[str, Any]]) -> bool | None:
    """Merge log objects into `rows` (latest `created` wins); None if one vanished (compacted meanwhile)."""
    for name in logs:
        try:
            entry = json.loads(fs.cat_file(join(path, FOLDER, LOG, name)))
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError):  # not a statekv log object: ignore it
            continue
        old = rows.get(entry.get("video_id"))
        if old is None or _when(entry["created"]) > _when(old["created"]):
            rows[entry["video_id"]] = {**{k: entry[k] for k in ENTRY_FIELDS}, "invalid": None}
    return True


def _when(created: str) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(created)
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def _compact(fs: fsspec.AbstractFileSystem, path: str, rows: dict[str, dict[str, Any]], logs: list[str],
             version: str) -> None:
    """Fold `logs` into a new snapshot (only if the snapshot is still `version`), then delete them."""
    try:
        if _write_snapshot(fs, path, rows, version) is None:
            return  # another reader compacted first
        _remove_logs(fs, path, logs)
    except _FAILURES as e:  # read-only or unreachable: the next listing tries again
        logger.info("could not compact the catalog under %s: %s", path, e)


def _remove_logs(fs: fsspec.AbstractFileSystem, path: str, logs: list[str]) -> None:
    """Delete log objects folded into a written snapshot (one batch request on S3)."""
    if logs:
        fs.rm([join(path, FOLDER, LOG, name) for name in logs])


def _write_snapshot(fs: fsspec.AbstractFileSystem, path: str, rows: dict[str, dict[str, Any]],
                    expect: str | None) -> str | None:
    table = pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return put_if_version(fs, join(path, FOLDER, SNAPSHOT), sink.getvalue().to_pybytes(), expect)


def _listing(cls, root: str, rows: dict[str, dict[str, Any]]):

    ok = [CacheEntry(r["video_id"], f"{root}/{r['video_id']}", r["chunks"], r["tokens"], r["bytes"], r["storage"],
                     r["created"], r["fingerprint"], r["checksum"], r.get("layout_version") or 1)
          for k, r in sorted(rows.items())
          if r["invalid"] is None]
    bad = [InvalidCache(r["video_id"], f"{root}/{r['video_id']}", r["invalid"]) for k, r in sorted(rows.items())
           if r["invalid"] is not None]
    return cls(ok, bad)


def list_caches(root: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                filesystem: fsspec.AbstractFileSystem | None = None, use_catalog: bool = True) -> CacheListing:
    """Committed caches under `root`, sorted by video id; invalid manifests are skipped, logged and listed in
    the result's `invalid`. With a catalog under the root (see this module) this costs a few reads whatever the
    number of caches; `use_catalog=False` (or a root without one) reads every manifest."""
    root = os.fspath(root).rstrip("/")
    fs, path = resolve(root, storage_options, filesystem)
    if use_catalog:
        listing = read(fs, path, root)
        if listing is not None:
            return listing
    return scan(fs, path, root)
