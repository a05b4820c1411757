"""Reader: manifest -> `VideoKVCache`, whole or in part (a range of chunks, a subset of layers), lazily or not.

Partial reads use Parquet column projection (one column per layer for K and V) and row-group selection (one row
group per chunk or few chunks), so reading k chunks of l layers transfers about that many bytes plus the footer.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from statekv.cache import ChunkKV, Committed, ModelInfo, RecurrentState, VideoKVCache
from statekv.policies import LayerState
from statekv.store import convert
from statekv.store import format as F
from statekv.store.manifest import read_committed
from statekv.store import serde
from statekv.store.errors import CacheChangedError, CacheCorruptError, CacheNotFoundError, CacheUnavailableError
from statekv.store.fs import (TRANSPORT_ERRORS, NotRegularFileError, StorageOptionsLike, is_local,
                              is_transport_error, join, local_part_size, open_part, read_part, resolve)

logger = logging.getLogger(__name__)


class _GuardedFile:
    """A file object that remembers the exception its reads raised: tells a transport failure under pyarrow
    (bytes that did not arrive) from a format failure in pyarrow's own parser (bytes that are wrong)."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: BaseException | None = None

    def _guard(self, name: str, *args):
        try:
            return getattr(self._f, name)(*args)
        except BaseException as e:
            self.error = e
            raise

    def read(self, *args):
        return self._guard("read", *args)

    def readinto(self, *args):
        return self._guard("readinto", *args)

    def seek(self, *args):
        return self._guard("seek", *args)

    def __getattr__(self, name):
        return getattr(self._f, name)


_READ_FAILURES = (pa.ArrowException, OSError, NotRegularFileError, *TRANSPORT_ERRORS)
_FOOTER_GUESS = 64 << 10  # bytes read from a file's end to find its footer (Parquet readers read as much)
_LAYER_COLUMN = re.compile(r"(k|v|crc|k_scale|v_scale|kept|summary_k|summary_crc)_\d{3,}")


