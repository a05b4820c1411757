"""The on-disk format: object names, Parquet schemas and the manifest (see docs/cache-format.md).

    <root>/<video_id>/manifest.json                       written last: the commit marker
    <root>/<video_id>/parts-<attempt>/prefix.parquet      1 row: prefix token ids + per-layer K/V
    <root>/<video_id>/parts-<attempt>/chunks-00000.parquet  1 row per chunk, 1 row group per few chunks
    <root>/<video_id>/parts-<attempt>/state.parquet       1 row (and row group) per layer: carried state
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1  # bump on any incompatible change; readers refuse versions they do not know
MANIFEST = "manifest.json"
PARTS_PREFIX = "parts-"
STORAGES = ("native", "int8")


def layer_tag(layer: int) -> str:
    return f"{layer:03d}"


def kv_columns(layer: int, int8: bool) -> list[str]:
    """Chunk-table columns of one layer (a projection on these reads only that layer)."""
    t = layer_tag(layer)
    cols = [f"k_{t}", f"v_{t}"]
    if int8:
        cols += [f"k_scale_{t}", f"v_scale_{t}"]
    return cols + [f"summary_k_{t}", f"crc_{t}"]


CHUNK_META = ["chunk_index", "frame_start", "frame_end", "source_frames", "timestamps", "num_tokens",
              "position_ids", "meta_crc"]


def chunk_schema(num_layers: int, int8: bool) -> pa.Schema:
    fields = [
        pa.field("chunk_index", pa.int64(), nullable=False),
        pa.field("frame_start", pa.int64(), nullable=False),
        pa.field("frame_end", pa.int64(), nullable=False),
        pa.field("source_frames", pa.list_(pa.int64()), nullable=False),
        pa.field("timestamps", pa.list_(pa.float64()), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
        pa.field("position_ids", pa.binary(), nullable=False),  # int64 (3, n)
        pa.field("meta_crc", pa.int64(), nullable=False),  # CRC-32 of the fields above
    ]
    for layer in range(num_layers):
        t = layer_tag(layer)
        fields += [pa.field(f"k_{t}", pa.binary(), nullable=False),  # (Hkv, n, D) cache dtype or int8
                   pa.field(f"v_{t}", pa.binary(), nullable=False)]
        if int8:
            fields += [pa.field(f"k_scale_{t}", pa.binary(), nullable=False),  # float32 (Hkv, 1, D)
                       pa.field(f"v_scale_{t}", pa.binary(), nullable=False)]  # float32 (Hkv, n, 1)
        fields += [pa.field(f"summary_k_{t}", pa.binary(), nullable=False),  # float32 (Hkv, D) mean key
                   pa.field(f"crc_{t}", pa.int64(), nullable=False)]  # CRC-32 of k, v, [scales,] summary
    return pa.schema(fields)


def prefix_schema(num_layers: int) -> pa.Schema:
    fields = [pa.field("prefix_ids", pa.binary(), nullable=False), pa.field("ids_crc", pa.int64(), nullable=False)]
    for layer in range(num_layers):
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


def parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    """Tensor bytes do not compress; statistics on blobs would copy them into the footer; page CRCs are on."""
    return pq.ParquetWriter(sink, schema, compression="none", use_dictionary=False,
                            write_statistics=["chunk_index", "layer"], write_page_checksum=True,
                            store_schema=False)
