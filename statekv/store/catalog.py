"""The root's catalog: list 100,000 caches in a few reads instead of one read per manifest.

    <root>/_catalog/snapshot.parquet        one row per cache (also invalid ones found by a scan), compacted
    <root>/_catalog/log/<time>-<rand>.json  one small object per commit since the snapshot

A commit writes its log object *before* its manifest, marked `pending`, and rewrites it without the mark once the
manifest is in: a writer killed in between leaves a pending entry, which a listing confirms by reading that one
manifest (its checksum), so no committed cache is ever missing from the listing and no uncommitted one appears in
it. Listing reads the snapshot (1 GET), lists the log (1 LIST per 1,000 entries) and reads the log objects (at most
about `COMPACT_AFTER`); a reader that finds more folds them into a new snapshot (a conditional write: one compactor
wins) and deletes the log objects it folded. A root without a snapshot, or whose snapshot cannot be read, is
scanned (every manifest) and the snapshot written. A cache is the entry with the latest `created` for its video id.
Catalog objects are untrusted input like manifests: a log object that is not an entry is skipped.

The catalog is an index, not the truth: a cache folder deleted by hand stays listed until `rebuild`; loading a
cache always reads and verifies its own manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from statekv.store import format as F
from statekv.store.errors import CacheCorruptError, CacheNotFoundError
from statekv.store.fs import (TRANSPORT_ERRORS, NotRegularFileError, ObjectTooLargeError, StorageOptionsLike,
                              is_local, join, put_atomic, put_if_version, read_versioned, resolve)
from statekv.store.manifest import read_committed

if TYPE_CHECKING:
    from statekv.cache import ModelInfo

logger = logging.getLogger(__name__)

FOLDER = "_catalog"  # not a valid video id (ids start with a letter or digit)
SNAPSHOT = "snapshot.parquet"
LOG = "log"
COMPACT_AFTER = 32  # log objects a listing reads before it folds them into the snapshot
LOG_MAX_BYTES = 64 << 10  # a log object is one entry (a few hundred bytes)
PENDING_GRACE_S = 3600.0  # a pending entry whose manifest is not in after this long was a commit that never happened

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



@dataclass
class CacheEntry:
    """One committed cache found by `list_caches`."""

    video_id: str
    uri: str
    chunks: int
    tokens: int
    bytes: int
    storage: str
    created: str
    fingerprint: str
    checksum: str = ""  # the manifest's content checksum: changes with every commit
    layout_version: int = 1  # the family's token layout it was built on (ModelInfo.layout_version)

    @classmethod
    def from_manifest(cls, root: str, video_id: str, m: dict[str, Any]) -> "CacheEntry":
        return cls(video_id, f"{root}/{video_id}", m["totals"]["chunks"], m["totals"]["tokens"], m["totals"]["bytes"],
                   m["storage"], m["created"], m["model"]["fingerprint"], m["checksum"],
                   m["model"].get("layout_version", 1))

    def serves(self, model: ModelInfo) -> bool:
        """Whether `model` can answer from this cache (same model, same token layout; see ModelInfo.check_serves)."""
        return self.fingerprint == model.fingerprint and self.layout_version == model.layout_version


@dataclass
class InvalidCache:
    """A cache folder whose manifest could not be used (skipped by `list_caches`): `reason` says why."""

    video_id: str
    uri: str
    reason: str


class CacheListing(list):
    """`list_caches`' result: the valid caches (a list of CacheEntry) plus `invalid`, those skipped and why."""

    def __init__(self, entries: Iterable[CacheEntry] = (), invalid: Iterable[InvalidCache] = ()) -> None:
        super().__init__(entries)
        self.invalid: list[InvalidCache] = list(invalid)


