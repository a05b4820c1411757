"""The manifest's schema, checksum and consistency rules: one declarative place, checked once on every read.

A manifest is untrusted input (a bucket may be shared between teams, a digit may flip): `validate` checks

1. its checksum (`checksum`: SHA-256 of its canonical JSON without that key), so an altered digit is caught;
2. every field in `SCHEMA` (type, presence, allowed values), so a missing key or a wrong type names the field;
3. the rules in `RULES` (paths inside the cache folder, chunk files contiguous and summing to the chunk count,
   totals and layout agreeing), so even a manifest whose checksum was recomputed cannot point the reader at
   another video's files or at fewer chunks than it has.

Every violation raises `CacheCorruptError` naming the field. To change the format, edit `SCHEMA` (a field ->
`Field` table; `a.b` is a nested key, `a[]` every element of list `a`) and `RULES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from statekv.store import format as F
from statekv.store.errors import CacheCorruptError, CacheNotFoundError, CacheUnavailableError
from statekv.store.fs import (TRANSPORT_ERRORS, NotRegularFileError, ObjectTooLargeError, StorageOptionsLike,
                              is_transport_error, join, object_version, read_versioned, resolve)

CHECKSUM_KEY = "checksum"


@dataclass(frozen=True)
class Field:
    """One manifest field: its JSON types (None: null allowed), whether it must be present, allowed values."""

    types: tuple[type | None, ...]
    required: bool = True
    choices: tuple[Any, ...] | None = None
    min: float | None = None  # for numbers: smallest allowed value
    max: float | None = None  # for numbers: largest allowed value (bounds shapes before anything is allocated)
    above: float | None = None  # for numbers: the value must be greater (sampled_fps divides)
    pattern: str | None = None  # for strings: a regular expression the whole value matches


_INT, _NUM, _STR = (int,), (int, float), (str,)


def _count(required: bool = True) -> Field:
    return Field(_INT, required, min=0)


SCHEMA: dict[str, Field] = {
    "format": Field(_STR, choices=("statekv-cache",)),
    "format_version": Field(_INT, choices=(F.FORMAT_VERSION,)),
    CHECKSUM_KEY: Field(_STR),
    "video_id": Field(_STR),
    "source": Field((dict, None), required=False),
    "model": Field((dict,)),
    "model.name_or_path": Field(_STR),
    "model.model_type": Field(_STR),
    "model.fingerprint": Field(_STR),
    "model.num_layers": Field(_INT, min=1, max=F.MAX_LAYERS),
    "model.num_kv_heads": Field(_INT, min=1, max=F.MAX_KV_HEADS),
    "model.head_dim": Field(_INT, min=1, max=F.MAX_HEAD_DIM),
    "model.linear_layers": Field((list,), required=False),  # hybrid models: layers with a recurrent state, no K/V
    "model.linear_layers[]": Field(_INT, min=0, max=F.MAX_LAYERS - 1),
    # the family adapter's token layout the cache was built on (absent: 1) and the transformers it was built with
    "model.layout_version": Field(_INT, required=False, min=1),
    "model.transformers_version": Field(_STR, required=False),
    "dtype": Field(_STR, choices=("float32", "float16", "bfloat16")),
    "storage": Field(_STR, choices=F.STORAGES),
    "byteorder": Field(_STR, choices=("little",)),
    "layout": Field((dict,)),
    "layout.num_layers": Field(_INT, min=1, max=F.MAX_LAYERS),
    "layout.num_kv_heads": Field(_INT, min=1, max=F.MAX_KV_HEADS),
    "layout.head_dim": Field(_INT, min=1, max=F.MAX_HEAD_DIM),
    "layout.position_rows": Field((int, None), min=1, max=F.MAX_POSITION_ROWS),  # null: no chunk rows (RULES)
    "layout.layer_types": Field((list, None), required=False),
    "layout.layer_types[]": Field(_STR, choices=F.LAYER_TYPES),
    "prefill": Field((dict,)),
    "prefill.policy": Field((dict,)),
    "prefill.policy.name": Field(_STR),
    "prefill.chunks_per_step": Field(_INT, min=1),
    "prefill.layout": Field(_STR, choices=("prefix-first", "video-first")),
    "prefill.sampling": Field((dict,)),
    "prefill.adapter": Field((dict,)),
    "prefill.attention_backend": Field(_STR),
    "prefill.answer_from": Field(_STR, required=False, choices=("chunks", "state")),
    "prefill.compression": Field((dict, None), required=False),  # write-time compression settings (or none)
    "prefill.compression.name": Field(_STR, choices=("guided",)),
    "video": Field((dict,)),
    "video.source": Field(_STR),
    "video.video_fps": Field(_NUM),
    "video.total_frames": _count(),
    "video.sampled_fps": Field(_NUM, above=0),  # frame times and evidence divide by it
    "video.frame_size": Field((list,)),
    "video.frame_size[]": _count(),
    "video.frame_indices": Field((list,)),
    "video.frame_indices[]": _count(),
    "video.timestamps": Field((list,)),
    "video.timestamps[]": Field(_NUM),
    "video.requested_fps": Field(_NUM, required=False),
    "video.duration": Field(_NUM, required=False),
    "video.segments": Field((list,), required=False),
    "video.segments[]": Field((dict,)),
    "chunks": Field((dict,)),
    "chunks.count": _count(),
    "chunks.tokens": Field((list,)),
    "chunks.tokens[]": _count(),
    "chunks.kept_tokens": Field((list,), required=False),  # compressed caches: stored tokens per K/V layer
    "chunks.kept_tokens[]": _count(),
    "family": Field((dict,)),
    "family.model_type": Field(_STR),
    "family.cursor": Field((dict,)),
    "scenes": Field((list,), required=False),
    "scenes[]": Field((list,)),
    "scenes[][]": _count(),
    "prefix_len": _count(),
    "has_state": Field((bool,)),
    "totals": Field((dict,)),
    "totals.chunks": _count(),
    "totals.tokens": _count(),
    "totals.bytes": _count(),
    "files": Field((list,)),
    "files[]": Field((dict,)),
    "files[].path": Field(_STR),
    "files[].kind": Field(_STR, choices=("prefix", "chunks", "summaries", "state", "recurrent")),
    "files[].bytes": _count(),
    "files[].crc32": _count(),
    "files[].first_chunk": _count(required=False),  # required on chunk and summaries files (RULES)
    "files[].num_chunks": _count(required=False),
    "files[].chunks_per_row_group": Field(_INT, required=False, min=1),
    # SHA-256 of the file's Parquet footer, which records every cell CRC of the file (absent in caches written
    # before issue 18)
    "files[].footer_sha256": Field(_STR, required=False, pattern=r"[0-9a-f]{64}"),
    "appends": Field((list,), required=False),  # what each prefill/append consumed (resume idempotence)
    "appends[]": Field((dict,)),
    "appends[].chunks": Field((list,)),
    "appends[].chunks[]": _count(),
    "appends[].footage": Field((dict, None)),
    "created": Field(_STR),
    "statekv_version": Field(_STR, required=False),
}

# One path component of a data file: no leading dot (so never "." or ".."), no separators, no scheme.
_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes the checksum covers: sorted keys, no whitespace, the checksum key left out."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def checksum(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(manifest)).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with its checksum set (the writer's last step before the commit)."""
    return {**manifest, CHECKSUM_KEY: checksum(manifest)}


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def parse(data: bytes, video_id: str) -> dict[str, Any]:
    """Bytes of a manifest.json -> the validated manifest (CacheCorruptError naming the field otherwise)."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheCorruptError(video_id, F.MANIFEST, f"not valid JSON ({e})") from None
    except RecursionError:  # json's parser recurses per nesting level; a manifest nests a few levels
        raise CacheCorruptError(video_id, F.MANIFEST, "not a statekv cache manifest (JSON nested too deeply)") from None
    validate(manifest, video_id)
    return manifest


def validate(manifest: Any, video_id: str) -> None:
    """Checksum, schema, then consistency rules; the first violation raises CacheCorruptError."""
    if not isinstance(manifest, dict) or manifest.get("format") != "statekv-cache":
        raise CacheCorruptError(video_id, F.MANIFEST, "not a statekv cache manifest")
    F.check_format_version(manifest, video_id)  # an older version: CacheVersionError saying to re-index
    want = manifest.get(CHECKSUM_KEY)
    if not isinstance(want, str):
        raise CacheCorruptError(video_id, f"{F.MANIFEST} field {CHECKSUM_KEY!r}",
                                "missing: the manifest cannot be verified (written by an older statekv? re-prefill)")
    if checksum(manifest) != want:
        raise CacheCorruptError(video_id, F.MANIFEST, "checksum mismatch (the manifest was altered)")
    for name, spec in SCHEMA.items():
        for where, value in _values(manifest, name):
            _check_field(video_id, where, value, spec)
    for rule in RULES:
        problem = rule(manifest)
        if problem is not None:
            where, reason = problem
            raise CacheCorruptError(video_id, f"{F.MANIFEST} field {where!r}", reason)


def _values(doc: Any, name: str) -> list[tuple[str, Any]]:
    """[(concrete path, value or _MISSING)] for a schema name; parents that are absent yield nothing."""
    found: list[tuple[str, Any]] = [("", doc)]
    for step in name.split("."):
        each = step.endswith("[]")
        key = step.removesuffix("[]")
        nxt: list[tuple[str, Any]] = []
        for where, value in found:
            if not isinstance(value, dict):
                continue  # the parent's own check reports it
            child = value.get(key, _MISSING)
            path = f"{where}.{key}" if where else key
            if not each:
                nxt.append((path, child))
            elif isinstance(child, list):
                nxt.extend((f"{path}[{i}]", item) for i, item in enumerate(child))
        found = nxt
    return found


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _check_field(video_id: str, where: str, value: Any, spec: Field) -> None:
    part = f"{F.MANIFEST} field {where!r}"
    if value is _MISSING:
        if spec.required:
            raise CacheCorruptError(video_id, part, "missing")
        return
    ok = any((value is None) if t is None else
             (isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))) for t in spec.types)
    if not ok:
        names = " or ".join("null" if t is None else _JSON_NAMES[t] for t in spec.types)
        raise CacheCorruptError(video_id, part, f"{type(value).__name__} {value!r:.60} where {names} is required")
    if spec.choices is not None and value not in spec.choices:
        raise CacheCorruptError(video_id, part, f"{value!r:.60} is not one of {', '.join(map(repr, spec.choices))}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON parsers accept NaN and Infinity
        raise CacheCorruptError(video_id, part, f"{value} is not a finite number")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and spec.min is not None and value < spec.min:
        raise CacheCorruptError(video_id, part, f"{value} is below {spec.min}")
    if number and spec.max is not None and value > spec.max:
        raise CacheCorruptError(video_id, part, f"{value} is above {spec.max}")
    if number and spec.above is not None and not value > spec.above:
        raise CacheCorruptError(video_id, part, f"{value} is not above {spec.above}")
    if spec.pattern is not None and isinstance(value, str) and not re.fullmatch(spec.pattern, value):
        raise CacheCorruptError(video_id, part, f"{value!r:.60} is not of the form {spec.pattern}")


_JSON_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
               dict: "an object"}


# --- consistency rules: each returns None or (field, reason) ---------------------------------------------------


def _rule_paths(m: dict[str, Any]) -> tuple[str, str] | None:
    """Every data file lies in an attempt folder of this cache: `parts-<id>/<name>`, nothing else."""
    for i, f in enumerate(m["files"]):
        parts = f["path"].split("/")
        if len(parts) != 2 or not parts[0].startswith(F.PARTS_PREFIX) or \
                not all(_COMPONENT.fullmatch(p) for p in parts):
            return f"files[{i}].path", (f"{f['path']!r:.80} is not a file inside this cache's folder "
                                        f"(expected {F.PARTS_PREFIX}<id>/<name>)")
    return None


def _rule_file_kinds(m: dict[str, Any]) -> tuple[str, str] | None:
    kinds = [f["kind"] for f in m["files"]]
    if kinds.count("prefix") != 1:
        return "files", f"{kinds.count('prefix')} prefix files (exactly 1 required)"
    for kind in ("state", "recurrent"):
        if kinds.count(kind) > 1:
            return "files", f"{kinds.count(kind)} {kind} files (at most 1 allowed)"
    if m["has_state"] != ("state" in kinds):
        return "has_state", f"{m['has_state']} but the files {'do not ' if m['has_state'] else ''}include a state file"
    if len({f["path"] for f in m["files"]}) != len(kinds):
        return "files", "a file is named twice"
    return None


def _rule_chunk_files(m: dict[str, Any]) -> tuple[str, str] | None:
    """Chunk files (and summaries files, when present) cover chunks 0..count-1 in order, without gaps or overlaps;
    a cache that answers from its carried state has no chunk rows."""
    count = m["chunks"]["count"]
    state_only = m["prefill"].get("answer_from") == "state"
    for kind in ("chunks", "summaries"):
        nxt, seen = 0, False
        for i, f in enumerate(m["files"]):
            if f["kind"] != kind:
                continue
            seen = True
            for key in ("first_chunk", "num_chunks", "chunks_per_row_group"):
                if key not in f:
                    return f"files[{i}].{key}", f"missing on a {kind} file"
            if f["first_chunk"] != nxt:
                return f"files[{i}].first_chunk", f"{f['first_chunk']}, but the files before end at chunk {nxt}"
            if f["num_chunks"] < 1:
                return f"files[{i}].num_chunks", f"a {kind} file holds no chunks"
            nxt += f["num_chunks"]
        if (kind == "chunks" or seen) and nxt != (0 if state_only else count):
            return "chunks.count", f"{count}, but the {kind} files hold {nxt} chunks"
    if m["totals"]["chunks"] != count:
        return "totals.chunks", f"{m['totals']['chunks']}, but chunks.count is {count}"
    return None


def _rule_totals(m: dict[str, Any]) -> tuple[str, str] | None:
    size = sum(f["bytes"] for f in m["files"])
    if m["totals"]["bytes"] != size:
        return "totals.bytes", f"{m['totals']['bytes']}, but the files add up to {size}"
    if len(m["chunks"]["tokens"]) != m["chunks"]["count"]:
        return "chunks.tokens", f"{len(m['chunks']['tokens'])} token counts for {m['chunks']['count']} chunks"
    if sum(m["chunks"]["tokens"]) != m["totals"]["tokens"]:
        return "totals.tokens", f"{m['totals']['tokens']}, but the chunks hold {sum(m['chunks']['tokens'])} tokens"
    return None


def _rule_layout(m: dict[str, Any]) -> tuple[str, str] | None:
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if m["layout"][key] != m["model"][key]:
            return f"layout.{key}", f"{m['layout'][key]}, but model.{key} is {m['model'][key]}"
    if m["family"]["model_type"] != m["model"]["model_type"]:
        return "family.model_type", f"{m['family']['model_type']!r}, but model.model_type is {m['model']['model_type']!r}"
    return None


def _rule_layer_types(m: dict[str, Any]) -> tuple[str, str] | None:
    """One layer type per layer, its linear layers those of the model, and a recurrent-state file exactly when
    there are linear layers (a linear first layer would otherwise be read as missing K/V)."""
    lay, n = m["layout"], m["layout"]["num_layers"]
    types = lay.get("layer_types")
    if types is not None and len(types) != n:
        return "layout.layer_types", f"{len(types)} layer types for {n} layers"
    linear = [i for i, kind in enumerate(types or []) if kind == "linear_attention"]
    if linear != m["model"].get("linear_layers", []):
        return "layout.layer_types", (f"linear layers {linear[:8]}, but model.linear_layers is "
                                      f"{m['model'].get('linear_layers', [])[:8]}")
    if len(linear) == n:
        return "layout.layer_types", "no layer has keys and values"
    has_recurrent = any(f["kind"] == "recurrent" for f in m["files"])
    if bool(linear) != has_recurrent:
        return "files", (f"{'no' if linear else 'a'} recurrent-state file for "
                         f"{len(linear) or 'no'} linear-attention layers")
    return None


def _rule_position_rows(m: dict[str, Any]) -> tuple[str, str] | None:
    """Chunk rows hold position_rows x n positions: a cache with chunk rows must say how many rows."""
    if m["layout"]["position_rows"] is None and any(f["kind"] == "chunks" for f in m["files"]):
        return "layout.position_rows", "null, but the cache has chunk rows"
    return None


def _rule_video(m: dict[str, Any]) -> tuple[str, str] | None:
    v = m["video"]
    if len(v["frame_indices"]) != len(v["timestamps"]):
        return "video.timestamps", f"{len(v['timestamps'])} timestamps for {len(v['frame_indices'])} frame indices"
    if len(v["frame_size"]) != 2:
        return "video.frame_size", f"{v['frame_size']} is not [height, width]"
    return None


def _rule_ranges(m: dict[str, Any]) -> tuple[str, str] | None:
    count = m["chunks"]["count"]
    for key in ("appends", "scenes"):
        for i, item in enumerate(m.get(key, [])):
            c = item["chunks"] if key == "appends" else item
            if len(c) != 2 or not 0 <= c[0] <= c[1] <= count:
                return f"{key}[{i}]", f"{c} is not a chunk range within [0, {count}]"
    return None


def _rule_kept(m: dict[str, Any]) -> tuple[str, str] | None:
    """A compressed cache (prefill.compression set) counts its stored tokens per K/V layer, each at most the
    video's tokens (and at least one per chunk); an uncompressed one does not."""
    compressed = isinstance(m["prefill"].get("compression"), dict)
    if compressed != F.is_compressed(m):
        return "chunks.kept_tokens", ("missing: prefill.compression is set" if compressed else
                                      "present, but prefill.compression is not set")
    if not compressed:
        return None
    kept, layers = m["chunks"]["kept_tokens"], F.kv_layers(m)
    if len(kept) != len(layers):
        return "chunks.kept_tokens", f"{len(kept)} counts for {len(layers)} layers with K/V"
    rows = 0 if m["prefill"].get("answer_from") == "state" else m["chunks"]["count"]
    for i, n in enumerate(kept):
        if not rows <= n <= m["totals"]["tokens"]:
            return f"chunks.kept_tokens[{i}]", f"{n} is not within [{rows}, {m['totals']['tokens']}] (chunks, tokens)"
    return None


