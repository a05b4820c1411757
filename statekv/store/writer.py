"""Streaming writer: chunk KV goes to Parquet row groups as the engine makes it; `commit` writes the manifest.

Atomic from a reader's view: every file of one attempt lives under `<video_id>/parts-<uuid>/`, and the cache
exists only once `manifest.json` (which names those files) is written. Files no manifest names are garbage that
the next commit of the same video deletes. One writer per video at a time (Ray retries are sequential).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import uuid
import zlib
from typing import Any

import fsspec
import pyarrow as pa
import torch

from statekv.cache import ChunkKV, VideoKVCache
from statekv.store import format as F
from statekv.store import serde
from statekv.store.errors import CacheNotFoundError
from statekv.store.fs import StorageOptionsLike, is_local, join, put_atomic, resolve

logger = logging.getLogger(__name__)

MODES = ("overwrite", "skip", "append")


class _CountingSink:
    """A write-only file wrapper that counts bytes and CRCs them as they pass (the manifest's file checksum)."""

    def __init__(self, f) -> None:
        self.f = f
        self.size = 0
        self.crc = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.closed = True


class _ParquetFile:
    """One Parquet object being written: its writer, row buffer and entry for the manifest."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, rel: str, schema: pa.Schema, kind: str) -> None:
        if is_local(fs):  # object stores have no directories to make
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.sink = _CountingSink(fs.open(path, "wb"))
        self.writer = F.parquet_writer(self.sink, schema)
        self.schema = schema
        self.entry: dict[str, Any] = {"path": rel, "kind": kind}
        self.rows: list[dict[str, Any]] = []
        self.num_rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.num_rows += 1

    def flush_row_group(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> dict[str, Any]:
        self.flush_row_group()
        self.writer.close()
        self.sink.close()
        self.entry.update(bytes=self.sink.size, crc32=self.sink.crc)
        return self.entry

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()


class CacheWriter:
    """Write one video's cache to `uri` (= `<root>/<video_id>`), streaming: use `write_chunk` as the engine's sink.

    mode: "overwrite" replaces a committed cache on commit (the old one stays readable until then); "skip" does
    nothing if a cache is committed (`skipped` is True); "append" adds chunks to a committed cache (a resumed
    stream) without rewriting its chunk files. `int8=True` stores chunk K/V as int8 with scales.
    """

    def __init__(self, uri: str | os.PathLike, *, mode: str = "overwrite", int8: bool | None = None,
                 storage_options: StorageOptionsLike = None, filesystem: fsspec.AbstractFileSystem | None = None,
                 chunks_per_row_group: int = 1, chunks_per_file: int = 256,
                 source_storage_options: StorageOptionsLike = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown write mode {mode!r}; valid modes: {', '.join(MODES)}")
        if chunks_per_row_group < 1 or chunks_per_file < chunks_per_row_group:
            raise ValueError("need 1 <= chunks_per_row_group <= chunks_per_file")
        self.uri = os.fspath(uri)
        self.fs, self.path = resolve(self.uri, storage_options, filesystem)
        self.video_id = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.mode = mode
        self.source_storage_options = source_storage_options  # to stat the source video (size, etag)
        self.chunks_per_row_group = chunks_per_row_group
        self.chunks_per_file = chunks_per_file
        try:
            self.existing: dict[str, Any] | None = F.read_manifest_at(self.fs, self.path, self.uri)
        except CacheNotFoundError:
            self.existing = None
        self.skipped = mode == "skip" and self.existing is not None
        self.base: dict[str, Any] | None = None
        if mode == "append":
            if self.existing is None:
                raise CacheNotFoundError(self.uri, "nothing to append to: no committed cache")
            self.base = self.existing
            stored_int8 = self.base["storage"] == "int8"
            if int8 is not None and int8 != stored_int8:
                raise ValueError(f"cache {self.uri!r} stores {self.base['storage']} K/V; cannot append "
                                 f"{'int8' if int8 else 'native'} chunks")
            int8 = stored_int8
        self.int8 = bool(int8)
        self.attempt = f"{F.PARTS_PREFIX}{uuid.uuid4().hex}"
        self._next_index = self.base["chunks"]["count"] if self.base else 0
        self._first_index = self._next_index
        self._file: _ParquetFile | None = None
        self._file_first = 0
        self._chunk_files: list[dict[str, Any]] = []
        self._layout: tuple[int, int, int] | None = None
        self._position_rows: int | None = self.base["layout"]["position_rows"] if self.base else None
        self._dtype: torch.dtype | None = None
        self._kv_layers: list[int] | None = F.kv_layers(self.base) if self.base else None
        self._tokens = 0
        self._done = False

    # --- streaming ---------------------------------------------------------------------------------------------

    def write_chunk(self, chunk: ChunkKV) -> None:
        """Append one chunk (the engine's `sink`); chunks must arrive in order."""
        if self.skipped:
            return
        if self._done:
            raise RuntimeError("this CacheWriter has already committed or aborted")
        if chunk.index != self._next_index:
            raise ValueError(f"chunk {chunk.index} arrived, chunk {self._next_index} expected (chunks go in order)")
        first = next(k for k in chunk.keys if k is not None)  # linear-attention layers have no K/V
        layout = (len(chunk.keys), first.shape[0], first.shape[2])
        rows = chunk.position_ids.shape[0]
        if self._position_rows is None:
            self._position_rows = rows
        elif rows != self._position_rows:
            raise ValueError(f"chunk {chunk.index}: {rows} position rows, the cache has {self._position_rows}")
        kv_layers = [i for i, k in enumerate(chunk.keys) if k is not None]
        if self._layout is None:
            self._layout, self._dtype, self._kv_layers = layout, first.dtype, kv_layers
            if self.base is not None:
                self._check_like_base(layout, first.dtype)
        elif layout != self._layout or first.dtype != self._dtype or kv_layers != self._kv_layers:
            raise ValueError(f"chunk {chunk.index}: layout/dtype {layout}/{first.dtype} (K/V at layers {kv_layers}) "
                             f"differs from {self._layout}/{self._dtype} (layers {self._kv_layers})")
        if self._file is None or self._file.num_rows >= self.chunks_per_file:
            self._roll_file()
        self._file.add(self._chunk_row(chunk))
        if self._file.num_rows % self.chunks_per_row_group == 0:
            self._file.flush_row_group()
        self._next_index += 1
        self._tokens += chunk.num_tokens

    __call__ = write_chunk

    def _roll_file(self) -> None:
        if self._file is not None:
            self._close_chunk_file()
        n = len(self._chunk_files)
        rel = f"{self.attempt}/chunks-{n:05d}.parquet"
        self._file = _ParquetFile(self.fs, join(self.path, rel), rel,
                                  F.chunk_schema(self._kv_layers, self.int8), "chunks")
        self._file_first = self._next_index

    def _close_chunk_file(self) -> None:
        entry = self._file.close()
        entry.update(first_chunk=self._file_first, num_chunks=self._file.num_rows,
                     chunks_per_row_group=self.chunks_per_row_group)
        self._chunk_files.append(entry)
        self._file = None

    def _chunk_row(self, chunk: ChunkKV) -> dict[str, Any]:
        pos = serde.to_bytes(chunk.position_ids.to(torch.int64))
        row: dict[str, Any] = {
            "chunk_index": chunk.index, "frame_start": int(chunk.frame_range[0]),
            "frame_end": int(chunk.frame_range[1]), "source_frames": [int(i) for i in chunk.source_frames],
            "timestamps": [float(t) for t in chunk.timestamps], "num_tokens": chunk.num_tokens, "position_ids": pos,
        }
        row["meta_crc"] = F.meta_crc(row)
        for layer, (k, v) in enumerate(zip(chunk.keys, chunk.values)):
            if k is None:  # a linear-attention layer
                continue
            t = F.layer_tag(layer)
            summary = serde.to_bytes(k.float().mean(dim=1))  # (Hkv, D): the chunk's mean key, for retrieval
            if self.int8:
                qk, sk = serde.quantize_keys(k)
                qv, sv = serde.quantize_values(v)
                kb, vb, skb, svb = (serde.to_bytes(x) for x in (qk, qv, sk, sv))
                row[f"k_scale_{t}"], row[f"v_scale_{t}"] = skb, svb
            else:
                kb, vb, skb, svb = serde.to_bytes(k), serde.to_bytes(v), None, None
            row[f"k_{t}"], row[f"v_{t}"], row[f"summary_k_{t}"] = kb, vb, summary
            row[f"crc_{t}"] = serde.crc32(kb, vb, skb, svb, summary)
        return row

    def _check_like_base(self, layout: tuple[int, int, int], dtype: torch.dtype) -> None:
        lay = self.base["layout"]
        if layout != (lay["num_layers"], lay["num_kv_heads"], lay["head_dim"]) or \
                serde.dtype_name(dtype) != self.base["dtype"]:
            raise ValueError(f"appended chunks have layout {layout} and dtype {dtype}; the cache {self.uri!r} has "
                             f"{(lay['num_layers'], lay['num_kv_heads'], lay['head_dim'])} and {self.base['dtype']}")

    # --- commit ------------------------------------------------------------------------------------------------

    def commit(self, cache: VideoKVCache) -> dict[str, Any]:
        """Write prefix and state, then the manifest (the commit), then delete older attempts. Returns the manifest.

        `cache` is what prefill returned (with keep_chunks=False its chunks were all given to `write_chunk`).
        """
        if self.skipped:
            logger.info("cache %s is committed already: skipped", self.uri)
            return self.existing
        if self._done:
            raise RuntimeError("this CacheWriter has already committed or aborted")
        if cache.num_chunks != self._next_index:
            raise ValueError(f"the cache has {cache.num_chunks} chunks but {self._next_index} were written to "
                             f"{self.uri!r}")
        num_layers = cache.model.num_layers
        if self._file is not None:
            self._close_chunk_file()
        files = [f for f in self.base["files"] if f["kind"] == "chunks"] if self.base else []
        if self.base is not None:
            prefix_entry = next(f for f in self.base["files"] if f["kind"] == "prefix")
        else:
            prefix_entry = self._write_prefix(cache, num_layers)
        files = [prefix_entry, *files, *self._chunk_files]
        if cache.state is not None:
            files.append(self._write_state(cache))
        if cache.recurrent or cache.prefix_recurrent:
            files.append(self._write_recurrent(cache))
        manifest = self._manifest(cache, files)
        self._check_written()
        put_atomic(self.fs, join(self.path, F.MANIFEST), json.dumps(manifest, indent=1).encode())
        self._done = True
        self._cleanup(manifest)
        logger.info("committed cache %s: %d chunks, %d bytes", self.uri, manifest["totals"]["chunks"],
                    manifest["totals"]["bytes"])
        return manifest

    def _write_prefix(self, cache: VideoKVCache, num_layers: int) -> dict[str, Any]:
        rel = f"{self.attempt}/prefix.parquet"
        layers = cache.model.attention_layers
        f = _ParquetFile(self.fs, join(self.path, rel), rel, F.prefix_schema(layers), "prefix")
        ids = serde.to_bytes(cache.prefix_ids.to(torch.int64))
        row: dict[str, Any] = {"prefix_ids": ids, "ids_crc": serde.crc32(ids)}
        for layer in layers:
            t = F.layer_tag(layer)
            kb, vb = serde.to_bytes(cache.prefix_keys[layer]), serde.to_bytes(cache.prefix_values[layer])
            row[f"k_{t}"], row[f"v_{t}"], row[f"crc_{t}"] = kb, vb, serde.crc32(kb, vb)
        f.add(row)
        return f.close()

    def _write_state(self, cache: VideoKVCache) -> dict[str, Any]:
        rel = f"{self.attempt}/state.parquet"
        f = _ParquetFile(self.fs, join(self.path, rel), rel, F.STATE_SCHEMA, "state")
        for layer, s in enumerate(cache.state):
            if s is None:  # a linear-attention layer: its state is in recurrent.parquet
                continue
            kb, vb = serde.to_bytes(s.keys), serde.to_bytes(s.values)
            ib = serde.to_bytes(s.token_index.to(torch.int64))
            sb = None if s.scores is None else serde.to_bytes(s.scores.float())
            f.add({"layer": layer, "size": s.size, "keys": kb, "values": vb, "token_index": ib, "scores": sb,
                   "crc": serde.crc32(kb, vb, ib, sb)})
            f.flush_row_group()  # one row group per layer: a layer subset reads only its own
        return f.close()

    def _write_recurrent(self, cache: VideoKVCache) -> dict[str, Any]:
        """The linear layers' exact states, after the prefix and after the video, one row group per row."""
        rel = f"{self.attempt}/recurrent.parquet"
        f = _ParquetFile(self.fs, join(self.path, rel), rel, F.RECURRENT_SCHEMA, "recurrent")
        for after, states in zip(F.RECURRENT_AFTER, (cache.prefix_recurrent, cache.recurrent)):
            for layer in sorted(states):
                s = states[layer]
                row = {"layer": layer, "after": after,
                       "conv": serde.to_bytes(s.conv), "conv_shape": list(s.conv.shape),
                       "conv_dtype": serde.dtype_name(s.conv.dtype),
                       "recurrent": serde.to_bytes(s.recurrent), "recurrent_shape": list(s.recurrent.shape),
                       "recurrent_dtype": serde.dtype_name(s.recurrent.dtype)}
                row["crc"] = F.recurrent_crc(row)
                f.add(row)
        return f.close()

    def _manifest(self, cache: VideoKVCache, files: list[dict[str, Any]]) -> dict[str, Any]:
        import statekv

        tokens = (self.base["totals"]["tokens"] if self.base else 0) + self._tokens
        return {
            "format": F.FORMAT,
            "format_version": F.FORMAT_VERSION,
            "video_id": self.video_id,
            "source": source_info(cache.video.source, self.source_storage_options),
            **F.describe_cache(cache, self._position_rows),
            "storage": "int8" if self.int8 else "native",
            "byteorder": "little",
            "totals": {"chunks": cache.num_chunks, "tokens": tokens, "bytes": sum(f["bytes"] for f in files)},
            "files": files,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "statekv_version": statekv.__version__,
        }

    def _check_written(self) -> None:
        """Every file this attempt names is there in full (guards against a concurrent cleanup)."""
        mine = [f for f in [*self._chunk_files] if f["path"].startswith(self.attempt)]
        for f in mine:
            size = self.fs.size(join(self.path, f["path"]))
            if size != f["bytes"]:
                raise OSError(f"{self.uri}/{f['path']}: {size} bytes stored, {f['bytes']} written")

    def _cleanup(self, manifest: dict[str, Any]) -> None:
        """Delete everything under the video's prefix that the manifest does not name (older attempts)."""
        keep = {join(self.path, f["path"]) for f in manifest["files"]}
        keep_dirs = {p.rsplit("/", 1)[0] for p in keep}
        if not is_local(self.fs):
            self.fs.invalidate_cache(self.path)
        for entry in self.fs.ls(self.path, detail=False):
            entry = self.fs._strip_protocol(entry).rstrip("/")
            name = entry.rsplit("/", 1)[-1]
            if name == F.MANIFEST:
                continue
            if entry in keep_dirs:
                for sub in self.fs.ls(entry, detail=False):
                    sub = self.fs._strip_protocol(sub).rstrip("/")
                    if sub not in keep:
                        self.fs.rm(sub, recursive=True)
            else:
                self.fs.rm(entry, recursive=True)

    def abort(self) -> None:
        """Stop without committing and delete this attempt's files (a crash leaves them for the next commit)."""
        if self._done:
            return
        self._done = True
        if self._file is not None:
            self._file.abort()
            self._file = None
        target = join(self.path, self.attempt)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def source_info(source: str, storage_options: StorageOptionsLike = None) -> dict[str, Any] | None:
    """URI, size and etag/mtime of a video stat-able through fsspec; None for frame arrays and unknown sources."""
    if not source or source.startswith("<"):
        return None
    try:
        fs, path = resolve(source, storage_options)
        info = fs.info(path)
    except (OSError, ValueError, ImportError):  # not stat-able (a tar member, a file object): the URI alone
        return {"uri": source}
    out: dict[str, Any] = {"uri": source, "size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        out["etag"] = str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified")
    if mtime is not None:
        out["mtime"] = mtime.isoformat() if hasattr(mtime, "isoformat") else float(mtime)
    return out


def save_cache(cache: VideoKVCache, uri: str | os.PathLike, *, mode: str = "overwrite", int8: bool = False,
               storage_options: StorageOptionsLike = None, filesystem: fsspec.AbstractFileSystem | None = None,
               **writer_kwargs: Any) -> dict[str, Any]:
    """Write an in-memory cache (all its chunks) to `uri`; returns the manifest."""
    cache._require_chunks()
    with CacheWriter(uri, mode=mode, int8=int8, storage_options=storage_options, filesystem=filesystem,
                     **writer_kwargs) as writer:
        if writer.skipped:
            return writer.existing
        for chunk in cache.chunks:
            writer.write_chunk(chunk)
        return writer.commit(cache)