def scan(fs: fsspec.AbstractFileSystem, path: str, root: str) -> CacheListing:
    """Read every manifest under `root` (the catalog-less listing); invalid ones are reported, not raised."""
    if not is_local(fs):
        fs.invalidate_cache()
    out, invalid = [], []
    found_all = fs.glob(join(path, "*", F.MANIFEST), detail=True)  # the listing gives type and size for free
    for found, info in sorted(found_all.items()):
        vpath = fs._strip_protocol(found).rsplit("/", 1)[0]
        video_id = vpath.rsplit("/", 1)[-1]
        uri = f"{root}/{video_id}"
        if info.get("type") != "file" or (info.get("size") or 0) > F.MANIFEST_MAX_BYTES:
            err = CacheCorruptError(video_id, F.MANIFEST, f"not a manifest file ({info.get('type')}, "
                                    f"{info.get('size')} bytes; at most {F.MANIFEST_MAX_BYTES})")
            logger.warning("skipping cache %s: %s", uri, err)
            invalid.append(InvalidCache(video_id, uri, str(err)))
            continue
        try:
            m, _ = read_committed(fs, vpath, uri)
        except CacheNotFoundError:  # deleted between listing and reading
            continue
        except CacheCorruptError as err:
            logger.warning("skipping cache %s: %s", uri, err)
            invalid.append(InvalidCache(video_id, uri, str(err)))
            continue
        out.append(CacheEntry.from_manifest(root, video_id, m))
    return CacheListing(out, invalid)

def entry_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The catalog row of a committed manifest."""
    return {"video_id": manifest["video_id"], "chunks": manifest["totals"]["chunks"],
            "tokens": manifest["totals"]["tokens"], "bytes": manifest["totals"]["bytes"],
            "storage": manifest["storage"], "created": manifest["created"],
            "fingerprint": manifest["model"]["fingerprint"], "checksum": manifest["checksum"], "invalid": None,
            "layout_version": manifest["model"].get("layout_version", 1)}


def log_name() -> str:
    """A fresh log object name: sortable by time, unique."""
    return f"{_sortable_now()}-{uuid.uuid4().hex[:12]}.json"


def record(fs: fsspec.AbstractFileSystem, video_path: str, manifest: dict[str, Any], *, name: str,
           pending: bool = False) -> None:
    """Write `manifest`'s entry as log object `name` of its root's catalog (raises on failure).

    A commit calls it twice: `pending=True` before its manifest is written (so a commit is never missing from the
    catalog, whatever kills the writer after it), then `pending=False` once the manifest is in (so listings need
    not confirm it)."""
    root = video_path.rsplit("/", 1)[0]
    entry = {**entry_of(manifest), "video_id": video_path.rsplit("/", 1)[-1]}
    del entry["invalid"]
    if pending:
        entry["pending"] = True
    if is_local(fs):
        fs.makedirs(join(root, FOLDER, LOG), exist_ok=True)
    put_atomic(fs, join(root, FOLDER, LOG, name), json.dumps(entry).encode())


def forget(fs: fsspec.AbstractFileSystem, video_path: str, name: str) -> None:
    """Remove a pending log object whose commit did not happen (best effort: a listing ignores it anyway)."""
    try:
        fs.rm_file(join(video_path.rsplit("/", 1)[0], FOLDER, LOG, name))
    except _FAILURES as e:
        logger.info("could not remove the catalog entry %s of an attempt that lost: %s", name, e)


def reconcile(uri: str | os.PathLike, manifest: dict[str, Any], *, storage_options: StorageOptionsLike = None,
              filesystem: fsspec.AbstractFileSystem | None = None) -> None:
    """Make sure the catalog lists the committed `manifest` of `uri` (what a skipped rerun does).

    A manifest written since commits are logged before their manifests (it names its `catalog_entry`) is listed
    already: nothing to do. An older one may have lost its entry to a kill after its commit: its entry is logged
    again under a name fixed by its checksum, written only if absent (1 conditional PUT; a duplicate of an entry
    already folded into the snapshot changes nothing). A failure only logs a warning: the cache is committed."""
    if manifest.get("catalog_entry"):
        return
    fs, video_path = resolve(os.fspath(uri).rstrip("/"), storage_options, filesystem)
    root = video_path.rsplit("/", 1)[0]
    when = _when(manifest["created"]).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{when}-{hashlib.sha256(manifest['checksum'].encode()).hexdigest()[:12]}.json"
    entry = {k: v for k, v in {**entry_of(manifest), "video_id": video_path.rsplit("/", 1)[-1]}.items()
             if k != "invalid"}
    try:
        if is_local(fs):
            fs.makedirs(join(root, FOLDER, LOG), exist_ok=True)
        put_if_version(fs, join(root, FOLDER, LOG, name), json.dumps(entry).encode(), None)
    except _FAILURES as e:
        logger.warning("cache %s is committed but could not be added to the catalog (%s); "
                       "`statekv.store.catalog.rebuild` lists it", uri, e)


def _sortable_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def read(fs: fsspec.AbstractFileSystem, path: str, root: str):
    """The listing from the catalog (a `CacheListing`), building the snapshot by a scan if there is none or it
    cannot be read."""

    snap = join(path, FOLDER, SNAPSHOT)
    for _ in range(3):
        logs = _log_names(fs, path)
        try:
            data, version = read_versioned(fs, snap)
        except FileNotFoundError:
            return _build(fs, path, root, expect=None)
        except IsADirectoryError:
            logger.warning("the catalog snapshot of %s is not a file: listing by scan", root)
            return _build(fs, path, root, expect=None)
        rows = _snapshot_rows(data)
        if rows is None:
            logger.warning("the catalog snapshot of %s cannot be read: rebuilding it by a scan", root)
            return _build(fs, path, root, expect=version)
        done = _fold(fs, path, logs, rows)
        if done is None:  # a compactor removed log objects after our snapshot read: read the newer snapshot
            continue
        if len(logs) > COMPACT_AFTER:
            _compact(fs, path, rows, done, version)
        return _listing(CacheListing, root, rows)
    raise OSError(f"catalog of {root!r} kept changing while being read")


def _snapshot_rows(data: bytes) -> dict[str, dict[str, Any]] | None:
    """The snapshot's rows by video id, or None if it is not a catalog snapshot (not Parquet, truncated, another
    schema, a row that is not an entry)."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        logger.info("catalog snapshot unreadable: %s", e)
        return None
    names = set(table.column_names)
    if not set(SCHEMA.names) - {"layout_version"} <= names:  # layout_version: absent before statekv 0.3
        return None
    rows: dict[str, dict[str, Any]] = {}
    for r in table.to_pylist():
        row = _entry(r, snapshot=True)
        if row is None:
            return None
        rows[row["video_id"]] = row
    return rows