class _Store:
    """Reads the parts of one committed cache, verifying what it reads."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, uri: str, manifest: dict[str, Any],
                 layers: list[int], verify: bool, version: str = "") -> None:
        self.fs, self.path, self.uri, self.m = fs, path, uri, manifest
        self.version = version
        self.video_id = manifest["video_id"]
        self.layers = layers
        self.all_kv_layers = F.kv_layers(manifest)
        self.kv_layers = [l for l in layers if l in self.all_kv_layers]  # loaded layers that have K/V
        self.verify = verify
        lay = manifest["layout"]
        self.num_layers, self.heads, self.head_dim = lay["num_layers"], lay["num_kv_heads"], lay["head_dim"]
        self.dtype = serde.DTYPES[manifest["dtype"]]
        self.int8 = manifest["storage"] == "int8"
        self.kept = F.is_compressed(manifest)  # chunk rows store per layer a subset of the chunk's tokens
        self.position_rows = lay["position_rows"]
        self.chunk_files = [f for f in manifest["files"] if f["kind"] == "chunks"]
        self._firsts = [f["first_chunk"] for f in self.chunk_files]
        self._sizes_checked: set[str] = set()
        self._footers: dict[str, pq.FileMetaData] = {}  # shared with `for_layers` views
        self._cells: dict[str, dict[str, list[int]]] = {}  # path -> the cell CRCs its bound footer records

    # --- objects -----------------------------------------------------------------------------------------------

    def _failure(self, entry: dict[str, Any], e: BaseException, what: str = "") -> BaseException:
        """The store error for a failed read of `entry`'s bytes (not of their decoding)."""
        part = f"file {entry['path']}" + (f", {what}" if what else "")
        if isinstance(e, NotRegularFileError):  # a link, FIFO or device where a part should be: never read
            return CacheCorruptError(self.video_id, f"file {entry['path']}", str(e))
        if isinstance(e, FileNotFoundError):
            self.check_unchanged()
            return CacheCorruptError(self.video_id, f"file {entry['path']}", "missing")
        if isinstance(e, PermissionError):
            return e
        if is_transport_error(e):
            return CacheUnavailableError(self.video_id, part, e)
        return CacheCorruptError(self.video_id, part, f"unreadable ({e})")

    def check_unchanged(self) -> None:
        """CacheChangedError if the committed manifest is no longer the one this reader follows (a re-prefill
        retired the files it names): the caller reads the new one."""
        if not self.version:
            return
        try:
            m, version = read_committed(self.fs, self.path, self.uri)
        except CacheNotFoundError:
            return
        if version != self.version:
            raise CacheChangedError(self.video_id, m.get("created"))

    def _check_size(self, entry: dict[str, Any]) -> None:
        if not self.verify or entry["path"] in self._sizes_checked:
            return
        try:  # local: the part must be a regular file inside the cache folder (no link, FIFO or device)
            size = local_part_size(self.fs, self.path, entry["path"]) if is_local(self.fs) \
                else self.fs.size(join(self.path, entry["path"]))
        except _READ_FAILURES as e:
            raise self._failure(entry, e) from None
        if size != entry["bytes"]:
            self.check_unchanged()
            raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                    f"{size} bytes stored, the manifest says {entry['bytes']} (truncated?)")
        self._sizes_checked.add(entry["path"])

    def open(self, entry: dict[str, Any], *, whole: bool = False, page_checksums: bool = True) -> pq.ParquetFile:
        """A ParquetFile on the object; `whole` reads it in one request and checks its CRC-32 (full loads).

        Its row and row-group counts are checked against the manifest's (a manifest claiming fewer chunks than
        the file holds, or more, is refused).
        """
        self._check_size(entry)
        size = entry["bytes"]  # every read is bounded by the size the manifest declares
        try:  # fetching bytes: failures here are the store's (missing, denied, not delivered)
            raw = read_part(self.fs, self.path, entry["path"], size) if whole else \
                open_part(self.fs, self.path, entry["path"], size)
        except _READ_FAILURES as e:
            raise self._failure(entry, e) from None
        guard = None
        if whole:
            if len(raw) != size:
                self.check_unchanged()
                raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                        f"{len(raw)} bytes read, the manifest says {size} (truncated?)")
            if self.verify and F.crc32(raw) != entry["crc32"]:
                self.check_unchanged()
                raise CacheCorruptError(self.video_id, f"file {entry['path']}", "CRC-32 differs from the manifest")
            source: Any = pa.BufferReader(raw)
        else:
            source = guard = _GuardedFile(raw)
        metadata = self._footers.get(entry["path"])
        try:  # parsing: failures are the bytes' (corrupt), unless the guarded file's own reads failed
            if metadata is None and "footer_sha256" in entry:
                metadata = self._bound_footer(entry, source, raw if whole else None)
            # the footer is read once per object and kept: later partial reads (one layer at a time, for
            # retrieval) fetch only their column chunks
            pf = pq.ParquetFile(source, pre_buffer=not whole, metadata=metadata,
                                page_checksum_verification=self.verify and page_checksums)
        except _READ_FAILURES as e:
            raise self._parse_failure(entry, e, guard, "Parquet footer") from None
        pf.statekv_guard = guard  # type: ignore[attr-defined]
        if entry["path"] not in self._footers:
            self._check_counts(entry, pf)
            self._check_columns(entry, pf)
            if "footer_sha256" in entry:
                cells = F.parse_cells(pf.metadata.metadata)
                if cells is None or any(len(v) != pf.metadata.num_rows for v in cells.values()):
                    raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                            "its footer does not record its cell checksums")
                self._cells[entry["path"]] = cells
            self._footers[entry["path"]] = pf.metadata
        return pf

    def _bound_footer(self, entry: dict[str, Any], source: Any, raw: bytes | None) -> pq.FileMetaData:
        """The file's footer, read once and checked against the manifest's `footer_sha256`: the footer records
        every cell CRC of the file, so this binds all the file's cells to this cache (see format.CELLS_KEY)."""
        size, part = entry["bytes"], f"file {entry['path']}"
        if raw is None:
            source.seek(max(0, size - _FOOTER_GUESS))
            tail = source.read(_FOOTER_GUESS)
        else:
            tail = raw[-_FOOTER_GUESS:]
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            raise CacheCorruptError(self.video_id, part, "not a Parquet file (no closing magic)")
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 12 > size:
            raise CacheCorruptError(self.video_id, part, f"a {length}-byte footer in a {size}-byte file")
        if length + 8 > len(tail):  # a footer larger than the first guess: read exactly the rest of it
            source.seek(size - length - 8)
            tail = source.read(length + 8)
        footer = tail[-(length + 8):]
        if self.verify and hashlib.sha256(footer).hexdigest() != entry["footer_sha256"]:
            self.check_unchanged()
            raise CacheCorruptError(self.video_id, part, "its footer differs from the one this cache wrote "
                                                         "(a part of another cache?)")
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))

    def _check_columns(self, entry: dict[str, Any], pf: pq.ParquetFile) -> None:
        """The file has the columns the manifest implies (storage, compression, layers with K/V) and no K/V
        columns of layers it does not name: a lie in those fields is refused here, naming the field."""
        kind, layers = entry["kind"], self.all_kv_layers
        schemas = {"chunks": lambda: F.chunk_schema(layers, self.int8, self.kept),
                   "prefix": lambda: F.prefix_schema(layers), "summaries": lambda: F.summary_schema(layers),
                   "state": lambda: F.STATE_SCHEMA, "recurrent": lambda: F.RECURRENT_SCHEMA}
        want = schemas[kind]().names
        if kind == "state":  # state files before int8 state storage have no scale columns (read as null)
            want = [c for c in want if c not in ("keys_scale", "values_scale")]
        have = pf.schema_arrow.names
        missing = [c for c in want if c not in have]
        extra = [c for c in have if c not in want and _LAYER_COLUMN.fullmatch(c)]
        if not missing and not extra:
            return
        odd = missing + extra
        if any(c.startswith(("k_scale_", "v_scale_")) for c in odd):
            field = "storage"
        elif any(c.startswith("kept_") for c in odd):
            field = "prefill.compression"
        elif any(int(c.rsplit("_", 1)[-1]) >= self.num_layers for c in extra):
            field = "layout.num_layers"  # the file has layers beyond those the manifest counts
        elif odd:
            field = "layout.layer_types"  # which layers have K/V
        said = "; ".join(x for x in (f"lacks {', '.join(missing[:4])}" if missing else "",
                                     f"has {', '.join(extra[:4])}" if extra else "") if x)
        raise CacheCorruptError(self.video_id, f"{F.MANIFEST} field {field!r}",
                                f"disagrees with file {entry['path']}, which {said}")

    def _check_cell(self, entry: dict[str, Any], row: int, column: str, value: int, part: str) -> None:
        """A cell CRC read from a file is the one the footer bound to this cache recorded for that row."""
        cells = self._cells.get(entry["path"])
        if not self.verify or cells is None:
            return  # a file written before footers recorded cells: its cell CRCs are checked alone
        recorded = cells.get(column)
        if recorded is None or not 0 <= row < len(recorded) or recorded[row] != value:
            raise CacheCorruptError(self.video_id, part, "checksum differs from the one this cache recorded "
                                                         "(a part of another cache?)")

    def _check_counts(self, entry: dict[str, Any], pf: pq.ParquetFile) -> None:
        kind = entry["kind"]
        if kind in ("chunks", "summaries"):
            rows, groups = entry["num_chunks"], -(-entry["num_chunks"] // entry["chunks_per_row_group"])
        elif kind == "state":  # one row (and row group) per layer with K/V
            rows = groups = len(self.all_kv_layers)
        elif kind == "recurrent":  # a hybrid model's linear layers: checked row by row (layer, after, CRC)
            return
        else:
            rows = groups = 1
        md = pf.metadata
        if (md.num_rows, md.num_row_groups) != (rows, groups):
            raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                    f"{md.num_rows} rows in {md.num_row_groups} row groups; the manifest implies "
                                    f"{rows} rows in {groups}")

    def _read(self, entry: dict[str, Any], what: str, read, pf: pq.ParquetFile | None = None) -> pa.Table:
        try:
            return read()
        except _READ_FAILURES as e:
            raise self._parse_failure(entry, e, getattr(pf, "statekv_guard", None), what) from None

    def _parse_failure(self, entry: dict[str, Any], e: BaseException, guard: _GuardedFile | None,
                       what: str) -> BaseException:
        """A failure raised through pyarrow: the store's if the file object's reads failed, else corruption."""
        if guard is not None and guard.error is not None:
            return self._failure(entry, guard.error, what)
        return CacheCorruptError(self.video_id, f"file {entry['path']}, {what}", f"unreadable ({e})")

    def _tensor(self, data: bytes, dtype: torch.dtype, shape: tuple[int, ...], part: str) -> torch.Tensor:
        try:
            return serde.from_bytes(data, dtype, shape)
        except ValueError as e:
            raise CacheCorruptError(self.video_id, part, str(e)) from None

    def _check_finite(self, part: str, *tensors: torch.Tensor) -> None:
        """Keys and values are finite (a NaN scale or an inf key under a recomputed CRC would poison every
        answer's attention silently): one pass over what was read anyway."""
        if self.verify and not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise CacheCorruptError(self.video_id, part, "non-finite keys or values (NaN/inf)")

    def _check_crc(self, want: int, part: str, *data: bytes | None) -> None:
        if self.verify and F.crc32(*data) != want:
            raise CacheCorruptError(self.video_id, part, "checksum mismatch (altered bytes)")

    # --- prefix and state --------------------------------------------------------------------------------------

    def read_prefix(self, whole: bool) -> tuple[torch.Tensor, list, list]:
        entry = next(f for f in self.m["files"] if f["kind"] == "prefix")
        cols = ["prefix_ids", "ids_crc"] + [c for l in self.kv_layers for c in
                                             (f"k_{F.layer_tag(l)}", f"v_{F.layer_tag(l)}", f"crc_{F.layer_tag(l)}")]
        pf = self.open(entry, whole=whole)
        row = self._read(entry, "prefix", lambda: pf.read(columns=cols), pf).to_pylist()[0]
        part = f"file {entry['path']}"
        self._check_cell(entry, 0, "ids_crc", row["ids_crc"], f"{part}, prefix ids")
        self._check_crc(row["ids_crc"], f"{part}, prefix ids", row["prefix_ids"])
        p = self.m["prefix_len"]
        ids = self._tensor(row["prefix_ids"], torch.int64, (p,), f"{part}, prefix ids")
        keys: list = [None] * self.num_layers
        values: list = [None] * self.num_layers
        for l in self.kv_layers:
            t = F.layer_tag(l)
            lp = f"{part}, prefix, layer {l}"
            self._check_cell(entry, 0, f"crc_{t}", row[f"crc_{t}"], lp)
            self._check_crc(row[f"crc_{t}"], lp, row[f"k_{t}"], row[f"v_{t}"])
            keys[l] = self._tensor(row[f"k_{t}"], self.dtype, (self.heads, p, self.head_dim), lp)
            values[l] = self._tensor(row[f"v_{t}"], self.dtype, (self.heads, p, self.head_dim), lp)
            self._check_finite(lp, keys[l], values[l])
        return ids, keys, values

    @property
    def has_state(self) -> bool:
        return any(f["kind"] == "state" for f in self.m["files"])

    def read_state(self, whole: bool) -> list[LayerState | None] | None:
        entry = next((f for f in self.m["files"] if f["kind"] == "state"), None)
        if entry is None:
            return None
        pf = self.open(entry, whole=whole)
        groups = [self.all_kv_layers.index(l) for l in self.kv_layers]  # one row group per attention layer
        rows = self._read(entry, "state", lambda: pf.read_row_groups(groups), pf).to_pylist() if groups else []
        out: list[LayerState | None] = [None] * self.num_layers
        for g, l, row in zip(groups, self.kv_layers, rows):
            part = f"file {entry['path']}, state, layer {l}"
            if row["layer"] != l:
                raise CacheCorruptError(self.video_id, part, f"row holds layer {row['layer']}")
            self._check_cell(entry, g, "crc", row["crc"], part)
            ks, vs = row.get("keys_scale"), row.get("values_scale")
            self._check_crc(row["crc"], part, row["keys"], row["values"], row["token_index"], row["scores"], ks, vs)
            s = row["size"]
            shape = (self.heads, s, self.head_dim)
            if ks is not None and vs is not None:  # int8 storage: same quantisation as the chunks'
                keys = serde.dequantize(self._tensor(row["keys"], torch.int8, shape, part),
                                        self._tensor(ks, torch.float32, (self.heads, 1, self.head_dim), part),
                                        self.dtype)
                values = serde.dequantize(self._tensor(row["values"], torch.int8, shape, part),
                                          self._tensor(vs, torch.float32, (self.heads, s, 1), part), self.dtype)
            else:
                keys = self._tensor(row["keys"], self.dtype, shape, part)
                values = self._tensor(row["values"], self.dtype, shape, part)
            self._check_finite(part, keys, values)
            out[l] = LayerState(
                keys, values, self._tensor(row["token_index"], torch.int64, (self.heads, s), part),
                None if row["scores"] is None else self._tensor(row["scores"], torch.float32, (self.heads, s), part))
        return out

    def read_recurrent(self, whole: bool) -> tuple[dict[int, RecurrentState], dict[int, RecurrentState]]:
        """({layer: state after the prefix}, {layer: state after the video}) of the loaded linear layers."""
        entry = next((f for f in self.m["files"] if f["kind"] == "recurrent"), None)
        if entry is None:
            return {}, {}
        pf = self.open(entry, whole=whole)
        rows = self._read(entry, "recurrent states", lambda: pf.read()).to_pylist()
        out: dict[str, dict[int, RecurrentState]] = {after: {} for after in F.RECURRENT_AFTER}
        for i, row in enumerate(rows):
            if row["layer"] not in self.layers:
                continue
            part = f"file {entry['path']}, recurrent state of layer {row['layer']} after the {row['after']}"
            self._check_cell(entry, i, "crc", row["crc"], part)
            if self.verify and F.recurrent_crc(row) != row["crc"]:
                raise CacheCorruptError(self.video_id, part, "checksum mismatch (altered bytes)")
            if row["after"] not in out or row["conv_dtype"] not in serde.DTYPES \
                    or row["recurrent_dtype"] not in serde.DTYPES:
                raise CacheCorruptError(self.video_id, part, "unknown state kind or dtype")
            conv = self._tensor(row["conv"], serde.DTYPES[row["conv_dtype"]], tuple(row["conv_shape"]), part)
            rec = self._tensor(row["recurrent"], serde.DTYPES[row["recurrent_dtype"]],
                               tuple(row["recurrent_shape"]), part)
            out[row["after"]][row["layer"]] = RecurrentState(conv, rec)
        return out["prefix"], out["video"]

    # --- chunks ------------------------------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[dict[str, Any], int]:
        """(file entry, row group) holding chunk `index`."""
        i = bisect.bisect_right(self._firsts, index) - 1
        entry = self.chunk_files[i]
        return entry, (index - entry["first_chunk"]) // entry["chunks_per_row_group"]

    def read_chunks(self, indices: Iterable[int], whole: bool = False, columns: list[str] | None = None,
                    ) -> dict[int, ChunkKV]:
        """Chunks by index, reading only their row groups and the loaded layers' columns."""
        by_file: dict[str, tuple[dict[str, Any], set[int]]] = {}
        wanted = set(indices)
        for index in wanted:
            entry, rg = self.locate(index)
            by_file.setdefault(entry["path"], (entry, set()))[1].add(rg)
        cols = columns or F.CHUNK_META + [c for l in self.kv_layers for c in F.kv_columns(l, self.int8, self.kept)]
        out: dict[int, ChunkKV] = {}
        for entry, rgs in by_file.values():
            pf = self.open(entry, whole=whole)
            try:
                table = self._read(entry, f"chunks {sorted(wanted)}",
                                   lambda: pf.read_row_groups(sorted(rgs), columns=cols), pf)
            except CacheCorruptError:
                # a page CRC failed: read again without page CRCs so the per-layer CRCs name the chunk and layer
                pf = self.open(entry, whole=whole, page_checksums=False)
                for row in self._read(entry, f"chunks {sorted(wanted)}",
                                      lambda: pf.read_row_groups(sorted(rgs), columns=cols), pf).to_pylist():
                    self._chunk(row, entry)
                raise
            rows = table.to_pylist()
            self._check_order(entry, pf, sorted(rgs), [r["chunk_index"] for r in rows])
            for row in rows:
                if row["chunk_index"] in wanted:
                    out[row["chunk_index"]] = self._chunk(row, entry)
        missing = wanted - out.keys()
        if missing:
            raise CacheCorruptError(self.video_id, f"chunks {sorted(missing)}", "not found where the manifest says")
        return out

    def read_summaries(self, layer: int, indices: list[int], *, pre_rope: bool = False) -> torch.Tensor:
        """(C, Hkv, D) float32 summary (mean) keys of `indices` at `layer`, reading only that column — from the
        summaries files (one range per 256 chunks) or, for a cache without them, from the chunk rows. `pre_rope`:
        the means of the keys before RoPE (summaries files written since they exist; ValueError naming the cache
        and the fix otherwise)."""
        t = F.layer_tag(layer)
        index_files = [f for f in self.m["files"] if f["kind"] == "summaries"]
        files = index_files or self.chunk_files
        firsts = [f["first_chunk"] for f in files]
        key, crc = (F.pre_rope_column(layer), F.pre_rope_crc_column(layer)) if pre_rope else \
            (f"summary_k_{t}", f"summary_crc_{t}")
        cols = ["chunk_index", key] + ([crc] if index_files else [])
        by_file: dict[str, tuple[dict[str, Any], set[int]]] = {}
        for index in indices:
            entry = files[bisect.bisect_right(firsts, index) - 1]
            rg = (index - entry["first_chunk"]) // entry["chunks_per_row_group"]
            by_file.setdefault(entry["path"], (entry, set()))[1].add(rg)
        found: dict[int, bytes] = {}
        for entry, rgs in by_file.values():
            pf = self.open(entry)
            if pre_rope and (not index_files or key not in pf.schema_arrow.names):
                raise ValueError(f"cache {self.uri!r} has no pre-RoPE summary keys (indexed before statekv stored "
                                 f"them), which query='question' scores with: re-index it (mode 'overwrite')")
            table = self._read(entry, "summaries", lambda: pf.read_row_groups(sorted(rgs), columns=cols), pf)
            rows = table.to_pylist()
            self._check_order(entry, pf, sorted(rgs), [r["chunk_index"] for r in rows])
            for row in rows:
                if index_files:
                    sp = f"file {entry['path']}, chunk {row['chunk_index']}, layer {layer}, summary"
                    self._check_cell(entry, row["chunk_index"] - entry["first_chunk"], crc, row[crc], sp)
                    self._check_crc(row[crc], sp, row[key])
                found[row["chunk_index"]] = row[key]
        missing = [i for i in indices if i not in found]
        if missing:
            raise CacheCorruptError(self.video_id, f"chunks {missing}", "not found where the manifest says")
        out = [self._tensor(found[i], torch.float32, (self.heads, self.head_dim), f"chunk {i}, layer {layer}, summary")
               for i in indices]
        return torch.stack(out) if out else torch.empty(0, self.heads, self.head_dim)

    def _check_order(self, entry: dict[str, Any], pf: pq.ParquetFile, groups: list[int], got: list[int]) -> None:
        """The rows of row groups `groups` are chunks first_chunk + their row number, in order (a permuted
        `chunk_index` would otherwise file one chunk's keys under another's index)."""
        want: list[int] = []
        for g in groups:
            start = entry["first_chunk"] + g * entry["chunks_per_row_group"]
            want += range(start, start + pf.metadata.row_group(g).num_rows)
        if got != want:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                    f"rows hold chunks {got[:8]}, where chunks {want[:8]} belong (out of order)")

    def for_layers(self, layers: list[int]) -> "_Store":
        """The same store reading only `layers` (retrieval reads one layer at a time)."""
        view = copy.copy(self)
        view.layers = layers
        view.kv_layers = [l for l in layers if l in self.all_kv_layers]  # what `read_chunks` reads and decodes
        return view

    def _chunk(self, row: dict[str, Any], entry: dict[str, Any]) -> ChunkKV:
        index, n = row["chunk_index"], row["num_tokens"]
        part = f"file {entry['path']}, chunk {index}"
        row_no = index - entry["first_chunk"]
        self._check_cell(entry, row_no, "meta_crc", row["meta_crc"], part)
        if self.verify and F.meta_crc(row) != row["meta_crc"]:
            raise CacheCorruptError(self.video_id, part, "checksum mismatch in chunk metadata/positions")
        keys: list = [None] * self.num_layers
        values: list = [None] * self.num_layers
        kept: list | None = [None] * self.num_layers if self.kept else None
        for l in self.kv_layers:
            t = F.layer_tag(l)
            lp = f"{part}, layer {l}"
            ks, vs = (row[f"k_scale_{t}"], row[f"v_scale_{t}"]) if self.int8 else (None, None)
            kb = row[f"kept_{t}"] if self.kept else None
            self._check_cell(entry, row_no, f"crc_{t}", row[f"crc_{t}"], lp)
            self._check_crc(row[f"crc_{t}"], lp, row[f"k_{t}"], row[f"v_{t}"], ks, vs, row[f"summary_k_{t}"], kb)
            m = n
            if kept is not None:
                kept[l] = self._kept_index(kb, n, lp)
                m = kept[l].numel()
            shape = (self.heads, m, self.head_dim)
            if self.int8:
                k = serde.dequantize(self._tensor(row[f"k_{t}"], torch.int8, shape, lp),
                                     self._tensor(ks, torch.float32, (self.heads, 1, self.head_dim), lp), self.dtype)
                v = serde.dequantize(self._tensor(row[f"v_{t}"], torch.int8, shape, lp),
                                     self._tensor(vs, torch.float32, (self.heads, m, 1), lp), self.dtype)
            else:
                k = self._tensor(row[f"k_{t}"], self.dtype, shape, lp)
                v = self._tensor(row[f"v_{t}"], self.dtype, shape, lp)
            self._check_finite(lp, k, v)
            keys[l], values[l] = k, v
        positions = self._tensor(row["position_ids"], torch.int64, (self.position_rows, n), part)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= F.MAX_POSITION):
            raise CacheCorruptError(self.video_id, part, f"positions outside [0, {F.MAX_POSITION})")
        self._check_chunk_against_manifest(row, part)
        return ChunkKV(index=index, frame_range=(row["frame_start"], row["frame_end"]),
                       source_frames=list(row["source_frames"]), timestamps=list(row["timestamps"]),
                       position_ids=positions, keys=keys, values=values, kept=kept)

    def _kept_index(self, data: bytes, n: int, part: str) -> torch.Tensor:
        """A compressed layer's kept token indices: 1..n of them, strictly ascending, within the chunk's n tokens."""
        if len(data) % 8 or not 8 <= len(data) <= 8 * n:
            raise CacheCorruptError(self.video_id, part, f"{len(data)} bytes of kept token indices for a chunk of "
                                                         f"{n} tokens")
        index = self._tensor(data, torch.int64, (len(data) // 8,), part)
        if int(index[0]) < 0 or int(index[-1]) >= n or bool((index[1:] <= index[:-1]).any()):
            raise CacheCorruptError(self.video_id, part, f"kept token indices are not ascending within [0, {n})")
        return index

    def _check_chunk_against_manifest(self, row: dict[str, Any], part: str) -> None:
        """The manifest's frame list and chunk boundaries agree with what the chunk itself stores (a manifest whose
        numbers were changed and re-checksummed would otherwise shift answers silently)."""
        v = self.m["video"]
        a, b = row["frame_start"], row["frame_end"]
        if not (0 <= a <= b <= len(v["frame_indices"])) or list(row["source_frames"]) != v["frame_indices"][a:b] \
                or [float(t) for t in row["timestamps"]] != [float(t) for t in v["timestamps"][a:b]]:
            raise CacheCorruptError(self.video_id, f"{F.MANIFEST} field 'video'",
                                    f"frames [{a}, {b}) disagree with those stored in {part}")
        index, tokens = row["chunk_index"], self.m["chunks"]["tokens"]
        if not 0 <= index < len(tokens) or tokens[index] != row["num_tokens"]:
            raise CacheCorruptError(self.video_id, f"{F.MANIFEST} field 'chunks.tokens'",
                                    f"disagrees with the {row['num_tokens']} tokens stored in {part}")


class LazyChunks(Sequence[ChunkKV]):
    """The chunks of a stored cache, read on first access and then kept; `len()` reads nothing.

    Iterating reads every chunk not yet read, one request batch per file (row groups coalesced).
    """

    def __init__(self, store: _Store, indices: list[int]) -> None:
        self._store = store
        self.indices = indices
        self._loaded: dict[int, ChunkKV] = {}
        self._summaries: dict[tuple[int, bool], torch.Tensor] = {}  # (layer, pre_rope) -> (C, Hkv, D)
        self._layer_chunks: dict[tuple[int, int], ChunkKV] = {}  # (layer, chunk) -> that layer's K/V only

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> ChunkKV: ...
    @overload
    def __getitem__(self, i: slice) -> list[ChunkKV]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            picked = self.indices[i]
            self.prefetch(picked)
            return [self._loaded[j] for j in picked]
        index = self.indices[i]
        self.prefetch([index])
        return self._loaded[index]

    def __iter__(self) -> Iterator[ChunkKV]:
        self.prefetch(self.indices)
        return (self._loaded[j] for j in self.indices)

    def prefetch(self, indices: Iterable[int]) -> None:
        """Read the given chunk indices (those not read yet)."""
        todo = [j for j in indices if j not in self._loaded]
        if todo:
            self._loaded.update(self._store.read_chunks(todo))

    def read_layer(self, layer: int, indices: Iterable[int]) -> dict[int, ChunkKV]:
        """Chunks by index holding only `layer`'s K/V (other layers None), reading only that layer's columns and
        the chunks' metadata: what query-time retrieval costs. Chunks read whole before are served from memory."""
        wanted = list(indices)
        out = {j: self._loaded.get(j) or self._layer_chunks.get((layer, j)) for j in wanted}
        todo = [j for j, c in out.items() if c is None]
        if todo:
            read = self._store.for_layers([layer]).read_chunks(todo)
            for j, chunk in read.items():
                self._layer_chunks[(layer, j)] = chunk  # kept: a later question may choose it again
            out.update(read)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held in memory: chunks read whole, per-layer reads and summary keys."""
        whole = sum(c.nbytes for c in self._loaded.values())
        layers = sum(c.nbytes for c in self._layer_chunks.values())
        summaries = sum(t.numel() * t.element_size() for t in self._summaries.values())
        return whole + layers + summaries

    def summary_keys(self, layer: int, *, pre_rope: bool = False) -> torch.Tensor:
        """(C, Hkv, D) float32 summary keys of every chunk at `layer` (the retrieval index), without K/V;
        `pre_rope`: the means of the keys before RoPE (ValueError for a cache stored without them)."""
        if (layer, pre_rope) not in self._summaries:
            self._summaries[(layer, pre_rope)] = self._store.read_summaries(layer, self.indices, pre_rope=pre_rope)
        return self._summaries[(layer, pre_rope)]

    @property
    def loaded(self) -> list[int]:
        return sorted(self._loaded)

    def __repr__(self) -> str:
        return f"LazyChunks({len(self)} chunks, {len(self._loaded)} read)"


class LazyState(Sequence[LayerState]):
    """A stored cache's carried state (per layer), read on first access; answering never touches it."""

    def __init__(self, store: _Store) -> None:
        self._store = store
        self._layers: list[LayerState | None] | None = None

    def _load(self) -> list[LayerState | None]:
        if self._layers is None:
            self._layers = self._store.read_state(False)
        return self._layers

    def __len__(self) -> int:
        return self._store.num_layers

    def __getitem__(self, i):
        return self._load()[i]

    def __iter__(self) -> Iterator[LayerState]:
        return iter(self._load())

    def __repr__(self) -> str:
        return f"LazyState({len(self)} layers, {'read' if self._layers is not None else 'not read'})"


def load_cache(uri: str | os.PathLike, *, chunks: Iterable[int] | None = None, layers: Iterable[int] | None = None,
               lazy: bool = True, storage_options: StorageOptionsLike = None,
               filesystem: fsspec.AbstractFileSystem | None = None, verify: bool = True,
               expect_model: ModelInfo | None = None) -> VideoKVCache:
    """Load a committed cache. `chunks` (indices) and `layers` select parts; `lazy` defers reading chunks.

    The result's `num_chunks`, `chunk_tokens`, `video` and cursor describe the whole video; with `chunks` it holds only those
    (so it can serve retrieval but not `Engine.ask`, which needs every chunk). With `layers`, other layers'
    tensors are None in `prefix_keys`, `prefix_values`, each chunk's `keys`/`values` and `state`; the cache's
    `committed.layers` lists the layers present. A full, eager load reads each object in one request and
    checks its whole-file CRC-32; partial and lazy loads check per-layer and page checksums of what they read.

    A cache re-prefilled while this call reads it is read again from its new commit (CacheChangedError after a
    few tries); a lazy cache's later chunk reads raise CacheChangedError if its files were retired meanwhile.
    `cache.committed` holds the manifest read and its version (see `manifest_version`). With `expect_model` (the model
    that will use the cache) a cache made by another model (ModelMismatchError) or on another token layout of its
    family (CacheLayoutError: re-index) is refused before any tensor is read.
    """
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    for attempt in range(_CHANGED_RETRIES):
        try:
            return _load(fs, path, uri, chunks, layers, lazy, verify, expect_model)
        except CacheChangedError:  # re-prefilled while we read: read the new commit
            if attempt == _CHANGED_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


_CHANGED_RETRIES = 3


def _load(fs: fsspec.AbstractFileSystem, path: str, uri: str, chunks: Iterable[int] | None,
          layers: Iterable[int] | None, lazy: bool, verify: bool, expect_model: ModelInfo | None) -> VideoKVCache:
    m, version = read_committed(fs, path, uri)
    try:  # the manifest passed SCHEMA and RULES; what the cache's own classes still refuse is this cache's fault
        fields = convert.cache_fields(m)
    except (TypeError, ValueError, KeyError) as e:
        raise CacheCorruptError(m["video_id"], F.MANIFEST, f"does not describe a cache ({type(e).__name__}: {e})") \
            from None
    if expect_model is not None:
        expect_model.check_serves(fields["model"], m["video_id"])
    num_layers = m["layout"]["num_layers"]
    layer_list = list(range(num_layers)) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layer_list if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the cache has {num_layers} layers")
    num_chunks = fields["num_chunks"]
    index_list = list(range(num_chunks)) if chunks is None else [int(c) for c in chunks]
    bad = [c for c in index_list if not 0 <= c < num_chunks]
    if bad:
        raise ValueError(f"chunks {bad} out of range: the cache has {num_chunks} chunks")
    store = _Store(fs, path, uri, m, layer_list, verify, version)
    whole = not lazy and chunks is None and layers is None
    prefix_ids, prefix_keys, prefix_values = store.read_prefix(whole)
    # the carried state is needed only to resume a stream, never to answer: a lazy load reads it on first use
    state = LazyState(store) if lazy and store.has_state else store.read_state(whole)
    if fields["config"].answer_from == "state":
        index_list = []  # the cache keeps no chunk rows: it answers from its carried state
    prefix_recurrent, recurrent = store.read_recurrent(whole)
    seq = LazyChunks(store, index_list)
    if not lazy:
        seq._loaded.update(store.read_chunks(index_list, whole=whole))
        tokens = sum(c.num_tokens for c in seq._loaded.values())
        if chunks is None and index_list and tokens != m["totals"]["tokens"]:
            raise CacheCorruptError(m["video_id"], f"{F.MANIFEST} field 'totals.tokens'",
                                    f"{m['totals']['tokens']}, but the chunks hold {tokens} tokens")
        if chunks is None and index_list and store.kept:
            _check_kept_totals(m, store, seq._loaded.values())
    cache = VideoKVCache(dtype=store.dtype, prefix_ids=prefix_ids, prefix_keys=prefix_keys,
                         prefix_values=prefix_values, chunks=seq if lazy else list(seq), state=state,
                         prefix_recurrent=prefix_recurrent, recurrent=recurrent,
                         committed=Committed(m, version, layer_list, expect_model), **fields)
    return cache


def _check_kept_totals(m: dict[str, Any], store: _Store, chunks: Iterable[ChunkKV]) -> None:
    """A compressed cache's chunks store, per layer, as many tokens as the manifest counts."""
    chunks = list(chunks)
    for i, layer in enumerate(store.all_kv_layers):
        if layer not in store.kv_layers:
            continue
        stored = sum(c.stored_tokens(layer) for c in chunks)
        if stored != m["chunks"]["kept_tokens"][i]:
            raise CacheCorruptError(m["video_id"], f"{F.MANIFEST} field 'chunks.kept_tokens[{i}]'",
                                    f"{m['chunks']['kept_tokens'][i]}, but the chunks store {stored} tokens at "
                                    f"layer {layer}")


def load_summary_keys(uri: str | os.PathLike, layer: int, *, chunks: Iterable[int] | None = None,
                      storage_options: StorageOptionsLike = None,
                      filesystem: fsspec.AbstractFileSystem | None = None) -> tuple[list[int], torch.Tensor]:
    """(chunk indices, (C, Hkv, D) float32 mean keys) at `layer`: the retrieval index, without reading K/V."""
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    m, version = read_committed(fs, path, uri)
    store = _Store(fs, path, uri, m, [layer], verify=True, version=version)
    if layer not in store.all_kv_layers:
        raise ValueError(f"layer {layer} of {uri!r} is a linear-attention layer: it has no keys to summarise")
    index_list = list(range(m["chunks"]["count"])) if chunks is None else [int(c) for c in chunks]
    return index_list, store.read_summaries(layer, index_list)