RULES: list[Callable[[dict[str, Any]], tuple[str, str] | None]] = [
    _rule_paths, _rule_file_kinds, _rule_chunk_files, _rule_totals, _rule_layout, _rule_layer_types,
    _rule_position_rows, _rule_video, _rule_ranges, _rule_kept,
]


# --- reading the committed manifest ------------------------------------------------------------------------


def read_manifest(uri: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                  filesystem: fsspec.AbstractFileSystem | None = None) -> dict[str, Any]:
    """The committed, validated manifest at `uri` (= `<root>/<video_id>`).

    CacheNotFoundError if there is none, CacheCorruptError (naming the field) if it fails its checksum, schema
    or consistency rules, CacheUnavailableError if the store did not deliver it.
    """
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    return read_committed(fs, path, uri)[0]


def manifest_version(uri: str | os.PathLike, *, storage_options: StorageOptionsLike = None,
                     filesystem: fsspec.AbstractFileSystem | None = None) -> str:
    """The committed manifest's version (S3 ETag / MD5 of its bytes) at the cost of one HEAD: compare it with a
    loaded cache's `manifest_version` to detect a re-prefill cheaply. CacheNotFoundError if there is none."""
    uri = os.fspath(uri)
    fs, path = resolve(uri, storage_options, filesystem)
    return _fetch(path, uri, lambda: object_version(fs, join(path, F.MANIFEST),
                                                            limit=F.MANIFEST_MAX_BYTES))


def read_committed(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[dict[str, Any], str]:
    """(validated manifest, its version: see `manifest_version`) of the cache folder `path` on `fs`."""
    data, version = _fetch(path, uri, lambda: read_versioned(fs, join(path, F.MANIFEST),
                                                                     limit=F.MANIFEST_MAX_BYTES))
    return parse(data, path.rsplit("/", 1)[-1]), version


def _fetch(path: str, uri: str, fetch):
    """Run `fetch` on the manifest object: absent -> CacheNotFoundError, not delivered -> CacheUnavailableError."""
    try:
        return fetch()
    except FileNotFoundError:
        raise CacheNotFoundError(uri) from None
    except (NotRegularFileError, ObjectTooLargeError) as e:  # a FIFO, a link, /dev/zero: never read
        raise CacheCorruptError(path.rsplit("/", 1)[-1], F.MANIFEST, str(e)) from None
    except (OSError, *TRANSPORT_ERRORS) as e:
        if isinstance(e, PermissionError) or not is_transport_error(e):
            raise
        raise CacheUnavailableError(path.rsplit("/", 1)[-1], F.MANIFEST, e) from None
