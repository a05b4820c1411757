"""The on-disk format: object names, Parquet schemas, the manifest and its checks (see docs/cache-format.md).

Both the writer and the reader use this module (and never each other): schemas, the cell CRCs, parsing and
version-checking a manifest. It imports no tensor library, so listing and checking manifests (the catalog, a
command's "already committed" check) stay free of torch; the mapping between a `VideoKVCache` and its manifest
keys is in `convert`.

    <root>/<video_id>/manifest.json                       written last: the commit marker
    <root>/<video_id>/parts-<attempt>/prefix.parquet      1 row: prefix token ids + per-layer K/V
    <root>/<video_id>/parts-<attempt>/chunks-00000.parquet  1 row per chunk, 1 row group per few chunks
    <root>/<video_id>/parts-<attempt>/state.parquet       1 row (and row group) per attention layer: carried state
    <root>/<video_id>/parts-<attempt>/recurrent.parquet   hybrid models only: 2 rows per linear-attention layer,
                                                          its exact conv + recurrent state after the prefix / video

Hybrid models (manifest layout.layer_types with "linear_attention" layers): K/V columns, prefix K/V and carried
state exist for the attention layers only; the linear layers' states are in recurrent.parquet.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from statekv.store.errors import CacheCorruptError, CacheVersionError

FORMAT = "statekv-cache"
FORMAT_VERSION = 2  # bump on any incompatible change; readers refuse versions they do not know
MIN_STATEKV_FOR_VERSION = {2: "0.2"}  # the first statekv release that writes each format version
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is small (a 10 h video's is ~2 MB); a larger object is not one
PARTS_PREFIX = "parts-"
STORAGES = ("native", "int8")
LAYER_TYPES = ("full_attention", "linear_attention")
# shapes a manifest may declare: bounds checked before anything is allocated from them (a num_layers of 10^9
# would otherwise allocate per-layer lists until memory runs out)
MAX_LAYERS, MAX_KV_HEADS, MAX_HEAD_DIM, MAX_POSITION_ROWS = 1024, 1024, 8192, 16
# Positions a chunk may hold: RoPE positions of any model fit far below this; 10^15 does not (checked on read)
MAX_POSITION = 1 << 40


def crc32(*parts: bytes | None) -> int:
    """CRC-32 of the concatenated parts (None parts are skipped)."""
    value = 0
    for p in parts:
        if p is not None:
            value = zlib.crc32(p, value)
    return value


def layer_tag(layer: int) -> str:
    return f"{layer:03d}"


def kv_columns(layer: int, int8: bool, kept: bool = False) -> list[str]:
    """Chunk-table columns of one layer (a projection on these reads only that layer)."""
    t = layer_tag(layer)
    cols = [f"k_{t}", f"v_{t}"]
    if int8:
        cols += [f"k_scale_{t}", f"v_scale_{t}"]
    if kept:
        cols.append(f"kept_{t}")
    return cols + [f"summary_k_{t}", f"crc_{t}"]


def is_compressed(manifest: dict[str, Any]) -> bool:
    """Whether the chunk rows store a subset of each chunk's tokens per layer (write-time compression): then they
    have `kept_<layer>` columns and the manifest counts the stored tokens per layer in `chunks.kept_tokens`."""
    return "kept_tokens" in manifest["chunks"]


CHUNK_META = ["chunk_index", "frame_start", "frame_end", "source_frames", "timestamps", "num_tokens",
              "position_ids", "meta_crc"]


def kv_layers(manifest: dict[str, Any]) -> list[int]:
    """The layers with K/V in a manifest (all but its linear-attention layers)."""
    return [i for i, kind in enumerate(layer_types(manifest)) if kind != "linear_attention"]


def layer_types(manifest: dict[str, Any]) -> list[str]:
    """Per layer "full_attention" or "linear_attention" (manifests without the key: all full attention)."""
    lay = manifest["layout"]
    return list(lay.get("layer_types") or ["full_attention"] * lay["num_layers"])


def chunk_schema(layers: list[int], int8: bool, kept: bool = False) -> pa.Schema:
    """Chunk rows with K/V columns for `layers` (the model's attention layers); `kept`: a compressed cache's rows
    (each layer stores m <= n of the chunk's n tokens, `kept_<layer>` says which)."""
    fields = [
        pa.field("chunk_index", pa.int64(), nullable=False),
        pa.field("frame_start", pa.int64(), nullable=False),
        pa.field("frame_end", pa.int64(), nullable=False),
        pa.field("source_frames", pa.list_(pa.int64()), nullable=False),
        pa.field("timestamps", pa.list_(pa.float64()), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
        pa.field("position_ids", pa.binary(), nullable=False),  # int64 (R, n), R = manifest layout.position_rows
        pa.field("meta_crc", pa.int64(), nullable=False),  # CRC-32 of the fields above
    ]
    for layer in layers:
        t = layer_tag(layer)
        fields += [pa.field(f"k_{t}", pa.binary(), nullable=False),  # (Hkv, m, D) cache dtype or int8; m = n
                   pa.field(f"v_{t}", pa.binary(), nullable=False)]  # unless compressed
        if int8:
            fields += [pa.field(f"k_scale_{t}", pa.binary(), nullable=False),  # float32 (Hkv, 1, D)
                       pa.field(f"v_scale_{t}", pa.binary(), nullable=False)]  # float32 (Hkv, m, 1)
        if kept:  # int64 (m,) ascending indices among the chunk's n tokens of the K/V stored
            fields.append(pa.field(f"kept_{t}", pa.binary(), nullable=False))
        fields += [pa.field(f"summary_k_{t}", pa.binary(), nullable=False),  # float32 (Hkv, D) mean key
                   pa.field(f"crc_{t}", pa.int64(), nullable=False)]  # CRC-32 of k, v, [scales,] summary[, kept]
    return pa.schema(fields)


SUMMARY_ROWS_PER_GROUP = 256  # chunks per row group of the summaries file: one layer's keys of 256 chunks per read


def summary_schema(layers: list[int], pre_rope: bool = False) -> pa.Schema:
    """The retrieval index: one row per chunk, per layer its float32 (Hkv, D) mean key and that cell's CRC-32;
    `pre_rope`: also the mean of its keys before the rotary embedding (ReKV's block key, `TopK(query="question")`;
    the engine computes it, the store only keeps it) and that cell's CRC-32. Caches written before have none.

    The same summary keys are in the chunk rows (covered by their CRC); this side file holds them contiguously, so
    scoring every chunk of a long video reads one column chunk per 256 chunks instead of one per chunk."""
    fields = [pa.field("chunk_index", pa.int64(), nullable=False)]
    for layer in layers:  # the layers with K/V (not a hybrid model's linear-attention layers)
        t = layer_tag(layer)
        fields += [pa.field(f"summary_k_{t}", pa.binary(), nullable=False),
                   pa.field(f"summary_crc_{t}", pa.int64(), nullable=False)]
        if pre_rope:
            fields += [pa.field(pre_rope_column(layer), pa.binary(), nullable=False),
                       pa.field(pre_rope_crc_column(layer), pa.int64(), nullable=False)]
    return pa.schema(fields)


def pre_rope_column(layer: int) -> str:
    """The summaries-file column of a layer's pre-RoPE mean keys."""
    return f"summary_pre_k_{layer_tag(layer)}"


def pre_rope_crc_column(layer: int) -> str:
    """Its cell CRC (a `summary_crc_` column: recorded in the footer like the others)."""
    return f"summary_crc_pre_{layer_tag(layer)}"


def prefix_schema(layers: list[int]) -> pa.Schema:
    fields = [pa.field("prefix_ids", pa.binary(), nullable=False), pa.field("ids_crc", pa.int64(), nullable=False)]
    for layer in layers:
        t = layer_tag(layer)
        fields += [pa.field(f"k_{t}", pa.binary(), nullable=False), pa.field(f"v_{t}", pa.binary(), nullable=False),
                   pa.field(f"crc_{t}", pa.int64(), nullable=False)]
    return pa.schema(fields)


STATE_SCHEMA = pa.schema([
    pa.field("layer", pa.int64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),  # S carried tokens
    pa.field("keys", pa.binary(), nullable=False),  # (Hkv, S, D) cache dtype, or int8 with storage "int8"
    pa.field("values", pa.binary(), nullable=False),
    pa.field("token_index", pa.binary(), nullable=False),  # int64 (Hkv, S)
    pa.field("scores", pa.binary(), nullable=True),  # float32 (Hkv, S) or null
    pa.field("keys_scale", pa.binary(), nullable=True),  # int8 storage: float32 (Hkv, 1, D); else null
    pa.field("values_scale", pa.binary(), nullable=True),  # int8 storage: float32 (Hkv, S, 1); else null
    pa.field("crc", pa.int64(), nullable=False),
])


RECURRENT_AFTER = ("prefix", "video")  # a linear layer's state after the prefix / after the last chunk
RECURRENT_SCHEMA = pa.schema([
    pa.field("layer", pa.int64(), nullable=False),
    pa.field("after", pa.string(), nullable=False),  # one of RECURRENT_AFTER
    pa.field("conv", pa.binary(), nullable=False),  # (C, K) conv_dtype
    pa.field("conv_shape", pa.list_(pa.int64()), nullable=False),
    pa.field("conv_dtype", pa.string(), nullable=False),
    pa.field("recurrent", pa.binary(), nullable=False),  # (Hv, Dk, Dv) recurrent_dtype
    pa.field("recurrent_shape", pa.list_(pa.int64()), nullable=False),
    pa.field("recurrent_dtype", pa.string(), nullable=False),
    pa.field("crc", pa.int64(), nullable=False),  # CRC-32 of layer/after/shapes/dtypes and both tensors
])


def recurrent_crc(row: dict[str, Any]) -> int:
    head = json.dumps([row["layer"], row["after"], list(row["conv_shape"]), row["conv_dtype"],
                       list(row["recurrent_shape"]), row["recurrent_dtype"]]).encode()
    return crc32(head, row["conv"], row["recurrent"])


def parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    """Tensor bytes do not compress; statistics on blobs would copy them into the footer; page CRCs are on."""
    return pq.ParquetWriter(sink, schema, compression="none", use_dictionary=False,
                            write_statistics=["chunk_index", "layer"], write_page_checksum=True,
                            store_schema=False)


# --- cell checksums bound to the manifest ------------------------------------------------------------------------
# Every cell CRC a file holds (meta_crc, crc_NNN, summary_crc_NNN, ids_crc, crc) is also written, per row, into
# that file's Parquet footer (key-value metadata CELLS_KEY), and the manifest records the SHA-256 of the footer
# (`files[].footer_sha256`). A lazy reader reads the footer anyway: it checks its digest once, then checks each
# cell CRC it reads against the footer's, so a part swapped in from another cache (same size, valid CRCs of its
# own) is refused without reading the chunks nobody chose. Files written before this have no `footer_sha256`.

CELLS_KEY = b"statekv.cells"


def is_cell_crc(column: str) -> bool:
    """Whether a column holds a cell checksum (recorded in the footer)."""
    return column in ("crc", "meta_crc", "ids_crc") or column.startswith(("crc_", "summary_crc_"))


def cells_metadata(columns: list[str], rows: list[list[int]]) -> dict[bytes, bytes]:
    """The footer key-value metadata recording the cell CRCs `rows[i][j]` of row i, column `columns[j]`."""
    return {CELLS_KEY: json.dumps({"columns": columns, "rows": rows}, separators=(",", ":")).encode()}


def parse_cells(metadata: dict[bytes, bytes] | None) -> dict[str, list[int]] | None:
    """{column: [cell CRC per row]} from a footer's key-value metadata; None if it records none or is malformed."""
    raw = (metadata or {}).get(CELLS_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        columns, rows = doc["columns"], doc["rows"]
        return {c: [int(r[j]) for r in rows] for j, c in enumerate(columns)}
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def meta_crc(row: dict[str, Any]) -> int:
    """CRC-32 of a chunk row's non-tensor fields (index, frames, times, token count, positions)."""
    head = json.dumps([row["chunk_index"], row["frame_start"], row["frame_end"], list(row["source_frames"]),
                       [float(t) for t in row["timestamps"]], row["num_tokens"]]).encode()
    return crc32(head, row["position_ids"])


def parse_manifest(data: bytes, video_id: str) -> dict[str, Any]:
    """A manifest's JSON, checked to be a statekv cache manifest of the version this statekv reads.

    Version-1 caches (statekv 0.1: Qwen grids and 3 position rows in the generic manifest) are refused with a
    "re-index" message: they hold no prefill config and no family cursor, so they cannot be answered or resumed
    faithfully by a family-agnostic engine.
    """
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheCorruptError(video_id, MANIFEST, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptError(video_id, MANIFEST, "not a statekv cache manifest")
    check_format_version(manifest, video_id)
    return manifest


def check_format_version(manifest: dict[str, Any], video_id: str) -> None:
    """CacheVersionError unless the manifest is of the version this statekv reads (an older one: re-index)."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version < FORMAT_VERSION:
            reason = (f"format version {version} (written by statekv {manifest.get('statekv_version', '< 0.2')}) "
                      f"is no longer read; re-index the video with statekv >= "
                      f"{MIN_STATEKV_FOR_VERSION[FORMAT_VERSION]}")
        else:
            reason = f"format version {version!r}; this statekv reads version {FORMAT_VERSION}"
        raise CacheVersionError(video_id, reason)