def _entry(raw: Any, *, snapshot: bool = False) -> dict[str, Any] | None:
    """A catalog row (plus "pending" for a log entry) from untrusted content, or None if it is not one."""
    if not isinstance(raw, dict):
        return None
    counts = ("chunks", "tokens", "bytes")
    texts = ("storage", "created", "fingerprint", "checksum")
    invalid = raw.get("invalid") if snapshot else None
    layout = raw.get("layout_version")
    vid = raw.get("video_id")
    if not (isinstance(vid, str) and vid and "/" not in vid and vid != FOLDER
            and all(type(raw.get(k)) is int and raw[k] >= 0 for k in counts)
            and all(isinstance(raw.get(k), str) for k in texts)
            and (layout is None or (type(layout) is int and layout >= 1))
            and (invalid is None or isinstance(invalid, str))
            and isinstance(raw.get("pending", False), bool)
            and _parse_when(raw["created"]) is not None):
        return None
    row = {k: raw[k] for k in ("video_id", *counts, *texts)}
    row.update(invalid=invalid, layout_version=layout)
    if raw.get("pending"):
        row["pending"] = True
    return row


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
    done = _fold(fs, path, logs, rows) or []  # commits during the scan
    if not rows and not logs:
        return _listing(CacheListing, root, rows)  # nothing here (perhaps no root): create nothing
    try:
        if _write_snapshot(fs, path, rows, expect) is not None:
            _remove_logs(fs, path, done)
    except _FAILURES as e:  # read-only credentials, a snapshot that is a directory: list without writing it
        logger.warning("cannot write the catalog of %s (%s): listing by scan", root, e)
    return _listing(CacheListing, root, rows)


