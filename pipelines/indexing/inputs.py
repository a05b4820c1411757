"""What to index: turn an input spec (prefix, glob, manifest, .tar shards) into one row per video.

Rows are plain dicts with fixed columns so Ray Data blocks stay tabular:

    video_id  str    stable, object-name safe (statekv.video_ids)
    uri       str    the video file, or the .tar shard holding it
    member    str    tar member name ("" for plain files)
    offset    int    byte offset of the member's data in the shard (-1 for plain files)
    size      int    bytes of the video (-1 when unknown)
    start     float  seconds; NaN = from the beginning
    end       float  seconds; NaN = to the end
    status    str    "" (to do), or "failed" / "skipped" once decided
    error     str    the reason of a failed row

Listing happens in the driver (cheap metadata calls); shards are expanded into member rows in Ray tasks
(`expand_shard`), reading only tar headers, and member bytes are fetched by the actor that indexes them.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import shutil
import tarfile
from typing import Any

from statekv.store.fs import StorageOptionsLike, resolve
from statekv.video_ids import disambiguate, validate_video_id, video_id_from_path

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SHARD_EXTENSIONS = (".tar",)
COLUMNS = ("video_id", "uri", "member", "offset", "size", "start", "end", "status", "error")
COPY_BLOCK = 1 << 20


def make_row(video_id: str, uri: str, *, member: str = "", offset: int = -1, size: int = -1,
             start: float = math.nan, end: float = math.nan, status: str = "", error: str = "") -> dict[str, Any]:
    return {"video_id": video_id, "uri": uri, "member": member, "offset": int(offset), "size": int(size),
            "start": float(start), "end": float(end), "status": status, "error": error}


def _protocol_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def _full_uri(fs, path: str, prefix: str) -> str:
    return f"{prefix}{fs._strip_protocol(path)}" if prefix else fs._strip_protocol(path)


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def list_inputs(spec: str, storage_options: StorageOptionsLike = None) -> list[dict[str, Any]]:
    """Rows for `spec`: a manifest file, a .tar shard, a glob, or a prefix/directory searched recursively.

    Shards come back as rows with `member` = "*" (expanded later by `expand_shard`). Raises FileNotFoundError
    when the spec matches nothing at all: that is a mistake in the job, not a failing video.
    """
    prefix = _protocol_prefix(spec)
    fs, path = resolve(spec, storage_options)
    if _ext(path) in MANIFEST_EXTENSIONS and not any(c in path for c in "*?["):
        return read_manifest_rows(spec, storage_options)
    if any(c in path for c in "*?["):
        root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        found = {p: fs.info(p) for p in fs.glob(path)}
    elif fs.isfile(path):
        root = path.rsplit("/", 1)[0]
        found = {path: fs.info(path)}
    elif fs.isdir(path):
        root = path
        found = fs.find(path, detail=True)
    else:
        raise FileNotFoundError(f"input {spec!r}: no such file, directory or prefix")
    files = sorted((fs._strip_protocol(p), info) for p, info in found.items() if info.get("type") != "directory")
    videos = [(p, i) for p, i in files if _ext(p) in VIDEO_EXTENSIONS]
    shards = [(p, i) for p, i in files if _ext(p) in SHARD_EXTENSIONS]
    if not videos and not shards:
        raise FileNotFoundError(f"input {spec!r}: no video files ({', '.join(VIDEO_EXTENSIONS)}) or .tar shards")
    rels = [posixpath.relpath(p, root) if root else p for p, _ in videos]
    ids = disambiguate([(video_id_from_path(r), r) for r in rels])
    rows = [make_row(vid, _full_uri(fs, p, prefix), size=int(info.get("size") or 0))
            for vid, (p, info) in zip(ids, videos)]
    for p, _ in shards:  # the shard's relative path prefixes its members' ids
        rel = posixpath.relpath(p, root) if root else p
        rows.append(make_row(rel, _full_uri(fs, p, prefix), member="*"))
    logger.info("input %s: %d video files, %d shards", spec, len(videos), len(shards))
    return rows


def read_manifest_rows(spec: str, storage_options: StorageOptionsLike = None) -> list[dict[str, Any]]:
    """Rows of a CSV / JSONL / Parquet manifest with a `uri` column and optional `video_id`, `start`, `end`.

    Relative URIs are taken relative to the manifest's folder. An invalid or repeated `video_id` makes that row a
    failed one (the rest of the run goes on).
    """
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = resolve(spec, storage_options)
    prefix = _protocol_prefix(spec)
    with fs.open(path, "rb") as f:
        data = f.read()
    ext = _ext(path)
    if ext == ".csv":
        table = pacsv.read_csv(io.BytesIO(data))
    elif ext == ".parquet":
        table = pq.read_table(io.BytesIO(data))
    else:
        table = pajson.read_json(io.BytesIO(data))
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {spec!r} has no 'uri' column (columns: {', '.join(table.column_names)})")
    records = table.to_pylist()
    base = path.rsplit("/", 1)[0]
    entries = []
    for rec in records:
        uri = str(rec["uri"])
        if "://" not in uri and not posixpath.isabs(uri):
            uri = _full_uri(fs, posixpath.join(base, uri), prefix)
        _, upath = resolve(uri, storage_options)
        rel = posixpath.relpath(upath, base) if upath.startswith(base + "/") else upath
        entries.append((rec, uri, rel))
    unnamed = [i for i, (rec, _, _) in enumerate(entries) if rec.get("video_id") in (None, "")]
    derived = [video_id_from_path(rel) for _, _, rel in entries]
    for i, vid in zip(unnamed, disambiguate([(derived[i], entries[i][2]) for i in unnamed])):
        derived[i] = vid  # only derived ids are disambiguated: given ones are the user's choice
    rows, seen = [], set()
    for (rec, uri, _), vid in zip(entries, derived):
        start, end = _seconds(rec.get("start")), _seconds(rec.get("end"))
        given = rec.get("video_id")
        status, error = "", ""
        if given not in (None, ""):
            try:
                vid = validate_video_id(str(given))
            except ValueError as err:
                vid, status, error = f"invalid-{vid}", "failed", str(err)
        if vid in seen and not status:
            status, error = "failed", f"duplicate video_id {vid!r} in the manifest"
            vid = f"{vid}-dup{len(rows)}"
        seen.add(vid)
        if not status and not math.isnan(start) and not math.isnan(end) and end <= start:
            status, error = "failed", f"empty time range: start {start} >= end {end}"
        rows.append(make_row(vid, uri, start=start, end=end, status=status, error=error))
    logger.info("manifest %s: %d rows", spec, len(rows))
    return rows


def _seconds(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


def expand_shard(row: dict[str, Any], storage_options: StorageOptionsLike = None) -> list[dict[str, Any]]:
    """One row per video member of a shard row (member "*"); other rows pass through unchanged.

    Reads tar headers only (tarfile seeks over member data), recording each member's data offset and size so the
    actor can fetch exactly those bytes. An unreadable shard becomes one failed row.
    """
    if row["member"] != "*":
        return [row]
    shard_rel = posixpath.splitext(row["video_id"])[0]
    fs, path = resolve(row["uri"], storage_options)
    members = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isfile() and _ext(info.name) in VIDEO_EXTENSIONS:
                    members.append((info.name, info.offset_data, info.size))
    except FileNotFoundError as err:
        return [make_row(video_id_from_path(shard_rel), row["uri"], status="failed",
                         error=f"missing shard: {err}")]
    except tarfile.TarError as err:
        return [make_row(video_id_from_path(shard_rel), row["uri"], status="failed",
                         error=f"unreadable tar shard: {err}")]
    rels = [f"{shard_rel}/{name}" for name, _, _ in members]
    ids = disambiguate([(video_id_from_path(r), r) for r in rels])
    return [make_row(vid, row["uri"], member=name, offset=offset, size=size)
            for vid, (name, offset, size) in zip(ids, members)]


def fetch_member(row: dict[str, Any], dest: str, storage_options: StorageOptionsLike = None) -> None:
    """Copy a tar member's bytes (at `offset`, `size` bytes) from its shard to the local file `dest`, streaming."""
    fs, path = resolve(row["uri"], storage_options)
    remaining = int(row["size"])
    with fs.open(path, "rb") as src, open(dest, "wb") as out:
        src.seek(int(row["offset"]))
        while remaining > 0:
            block = src.read(min(COPY_BLOCK, remaining))
            if not block:
                raise EOFError(f"{row['uri']}:{row['member']}: shard ends {remaining} bytes early")
            out.write(block)
            remaining -= len(block)


def fetch_file(uri: str, dest: str, storage_options: StorageOptionsLike = None) -> None:
    """Copy a (remote) file to the local file `dest`, streaming."""
    fs, path = resolve(uri, storage_options)
    with fs.open(path, "rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, COPY_BLOCK)


