"""Streaming writer: chunk KV goes to Parquet row groups as the engine makes it; `commit` writes the manifest.

Atomic from a reader's view: every file of one attempt lives under `<video_id>/parts-<uuid>/`, and the cache
exists only once `manifest.json` (which names those files) is written. Single winner: the manifest is written
only if it is still the version this writer started from (a conditional create/replace, see
`fs.put_if_version`); a writer that lost deletes its own attempt and raises ConcurrentWriteError. A committed
cache's files are never deleted while it can still be read: the winner marks the attempts it superseded as
retired, and `sweep` deletes unnamed attempts only once they are `sweep_grace_s` old (so a reader of the old
manifest finishes, or finds the new one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from typing import Any

import fsspec
import pyarrow as pa
import torch

from statekv._version import __version__
from statekv.cache import ChunkKV, VideoKVCache
from statekv.store import convert
from statekv.store import format as F
from statekv.store import manifest as manifest_schema
from statekv.store import serde
from statekv.profiling import STORE, timed
from statekv.store.errors import CacheCorruptError, CacheNotFoundError, ConcurrentWriteError
from statekv.store.fs import (LOCK_NAME, TRANSPORT_ERRORS, StorageOptionsLike, is_local, join, put_if_version,
                              read_versioned, resolve)
from statekv.video_ids import validate_video_id

logger = logging.getLogger(__name__)

MODES = ("overwrite", "skip", "append")
SWEEP_GRACE_S = 900.0  # a retired or abandoned attempt is deleted once this old: readers take far less
RETIRED = "RETIRED"  # marker object a winner writes into each attempt folder its commit superseded
# finished row groups a writer holds before writing them in one call. The write converts them to one Arrow table
# and encodes it: its transient memory is several times what is held, so with 16 MiB a clip whose KV passed the
# bound peaked ~80 MB above a shorter one (peak RSS grew with the video until the bound); 2 MiB keeps that under
# the rest of the prefill's transients, while small chunks still share one call (a 6 KB chunk: ~350 a call)
BUFFER_BYTES = 2 << 20


class _CountingSink:
    """A write-only file wrapper that counts bytes and CRCs them as they pass (the manifest's file checksum)."""

    def __init__(self, f) -> None:
        self.f = f
        self.size = 0
        self.crc = 0
        self.closed = False
        self.tail: list[bytes] | None = None  # what is written after `keep_tail()`: the footer

    def write(self, data) -> int:
        data = bytes(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.f.write(data)
        if self.tail is not None:
            self.tail.append(data)
        return len(data)

    def keep_tail(self) -> None:
        """Keep every byte written from now on (called before the Parquet writer writes its footer)."""
        self.tail = []

    def footer_sha256(self) -> str:
        """SHA-256 of the file's footer, its length and the closing magic (the last L + 8 bytes)."""
        tail = b"".join(self.tail or [])
        length = int.from_bytes(tail[-8:-4], "little")
        if len(tail) < length + 8:
            raise RuntimeError("the Parquet footer was not written after keep_tail()")
        return hashlib.sha256(tail[-(length + 8):]).hexdigest()

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
    """One Parquet object being written: its writer, row buffer and entry for the manifest.

    Finished row groups are held until `buffer_bytes` of them are (0: none is held), then written by ONE Parquet
    call that keeps each its own row group: the same file, without a table conversion and a write call per chunk
    (at small chunks that per-call cost was most of the store's time; see docs/benchmarks.md, "Indexing").
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, rel: str, schema: pa.Schema, kind: str, *,
                 buffer_bytes: int = 0) -> None:
        if is_local(fs):  # object stores have no directories to make
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.sink = _CountingSink(fs.open(path, "wb"))
        self.writer = F.parquet_writer(self.sink, schema)
        self.schema = schema
        self.entry: dict[str, Any] = {"path": rel, "kind": kind}
        self.rows: list[dict[str, Any]] = []
        self.num_rows = 0
        self.buffer_bytes = buffer_bytes
        self.held: list[list[dict[str, Any]]] = []  # finished row groups not yet written, all of one size
        self.held_bytes = 0
        self.crc_columns = [c for c in schema.names if F.is_cell_crc(c)]
        self.cells: list[list[int]] = []  # each row's cell CRCs: recorded in the footer, bound to the manifest

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.cells.append([int(row[c]) for c in self.crc_columns])
        self.num_rows += 1

    def flush_row_group(self) -> None:
        """End the current row group: written now, or held with the next ones (see the class docstring)."""
        if not self.rows:
            return
        if self.held and len(self.rows) != len(self.held[0]):
            self._write_held()  # one call writes row groups of one size
        self.held.append(self.rows)
        self.held_bytes += sum(len(v) for row in self.rows for v in row.values() if isinstance(v, bytes))
        self.rows = []
        if self.held_bytes >= self.buffer_bytes:
            self._write_held()

    def _write_held(self) -> None:
        if self.held:
            rows = [row for group in self.held for row in group]
            self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema), row_group_size=len(self.held[0]))
            self.held, self.held_bytes = [], 0

    def close(self) -> dict[str, Any]:
        self.flush_row_group()
        self._write_held()
        self.writer.add_key_value_metadata(F.cells_metadata(self.crc_columns, self.cells))
        self.sink.keep_tail()
        self.writer.close()
        self.sink.close()
        self.entry.update(bytes=self.sink.size, crc32=self.sink.crc, footer_sha256=self.sink.footer_sha256())
        return self.entry

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()


class CacheWriter:
    """Write one video's cache to `uri` (= `<root>/<video_id>`), streaming: use `write_chunk` as the engine's sink.

    mode: "overwrite" replaces a committed cache on commit (the old one stays readable until then, and for
    `sweep_grace_s` after); "skip" does nothing if a valid cache is committed (`skipped` is True); "append" adds
    chunks to a committed cache (a resumed stream) without rewriting its chunk files. A corrupt committed
    manifest is replaced by "overwrite" and "skip" (`replaced_corrupt` holds its error) and refused by "append".
    `int8=True` stores chunk K/V and the carried state as int8 with scales. The commit is single-winner: if
    another writer commits this cache after this one started, `commit` raises ConcurrentWriteError.
    `buffer_bytes`: chunk rows held in memory before they are written together (each chunk still its own row
    group, the file the same); 0 writes each row group as it completes. `base_version` (append): the version of the
    committed cache the resumed stream continues from (`cache.committed.version` of the loaded base); if another
    commit replaced it since, the append is refused (ConcurrentWriteError) instead of mixing the two.
    """

    def __init__(self, uri: str | os.PathLike, *, mode: str = "overwrite", int8: bool | None = None,
                 storage_options: StorageOptionsLike = None, filesystem: fsspec.AbstractFileSystem | None = None,
                 chunks_per_row_group: int = 1, chunks_per_file: int = 256,
                 source_storage_options: StorageOptionsLike = None, sweep_grace_s: float = SWEEP_GRACE_S,
                 buffer_bytes: int = BUFFER_BYTES, base_version: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown write mode {mode!r}; valid modes: {', '.join(MODES)}")
        if chunks_per_row_group < 1 or chunks_per_file < chunks_per_row_group:
            raise ValueError("need 1 <= chunks_per_row_group <= chunks_per_file")
        self.uri = os.fspath(uri)
        self.fs, self.path = resolve(self.uri, storage_options, filesystem)
        self.video_id = validate_video_id(self.path.rstrip("/").rsplit("/", 1)[-1])  # the rule the service reads by
        self.mode = mode
        self.source_storage_options = source_storage_options  # to stat the source video (size, etag)
        self.chunks_per_row_group = chunks_per_row_group
        self.chunks_per_file = chunks_per_file
        self.sweep_grace_s = sweep_grace_s
        self.buffer_bytes = max(0, int(buffer_bytes))  # chunk (and summary) rows held before one Parquet write
        self.existing, self._expect_version, self.replaced_corrupt = self._read_existing(mode)
        self.skipped = mode == "skip" and self.existing is not None
        if self.skipped:
            from statekv.store import catalog

            catalog.reconcile(self.uri, self.existing, filesystem=self.fs)  # a kill may have lost its entry
        self.base: dict[str, Any] | None = None
        if mode == "append":
            if self.existing is None:
                raise CacheNotFoundError(self.uri, "nothing to append to: no committed cache")
            if base_version is not None and base_version != self._expect_version:
                # the resumed state was loaded from a commit that another writer has replaced since
                raise ConcurrentWriteError(self.uri, self.existing.get("created"))
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
        # compressed chunk rows (kept_<layer> columns) or not: from the base when appending, else the first chunk
        self._kept: bool | None = F.is_compressed(self.base) if self.base else None
        self._kept_totals: list[int] = list(self.base["chunks"]["kept_tokens"]) if self._kept else []
        self._tokens = 0
        self._done = False
        self._summaries: _ParquetFile | None = None
        self._summaries_first = 0

    @timed(STORE)
    def _read_existing(self, mode: str) -> tuple[dict[str, Any] | None, str | None, CacheCorruptError | None]:
        """(committed manifest or None, the version the commit must replace, the corruption if it was corrupt).

        A corrupt manifest does not block "overwrite" (nor "skip", which then rewrites): re-prefilling is how a
        corrupt cache is repaired. Appending to one is refused.
        """
        try:
            data, version = read_versioned(self.fs, join(self.path, F.MANIFEST))
        except FileNotFoundError:
            return None, None, None
        try:
            return manifest_schema.parse(data, self.video_id), version, None
        except CacheCorruptError as err:
            if mode == "append":
                raise
            logger.warning("cache %s has a corrupt manifest; it will be replaced: %s", self.uri, err)
            return None, version, err

    # --- streaming ---------------------------------------------------------------------------------------------

    @timed(STORE)
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
        self._check_kept(chunk)
        if self._file is None or self._file.num_rows >= self.chunks_per_file:
            self._roll_file()
        row = self._chunk_row(chunk)
        self._file.add(row)
        if self._file.num_rows % self.chunks_per_row_group == 0:
            self._file.flush_row_group()
        self._add_summaries(chunk, row)
        self._next_index += 1
        self._tokens += chunk.num_tokens

    __call__ = write_chunk

    def _check_kept(self, chunk: ChunkKV) -> None:
        """All chunks of a cache are compressed (each layer's kept tokens recorded) or none is."""
        compressed = chunk.kept is not None
        if self._kept is None:
            self._kept = compressed
        elif compressed != self._kept:
            raise ValueError(f"chunk {chunk.index} is {'' if compressed else 'not '}compressed, the cache's chunks "
                             f"are {'' if self._kept else 'not '}(write-time compression is per cache)")
        if compressed:
            for layer in self._kv_layers:
                if not _describes(chunk.token_index(layer), chunk.keys[layer].shape[1], chunk.num_tokens):
                    raise ValueError(f"chunk {chunk.index}, layer {layer}: kept token indices must be 1..n ascending "
                                     f"indices among the chunk's {chunk.num_tokens} tokens, one per stored key")
            counts = [chunk.stored_tokens(layer) for layer in self._kv_layers]
            self._kept_totals = [a + b for a, b in zip(self._kept_totals, counts)] if self._kept_totals else counts

    def _roll_file(self) -> None:
        if self._file is not None:
            self._close_chunk_file()
        n = len(self._chunk_files)
        rel = f"{self.attempt}/chunks-{n:05d}.parquet"
        self._file = _ParquetFile(self.fs, join(self.path, rel), rel,
                                  F.chunk_schema(self._kv_layers, self.int8, bool(self._kept)), "chunks",
                                  buffer_bytes=self.buffer_bytes)
        self._file_first = self._next_index

    def _close_chunk_file(self) -> None:
        entry = self._file.close()
        entry.update(first_chunk=self._file_first, num_chunks=self._file.num_rows,
                     chunks_per_row_group=self.chunks_per_row_group)
        self._chunk_files.append(entry)
        self._file = None

    def _add_summaries(self, chunk: ChunkKV, row: dict[str, Any]) -> None:
        """The chunk's summary keys also go to this attempt's summaries file (the retrieval index), with its
        pre-RoPE mean keys when the chunk carries them (every chunk of the file does, or none)."""
        index, pre = chunk.index, chunk.pre_rope_summaries
        if self._summaries is None:
            rel = f"{self.attempt}/summaries-{len(self._chunk_files):05d}.parquet"
            schema = F.summary_schema(self._kv_layers, pre_rope=pre is not None)
            self._summaries = _ParquetFile(self.fs, join(self.path, rel), rel, schema, "summaries",
                                           buffer_bytes=self.buffer_bytes)
            self._summaries_first = index
        has_pre = F.pre_rope_column(self._kv_layers[0]) in self._summaries.schema.names
        if has_pre != (pre is not None):
            raise ValueError(f"chunk {index} {'has' if pre is not None else 'lacks'} pre-RoPE summary keys, the "
                             f"chunks before it {'have' if has_pre else 'do not'} (the engine sets them for all)")
        entry = {"chunk_index": index}
        for layer in self._kv_layers:
            t = F.layer_tag(layer)
            entry[f"summary_k_{t}"] = row[f"summary_k_{t}"]
            entry[f"summary_crc_{t}"] = F.crc32(row[f"summary_k_{t}"])
            if pre is not None:
                data = serde.to_bytes(pre[layer].float().cpu().contiguous())
                entry[F.pre_rope_column(layer)], entry[F.pre_rope_crc_column(layer)] = data, F.crc32(data)
        self._summaries.add(entry)
        if self._summaries.num_rows % F.SUMMARY_ROWS_PER_GROUP == 0:
            self._summaries.flush_row_group()

    def _close_summaries(self) -> list[dict[str, Any]]:
        if self._summaries is None:
            return []
        entry = self._summaries.close()
        entry.update(first_chunk=self._summaries_first, num_chunks=self._summaries.num_rows,
                     chunks_per_row_group=F.SUMMARY_ROWS_PER_GROUP)
        self._summaries = None
        return [entry]

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
            kept = None
            if self._kept:  # which of the chunk's tokens these K/V are (summary: the mean of the kept keys)
                kept = row[f"kept_{t}"] = serde.to_bytes(chunk.token_index(layer).to(torch.int64))
            row[f"crc_{t}"] = F.crc32(kb, vb, skb, svb, summary, kept)
        return row

    def _check_like_base(self, layout: tuple[int, int, int], dtype: torch.dtype) -> None:
        lay = self.base["layout"]
        if layout != (lay["num_layers"], lay["num_kv_heads"], lay["head_dim"]) or \
                serde.dtype_name(dtype) != self.base["dtype"]:
            raise ValueError(f"appended chunks have layout {layout} and dtype {dtype}; the cache {self.uri!r} has "
                             f"{(lay['num_layers'], lay['num_kv_heads'], lay['head_dim'])} and {self.base['dtype']}")

    # --- commit ------------------------------------------------------------------------------------------------

    @timed(STORE)
    def commit(self, cache: VideoKVCache, *, footage: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write prefix and state, then the manifest (the commit, if no other writer committed since this one
        started), then retire what it replaced and sweep old attempts. Returns the manifest.

        `cache` is what prefill returned (with keep_chunks=False its chunks were all given to `write_chunk`);
        `footage` identifies what this write consumed (see `prefill_to_store`), recorded in `appends` so that a
        repeated append of the same footage can be recognised. ConcurrentWriteError if another writer won.
        """
        if self.skipped:
            logger.info("cache %s is committed already: skipped", self.uri)
            return self.existing
        if self._done:
            raise RuntimeError("this CacheWriter has already committed or aborted")
        if cache.config.answer_from == "state":  # only the bounded state is kept: no chunk rows (see Engine)
            if self._next_index != self._first_index:
                raise ValueError(f"{self._next_index - self._first_index} chunks were written to {self.uri!r} for a "
                                 "cache that answers from its carried state")
        elif cache.num_chunks != self._next_index:
            raise ValueError(f"the cache has {cache.num_chunks} chunks but {self._next_index} were written to "
                             f"{self.uri!r}")
        num_layers = cache.model.num_layers
        if self._file is not None:
            self._close_chunk_file()
        files = [f for f in self.base["files"] if f["kind"] in ("chunks", "summaries")] if self.base else []
        if self.base is not None:
            prefix_entry = next(f for f in self.base["files"] if f["kind"] == "prefix")
        else:
            prefix_entry = self._write_prefix(cache, num_layers)
        files = [prefix_entry, *files, *self._chunk_files, *self._close_summaries()]
        if cache.state is not None:
            files.append(self._write_state(cache))
        if cache.recurrent or cache.prefix_recurrent:
            files.append(self._write_recurrent(cache))
        segment = {"chunks": [self._first_index, self._next_index], "footage": footage}
        appends = [*(self.base.get("appends", []) if self.base else []), segment]
        from statekv.store import catalog

        entry = catalog.log_name()  # the commit's catalog entry, named in the manifest: it was logged before it
        manifest = manifest_schema.seal({**self._manifest(cache, files, appends), "catalog_entry": entry})
        self._written = files
        self._check_written()
        try:  # before the manifest: a kill after the commit cannot leave it out of the catalog
            catalog.record(self.fs, self.path, manifest, name=entry, pending=True)
        except (OSError, *TRANSPORT_ERRORS) as e:
            raise OSError(f"cache {self.uri!r}: could not add the commit to the root's catalog ({e}); nothing was "
                          "committed") from e
        committed = put_if_version(self.fs, join(self.path, F.MANIFEST), manifest_schema.encode(manifest),
                                   self._expect_version)
        self._done = True
        if committed is None:
            catalog.forget(self.fs, self.path, entry)
            self._lost()
        try:  # committed: what follows is housekeeping, and its failure must not undo the commit's success
            self._retire(manifest)
            sweep(self.uri, grace_s=self.sweep_grace_s, filesystem=self.fs)
        except OSError as e:
            logger.warning("committed %s; sweeping old attempts failed (a later commit retries): %s", self.uri, e)
        try:  # the commit is listed already (its pending entry); this spares listings the check of its manifest
            catalog.record(self.fs, self.path, manifest, name=entry)
        except (OSError, *TRANSPORT_ERRORS) as e:
            logger.info("committed %s; its catalog entry stays pending (%s)", self.uri, e)
        logger.info("committed cache %s: %d chunks, %d bytes", self.uri, manifest["totals"]["chunks"],
                    manifest["totals"]["bytes"])
        return manifest

    def _lost(self) -> None:
        """Another writer committed first: delete this attempt's own files and say who won."""
        self._remove_attempt()
        try:
            winner: dict[str, Any] | None = manifest_schema.parse(
                read_versioned(self.fs, join(self.path, F.MANIFEST))[0], self.video_id)
        except (FileNotFoundError, CacheCorruptError):
            winner = None
        raise ConcurrentWriteError(self.uri, winner.get("created") if winner else None)

    def _retire(self, manifest: dict[str, Any]) -> None:
        """Mark the attempt folders the replaced manifest named, and the new one does not, as retired now."""
        if self.existing is None:
            return
        keep = {f["path"].split("/")[0] for f in manifest["files"]}
        for folder in sorted({f["path"].split("/")[0] for f in self.existing["files"]} - keep):
            self.fs.pipe_file(join(self.path, folder, RETIRED), b"")

    def _write_prefix(self, cache: VideoKVCache, num_layers: int) -> dict[str, Any]:
        rel = f"{self.attempt}/prefix.parquet"
        layers = cache.model.attention_layers
        f = _ParquetFile(self.fs, join(self.path, rel), rel, F.prefix_schema(layers), "prefix")
        ids = serde.to_bytes(cache.prefix_ids.to(torch.int64))
        row: dict[str, Any] = {"prefix_ids": ids, "ids_crc": F.crc32(ids)}
        for layer in layers:
            t = F.layer_tag(layer)
            kb, vb = serde.to_bytes(cache.prefix_keys[layer]), serde.to_bytes(cache.prefix_values[layer])
            row[f"k_{t}"], row[f"v_{t}"], row[f"crc_{t}"] = kb, vb, F.crc32(kb, vb)
        f.add(row)
        return f.close()

    def _write_state(self, cache: VideoKVCache) -> dict[str, Any]:
        rel = f"{self.attempt}/state.parquet"
        f = _ParquetFile(self.fs, join(self.path, rel), rel, F.STATE_SCHEMA, "state")
        for layer, s in enumerate(cache.state):
            if s is None:  # a linear-attention layer: its state is in recurrent.parquet
                continue
            if self.int8:  # the same quantisation as the chunks' (the state is a selection of chunk tokens)
                qk, sk = serde.quantize_keys(s.keys)
                qv, sv = serde.quantize_values(s.values)
                kb, vb, ksb, vsb = (serde.to_bytes(x) for x in (qk, qv, sk, sv))
            else:
                kb, vb, ksb, vsb = serde.to_bytes(s.keys), serde.to_bytes(s.values), None, None
            ib = serde.to_bytes(s.token_index.to(torch.int64))
            sb = None if s.scores is None else serde.to_bytes(s.scores.float())
            f.add({"layer": layer, "size": s.size, "keys": kb, "values": vb, "token_index": ib, "scores": sb,
                   "keys_scale": ksb, "values_scale": vsb, "crc": F.crc32(kb, vb, ib, sb, ksb, vsb)})
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

    def _manifest(self, cache: VideoKVCache, files: list[dict[str, Any]], appends: list[dict[str, Any]],
                  ) -> dict[str, Any]:
        tokens = cache.num_video_tokens
        described = convert.describe_cache(cache, self._position_rows)
        if cache.config.compression is not None:
            if self._kept is False:
                raise ValueError(f"cache {self.uri!r}: the prefill config compresses chunks, the chunks written "
                                 "are not compressed")
            layers = self._kv_layers if self._kv_layers is not None else cache.model.attention_layers
            described["chunks"]["kept_tokens"] = self._kept_totals or [0] * len(layers)
        elif self._kept:
            raise ValueError(f"cache {self.uri!r}: compressed chunks were written, the prefill config compresses none")
        return {
            "format": F.FORMAT,
            "format_version": F.FORMAT_VERSION,
            "video_id": self.video_id,
            "source": source_info(cache.video.source, self.source_storage_options),
            **described,
            "storage": "int8" if self.int8 else "native",
            "byteorder": "little",
            "totals": {"chunks": cache.num_chunks, "tokens": tokens, "bytes": sum(f["bytes"] for f in files)},
            "files": files,
            "appends": appends,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "statekv_version": __version__,
        }

    def _check_written(self) -> None:
        """Every file this attempt names is there in full (a sweep may have removed a doomed attempt's files)."""
        mine = [f for f in self._written if f["path"].startswith(self.attempt)]
        for f in mine:
            try:
                size = self.fs.size(join(self.path, f["path"]))
            except FileNotFoundError:
                size = None
            if size != f["bytes"]:
                self._done = True
                self._lost_if_replaced()
                raise OSError(f"{self.uri}/{f['path']}: {size} bytes stored, {f['bytes']} written")

    def _lost_if_replaced(self) -> None:
        try:
            current: str | None = read_versioned(self.fs, join(self.path, F.MANIFEST))[1]
        except FileNotFoundError:
            current = None
        if current != self._expect_version:
            self._lost()

    def _remove_attempt(self) -> None:
        target = join(self.path, self.attempt)
        if not is_local(self.fs):
            self.fs.invalidate_cache(self.path)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def abort(self) -> None:
        """Stop without committing and delete this attempt's files (a crash leaves them for a later sweep)."""
        if self._done:
            return
        self._done = True
        for f in (self._file, self._summaries):
            if f is not None:
                f.abort()
        self._file = self._summaries = None
        self._remove_attempt()
        if self.existing is None and is_local(self.fs) and self.fs.isdir(self.path) and not self.fs.ls(self.path):
            self.fs.rmdir(self.path)  # a failed first prefill leaves no empty <root>/<video_id>/ behind

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _describes(index: torch.Tensor, stored: int, n: int) -> bool:
    """Whether `index` is a valid kept-token list for `stored` keys of a chunk of `n` tokens (1..n, ascending)."""
    return (index.dim() == 1 and index.numel() == stored and 1 <= stored <= n and int(index[0]) >= 0
            and int(index[-1]) < n and not bool((index[1:] <= index[:-1]).any()))


def sweep(uri: str | os.PathLike, *, grace_s: float = SWEEP_GRACE_S, storage_options: StorageOptionsLike = None,
          filesystem: fsspec.AbstractFileSystem | None = None) -> list[str]:
    """Delete what the committed manifest of `uri` does not name (retired and abandoned attempt folders, stray
    temporary files) once it is `grace_s` old; returns the deleted paths.

    Age is that of the newest object inside a folder: its last write, or the RETIRED marker its superseding
    commit wrote, so a reader that opened the old manifest less than `grace_s` ago still finds every file. A
    corrupt manifest keeps everything (what it names cannot be told).
    """
    fs, path = resolve(os.fspath(uri), storage_options, filesystem)
    video_id = path.rsplit("/", 1)[-1]
    try:
        named = manifest_schema.parse(read_versioned(fs, join(path, F.MANIFEST))[0], video_id)["files"]
    except FileNotFoundError:
        named = []
    except CacheCorruptError:
        return []
    keep = {F.MANIFEST, LOCK_NAME, *(f["path"].split("/")[0] for f in named)}
    if not is_local(fs):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    now = time.time()
    removed = []
    for entry in entries:
        full = fs._strip_protocol(entry["name"]).rstrip("/")
        if full.rsplit("/", 1)[-1] in keep:
            continue
        inside = list(fs.find(full, detail=True).values()) if entry.get("type") == "directory" else []
        newest = max((_mtime(x) for x in [*inside, entry] if _mtime(x) is not None), default=None)
        if newest is not None and now - newest < grace_s:
            continue
        fs.rm(full, recursive=True)
        removed.append(full)
    return removed


def _mtime(info: dict[str, Any]) -> float | None:
    """Seconds since the epoch of a listing entry's last change (local `mtime`, S3 `LastModified`)."""
    value = info.get("mtime", info.get("LastModified"))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


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


@timed(STORE)
def footage_identity(video: Any, storage_options: StorageOptionsLike = None, *, sampling: Any = None,
                     fps: float | None = None) -> dict[str, Any] | None:
    """What a prefill of `video` consumes, to recognise the same footage again: the source (URI, size, etag or
    mtime), a content hash where cheap (frame arrays; local files, hashed as read), and the sampling settings.
    None for inputs that cannot be identified (file objects)."""
    import numpy as np

    settings = _plain(sampling)
    if fps is not None:
        settings = {**(settings or {}), "fps": float(fps)}
    if isinstance(video, np.ndarray):
        digest = hashlib.blake2b(np.ascontiguousarray(video).data, digest_size=16).hexdigest()
        return {"source": None, "content": f"frames:{list(video.shape)}:{digest}", "sampling": settings}
    if isinstance(video, (str, os.PathLike)):
        uri = os.fspath(video)
    elif isinstance(getattr(video, "source", None), str):  # an opened VideoSource
        uri = video.source
    else:
        return None
    info = source_info(uri, storage_options)
    content = None
    if info is not None and "size" in info and "etag" not in info:
        fs, path = resolve(uri, storage_options)
        if is_local(fs):
            content = "blake2b:" + _hash_file(path)
    elif info is not None and "etag" in info:
        content = f"etag:{info['etag']}:{info.get('size')}"
    return {"source": info, "content": content, "sampling": settings}


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """A dataclass (or dict) as JSON-able plain data; None stays None."""
    import dataclasses

    if obj is None:
        return None
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    return json.loads(json.dumps(data, default=str))


def same_footage(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two footage identities name the same frames sampled the same way (unknown footage never matches)."""
    if not a or not b or a.get("sampling") != b.get("sampling"):
        return False
    if a.get("content") and b.get("content"):
        return a["content"] == b["content"]
    sa, sb = a.get("source") or {}, b.get("source") or {}
    keys = ("uri", "size", "etag", "mtime")
    return bool(sa.get("uri")) and all(sa.get(k) == sb.get(k) for k in keys)


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