def _log_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The log's entry objects (plain files of at most LOG_MAX_BYTES; anything else there is not an entry)."""
    folder = join(path, FOLDER, LOG)
    if not is_local(fs):
        fs.invalidate_cache(folder)
    try:
        found = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = []
    for info in found:
        name = fs._strip_protocol(info["name"]).rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        if info.get("type") != "file" or (info.get("size") or 0) > LOG_MAX_BYTES:
            logger.warning("ignoring %s in the catalog log of %s: not an entry (%s, %s bytes)", name, path,
                           info.get("type"), info.get("size"))
            continue
        names.append(name)
    return sorted(names)


def _fold(fs: fsspec.AbstractFileSystem, path: str, logs: list[str],
          rows: dict[str, dict[str, Any]]) -> list[str] | None:
    """Merge log objects into `rows` (latest `created` wins); returns the names folded (or not entries, or stale
    pending ones: a compaction deletes them), None if one vanished (compacted meanwhile).

    A pending entry (its writer may have been killed, or still be writing, or have lost) counts only once its
    cache's manifest is the one it describes: one manifest read per pending entry newer than what is known."""
    done, pending = [], []
    for name in logs:
        try:
            data = fs.cat_file(join(path, FOLDER, LOG, name), start=0, end=LOG_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError:  # replaced since it was listed
            continue
        try:
            entry = _entry(json.loads(data)) if len(data) <= LOG_MAX_BYTES else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            entry = None
        if entry is None:
            logger.warning("ignoring %s in the catalog log of %s: not a catalog entry", name, path)
            done.append(name)
        elif entry.pop("pending", False):
            pending.append((name, entry))
        else:
            _merge(rows, entry)
            done.append(name)
    now = _dt.datetime.now(_dt.timezone.utc)
    for name, entry in sorted(pending, key=lambda p: _when(p[1]["created"]), reverse=True):
        old = rows.get(entry["video_id"])
        if old is not None and _when(entry["created"]) <= _when(old["created"]):
            done.append(name)  # a later commit is known: this one no longer matters
        elif _committed(fs, join(path, entry["video_id"]), entry["checksum"]):
            _merge(rows, entry)
            done.append(name)
        elif (now - _when(entry["created"])).total_seconds() > PENDING_GRACE_S:
            done.append(name)  # its commit never happened
    return done


def _merge(rows: dict[str, dict[str, Any]], entry: dict[str, Any]) -> None:
    old = rows.get(entry["video_id"])
    if old is None or _when(entry["created"]) > _when(old["created"]):
        rows[entry["video_id"]] = {**entry, "invalid": None}


def _committed(fs: fsspec.AbstractFileSystem, video_path: str, checksum: str) -> bool:
    """Whether the manifest at `video_path` is the one with `checksum` (the store's bounded manifest read: a local
    manifest that is a FIFO, a link or a device is never opened)."""
    try:
        data, _ = read_versioned(fs, join(video_path, F.MANIFEST), limit=F.MANIFEST_MAX_BYTES)
        manifest = json.loads(data)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, NotRegularFileError, ObjectTooLargeError):
        return False
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("checksum") == checksum


def _parse_when(created: str) -> _dt.datetime | None:
    try:
        when = _dt.datetime.fromisoformat(created)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def _when(created: str) -> _dt.datetime:
    return _parse_when(created) or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def _compact(fs: fsspec.AbstractFileSystem, path: str, rows: dict[str, dict[str, Any]], done: list[str],
             version: str) -> None:
    """Fold the `done` log objects into a new snapshot (only if the snapshot is still `version`), then delete
    them (pending entries still in doubt stay in the log)."""
    try:
        if _write_snapshot(fs, path, rows, version) is None:
            return  # another reader compacted first
        _remove_logs(fs, path, done)
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
