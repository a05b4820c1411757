"""Reader: manifest -> `VideoKVCache`, whole or in part (a range of chunks, a subset of layers), lazily or not.

Partial reads use Parquet column projection (one column per layer for K and V) and row-group selection (one row
group per chunk or few chunks), so reading k chunks of l layers transfers about that many bytes plus the footer.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from statekv.cache import ChunkKV, RecurrentState, VideoKVCache
from statekv.errors import ModelMismatchError
from statekv.policies import LayerState
from statekv.store import format as F
from statekv.store import serde
from statekv.store.errors import CacheCorruptError, CacheNotFoundError
from statekv.store.fs import StorageOptionsLike, is_local, join, resolve


def read_manifest(uri: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                  filesystem: fsspec.AbstractFileSystem | None = None) -> dict[str, Any]:
    """The committed manifest at `uri` (= `<root>/<video_id>`); CacheNotFoundError if there is none."""
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    return _read_manifest(fs, path, uri)


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, Any]:
    return F.read_manifest_at(fs, path, uri)


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


def list_caches(root: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                filesystem: fsspec.AbstractFileSystem | None = None) -> list[CacheEntry]:
    """Committed caches under `root` (only a manifest makes a cache), sorted by video id."""
    root = os.fspath(root).rstrip("/")
    fs, path = resolve(root, storage_options, filesystem)
    if not is_local(fs):
        fs.invalidate_cache()
    out = []
    for found in sorted(fs.glob(join(path, "*", F.MANIFEST))):
        vpath = fs._strip_protocol(found).rsplit("/", 1)[0]
        video_id = vpath.rsplit("/", 1)[-1]
        uri = f"{root}/{video_id}"
        try:
            m = _read_manifest(fs, vpath, uri)
        except CacheNotFoundError:  # deleted between listing and reading
            continue
        out.append(CacheEntry(video_id, uri, m["totals"]["chunks"], m["totals"]["tokens"], m["totals"]["bytes"],
                              m["storage"], m["created"], m["model"]["fingerprint"]))
    return out


class _Store:
    """Reads the parts of one committed cache, verifying what it reads."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, uri: str, manifest: dict[str, Any],
                 layers: list[int], verify: bool) -> None:
        self.fs, self.path, self.uri, self.m = fs, path, uri, manifest
        self.video_id = manifest["video_id"]
        self.layers = layers
        self.all_kv_layers = F.kv_layers(manifest)
        self.kv_layers = [l for l in layers if l in self.all_kv_layers]  # loaded layers that have K/V
        self.verify = verify
        lay = manifest["layout"]
        self.num_layers, self.heads, self.head_dim = lay["num_layers"], lay["num_kv_heads"], lay["head_dim"]
        self.dtype = serde.DTYPES[manifest["dtype"]]
        self.int8 = manifest["storage"] == "int8"
        self.position_rows = lay["position_rows"]
        self.chunk_files = [f for f in manifest["files"] if f["kind"] == "chunks"]
        self._firsts = [f["first_chunk"] for f in self.chunk_files]
        self._sizes_checked: set[str] = set()

    # --- objects -----------------------------------------------------------------------------------------------

    def _check_size(self, entry: dict[str, Any]) -> None:
        if not self.verify or entry["path"] in self._sizes_checked:
            return
        try:
            size = self.fs.size(join(self.path, entry["path"]))
        except FileNotFoundError:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}", "missing") from None
        if size != entry["bytes"]:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}",
                                    f"{size} bytes stored, the manifest says {entry['bytes']} (truncated?)")
        self._sizes_checked.add(entry["path"])

    def open(self, entry: dict[str, Any], *, whole: bool = False, page_checksums: bool = True) -> pq.ParquetFile:
        """A ParquetFile on the object; `whole` reads it in one request and checks its CRC-32 (full loads)."""
        self._check_size(entry)
        full = join(self.path, entry["path"])
        try:
            if whole:
                data = self.fs.cat_file(full)
                if self.verify and serde.crc32(data) != entry["crc32"]:
                    raise CacheCorruptError(self.video_id, f"file {entry['path']}", "CRC-32 differs from the manifest")
                source: Any = pa.BufferReader(data)
            else:
                source = self.fs.open(full, "rb", cache_type="none")
            return pq.ParquetFile(source, pre_buffer=not whole, page_checksum_verification=self.verify and page_checksums)
        except FileNotFoundError:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}", "missing") from None
        except (pa.ArrowException, OSError) as e:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}", f"unreadable Parquet ({e})") from None

    def _read(self, entry: dict[str, Any], what: str, read) -> pa.Table:
        try:
            return read()
        except (pa.ArrowException, OSError) as e:
            raise CacheCorruptError(self.video_id, f"file {entry['path']}, {what}", f"unreadable ({e})") from None

    def _tensor(self, data: bytes, dtype: torch.dtype, shape: tuple[int, ...], part: str) -> torch.Tensor:
        try:
            return serde.from_bytes(data, dtype, shape)
        except ValueError as e:
            raise CacheCorruptError(self.video_id, part, str(e)) from None

    def _check_crc(self, want: int, part: str, *data: bytes | None) -> None:
        if self.verify and serde.crc32(*data) != want:
            raise CacheCorruptError(self.video_id, part, "checksum mismatch (altered bytes)")

    # --- prefix and state --------------------------------------------------------------------------------------

    def read_prefix(self, whole: bool) -> tuple[torch.Tensor, list, list]:
        entry = next(f for f in self.m["files"] if f["kind"] == "prefix")
        cols = ["prefix_ids", "ids_crc"] + [c for l in self.kv_layers for c in
                                             (f"k_{F.layer_tag(l)}", f"v_{F.layer_tag(l)}", f"crc_{F.layer_tag(l)}")]
        pf = self.open(entry, whole=whole)
        row = self._read(entry, "prefix", lambda: pf.read(columns=cols)).to_pylist()[0]
        part = f"file {entry['path']}"
        self._check_crc(row["ids_crc"], f"{part}, prefix ids", row["prefix_ids"])
        p = self.m["prefix_len"]
        ids = self._tensor(row["prefix_ids"], torch.int64, (p,), f"{part}, prefix ids")
        keys: list = [None] * self.num_layers
        values: list = [None] * self.num_layers
        for l in self.kv_layers:
            t = F.layer_tag(l)
            lp = f"{part}, prefix, layer {l}"
            self._check_crc(row[f"crc_{t}"], lp, row[f"k_{t}"], row[f"v_{t}"])
            keys[l] = self._tensor(row[f"k_{t}"], self.dtype, (self.heads, p, self.head_dim), lp)
            values[l] = self._tensor(row[f"v_{t}"], self.dtype, (self.heads, p, self.head_dim), lp)
        return ids, keys, values

    def read_state(self, whole: bool) -> list[LayerState | None] | None:
        entry = next((f for f in self.m["files"] if f["kind"] == "state"), None)
        if entry is None:
            return None
        pf = self.open(entry, whole=whole)
        groups = [self.all_kv_layers.index(l) for l in self.kv_layers]  # one row group per attention layer
        rows = self._read(entry, "state", lambda: pf.read_row_groups(groups)).to_pylist() if groups else []
        out: list[LayerState | None] = [None] * self.num_layers
        for l, row in zip(self.kv_layers, rows):
            part = f"file {entry['path']}, state, layer {l}"
            if row["layer"] != l:
                raise CacheCorruptError(self.video_id, part, f"row holds layer {row['layer']}")
            self._check_crc(row["crc"], part, row["keys"], row["values"], row["token_index"], row["scores"])
            s = row["size"]
            shape = (self.heads, s, self.head_dim)
            out[l] = LayerState(
                self._tensor(row["keys"], self.dtype, shape, part), self._tensor(row["values"], self.dtype, shape, part),
                self._tensor(row["token_index"], torch.int64, (self.heads, s), part),
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
        for row in rows:
            if row["layer"] not in self.layers:
                continue
            part = f"file {entry['path']}, recurrent state of layer {row['layer']} after the {row['after']}"
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
        cols = columns or F.CHUNK_META + [c for l in self.kv_layers for c in F.kv_columns(l, self.int8)]
        out: dict[int, ChunkKV] = {}
        for entry, rgs in by_file.values():
            pf = self.open(entry, whole=whole)
            try:
                table = self._read(entry, f"chunks {sorted(wanted)}",
                                   lambda: pf.read_row_groups(sorted(rgs), columns=cols))
            except CacheCorruptError:
                # a page CRC failed: read again without page CRCs so the per-layer CRCs name the chunk and layer
                pf = self.open(entry, whole=whole, page_checksums=False)
                for row in self._read(entry, f"chunks {sorted(wanted)}",
                                      lambda: pf.read_row_groups(sorted(rgs), columns=cols)).to_pylist():
                    self._chunk(row, entry)
                raise
            for row in table.to_pylist():
                if row["chunk_index"] in wanted:
                    out[row["chunk_index"]] = self._chunk(row, entry)
        missing = wanted - out.keys()
        if missing:
            raise CacheCorruptError(self.video_id, f"chunks {sorted(missing)}", "not found where the manifest says")
        return out

    def _chunk(self, row: dict[str, Any], entry: dict[str, Any]) -> ChunkKV:
        index, n = row["chunk_index"], row["num_tokens"]
        part = f"file {entry['path']}, chunk {index}"
        if self.verify and F.meta_crc(row) != row["meta_crc"]:
            raise CacheCorruptError(self.video_id, part, "checksum mismatch in chunk metadata/positions")
        keys: list = [None] * self.num_layers
        values: list = [None] * self.num_layers
        shape = (self.heads, n, self.head_dim)
        for l in self.kv_layers:
            t = F.layer_tag(l)
            lp = f"{part}, layer {l}"
            ks, vs = (row[f"k_scale_{t}"], row[f"v_scale_{t}"]) if self.int8 else (None, None)
            self._check_crc(row[f"crc_{t}"], lp, row[f"k_{t}"], row[f"v_{t}"], ks, vs, row[f"summary_k_{t}"])
            if self.int8:
                k = serde.dequantize(self._tensor(row[f"k_{t}"], torch.int8, shape, lp),
                                     self._tensor(ks, torch.float32, (self.heads, 1, self.head_dim), lp), self.dtype)
                v = serde.dequantize(self._tensor(row[f"v_{t}"], torch.int8, shape, lp),
                                     self._tensor(vs, torch.float32, (self.heads, n, 1), lp), self.dtype)
            else:
                k = self._tensor(row[f"k_{t}"], self.dtype, shape, lp)
                v = self._tensor(row[f"v_{t}"], self.dtype, shape, lp)
            keys[l], values[l] = k, v
        return ChunkKV(index=index, frame_range=(row["frame_start"], row["frame_end"]),
                       source_frames=list(row["source_frames"]), timestamps=list(row["timestamps"]),
                       position_ids=self._tensor(row["position_ids"], torch.int64, (self.position_rows, n), part),
                       keys=keys, values=values)


class LazyChunks(Sequence[ChunkKV]):
    """The chunks of a stored cache, read on first access and then kept; `len()` reads nothing.

    Iterating reads every chunk not yet read, one request batch per file (row groups coalesced).
    """

    def __init__(self, store: _Store, indices: list[int]) -> None:
        self._store = store
        self.indices = indices
        self._loaded: dict[int, ChunkKV] = {}

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

    @property
    def loaded(self) -> list[int]:
        return sorted(self._loaded)

    def __repr__(self) -> str:
        return f"LazyChunks({len(self)} chunks, {len(self._loaded)} read)"


def load_cache(uri: str | os.PathLike, *, chunks: Iterable[int] | None = None, layers: Iterable[int] | None = None,
               lazy: bool = True, storage_options: StorageOptionsLike = None,
               filesystem: fsspec.AbstractFileSystem | None = None, verify: bool = True,
               expect_fingerprint: str | None = None) -> VideoKVCache:
    """Load a committed cache. `chunks` (indices) and `layers` select parts; `lazy` defers reading chunks.

    The result's `num_chunks`, `chunk_tokens`, `video` and cursor describe the whole video; with `chunks` it holds only those
    (so it can serve retrieval but not `Engine.ask`, which needs every chunk). With `layers`, other layers'
    tensors are None in `prefix_keys`, `prefix_values`, each chunk's `keys`/`values` and `state`; the cache's
    `loaded_layers` attribute lists the layers present. A full, eager load reads each object in one request and
    checks its whole-file CRC-32; partial and lazy loads check per-layer and page checksums of what they read.
    """
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    m = _read_manifest(fs, path, uri)
    fields = F.cache_fields(m)
    model = fields["model"]
    if expect_fingerprint is not None and expect_fingerprint != model.fingerprint:
        raise ModelMismatchError("model", f"{model.name_or_path} (fingerprint {model.fingerprint})",
                                 f"fingerprint {expect_fingerprint}")
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
    store = _Store(fs, path, uri, m, layer_list, verify)
    whole = not lazy and chunks is None and layers is None
    prefix_ids, prefix_keys, prefix_values = store.read_prefix(whole)
    state = store.read_state(whole)
    prefix_recurrent, recurrent = store.read_recurrent(whole)
    seq = LazyChunks(store, index_list)
    if not lazy:
        seq._loaded.update(store.read_chunks(index_list, whole=whole))
    cache = VideoKVCache(dtype=store.dtype, prefix_ids=prefix_ids, prefix_keys=prefix_keys,
                         prefix_values=prefix_values, chunks=seq if lazy else list(seq), state=state,
                         prefix_recurrent=prefix_recurrent, recurrent=recurrent, **fields)
    cache.loaded_layers = layer_list  # type: ignore[attr-defined]
    cache.manifest = m  # type: ignore[attr-defined]
    return cache


def load_summary_keys(uri: str | os.PathLike, layer: int, *, chunks: Iterable[int] | None = None,
                      storage_options: StorageOptionsLike = None,
                      filesystem: fsspec.AbstractFileSystem | None = None) -> tuple[list[int], torch.Tensor]:
    """(chunk indices, (C, Hkv, D) float32 mean keys) at `layer`: the retrieval index, without reading K/V."""
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    m = _read_manifest(fs, path, uri)
    store = _Store(fs, path, uri, m, [layer], verify=True)
    if layer not in store.all_kv_layers:
        raise ValueError(f"layer {layer} of {uri!r} is a linear-attention layer: it has no keys to summarise")
    index_list = list(range(m["chunks"]["count"])) if chunks is None else [int(c) for c in chunks]
    t = F.layer_tag(layer)
    cols = ["chunk_index", f"summary_k_{t}"]
    by_file: dict[str, tuple[dict[str, Any], set[int]]] = {}
    for index in index_list:
        entry, rg = store.locate(index)
        by_file.setdefault(entry["path"], (entry, set()))[1].add(rg)
    found: dict[int, bytes] = {}
    for entry, rgs in by_file.values():
        pf = store.open(entry)
        for row in store._read(entry, "summaries", lambda: pf.read_row_groups(sorted(rgs), columns=cols)).to_pylist():
            found[row["chunk_index"]] = row[f"summary_k_{t}"]
    h, d = m["layout"]["num_kv_heads"], m["layout"]["head_dim"]
    out = [store._tensor(found[i], torch.float32, (h, d), f"chunk {i}, layer {layer}, summary") for i in index_list]
    return index_list, torch.stack(out) if out else torch.empty(0, h, d)
