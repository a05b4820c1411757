"""A hostile store (issue 18, points 3, 4, 6, 7): parts that never end or block, parts swapped in from another
cache, manifests that pass their checksum but not reality, consistent-looking lies. Each must be that cache's
`CacheCorruptError` naming the part or field, never a hang, an exhausted memory, a bare TypeError/KeyError, or
an answer from another video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tests.statekv.test_store import fake_cache

from statekv import Engine, Full
from statekv.cache import ChunkKV
from statekv.retrieval import TopK
from statekv.store import CacheCorruptError, load_cache, load_summary_keys, prefill_to_store, save_cache
from statekv.store import format as F
from statekv.store import serde
from statekv.store import manifest as schema
from statekv.store.fs import resolve
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

REPO = Path(__file__).resolve().parents[2]


def _raw(uri: str, options) -> dict:
    fs, path = resolve(uri, options)
    return json.loads(fs.cat_file(f"{path}/manifest.json"))


def _put(uri: str, options, manifest: dict) -> None:
    """Write a tampered manifest, re-checksummed as an adversary or a buggy writer would."""
    fs, path = resolve(uri, options)
    manifest["totals"]["bytes"] = sum(f["bytes"] for f in manifest["files"])
    fs.pipe_file(f"{path}/manifest.json", schema.encode(schema.seal(manifest)))


def _entry(m: dict, kind: str) -> dict:
    return next(f for f in m["files"] if f["kind"] == kind)


def _answer_reads(uri: str, options=None) -> None:
    """What answering reads of a stored cache: a lazy load, its chunks, the retrieval index (never the state)."""
    cache = load_cache(uri, storage_options=options)
    list(cache.chunks)
    for layer in cache.model.attention_layers:
        cache.chunks.summary_keys(layer)


# --- 3. unbounded reads (local stores) ---------------------------------------------------------------------------


def _in_child(uri: str, timeout: float = 60.0) -> dict:
    """Use the cache in a child process with capped memory and time: a read that never ends or blocks shows as a
    timeout or a MemoryError there, not as a hung or swapping test run."""
    code = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from statekv.store import load_cache
        from tests.statekv.test_store_hostile import _answer_reads
        try:
            load_cache({uri!r}, lazy=False)  # a full load reads every part whole
            _answer_reads({uri!r})
            out = {{"error": None}}
        except BaseException as e:
            out = {{"error": type(e).__name__, "message": str(e)[:500]}}
        print(json.dumps(out))
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": f"exit {done.returncode}", "message": done.stderr[-500:]}


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("variant", ["fifo", "dev_zero", "huge_num_layers"])
def test_no_read_blocks_or_runs_past_the_declared_size(tmp_path, variant):
    """Regression (issue 18.3): a data file that is a FIFO blocked the reader forever; a symlink to /dev/zero (with
    `bytes: 0` in the manifest) and a manifest with `num_layers` 10^9 and no `layer_types` read or allocated until
    memory ran out."""
    uri = str(tmp_path / "vid")
    m = save_cache(fake_cache(3), uri)
    if variant == "huge_num_layers":
        for key in ("model", "layout"):
            m[key]["num_layers"] = 10**9
        m["layout"].pop("layer_types")
        field = "num_layers"
    else:
        entry = _entry(m, "chunks")
        (_fifo if variant == "fifo" else _dev_zero)(tmp_path / "vid" / entry["path"])
        entry["bytes"] = 0  # what a stat of either says
        field = entry["path"]
    _put(uri, None, m)
    out = _in_child(uri)
    assert out["error"] == "CacheCorruptError" and field in out["message"], out


@pytest.mark.parametrize("variant", ["parts_folder", "file"])
def test_a_symlink_out_of_the_cache_folder_is_never_followed(tmp_path, variant):
    """Regression (issue 18.3/18.4): a symlinked parts folder answered from another video's files."""
    a = save_cache(fake_cache(3, seed=1), str(tmp_path / "a"))
    b = save_cache(fake_cache(3, seed=2), str(tmp_path / "b"))
    if variant == "parts_folder":  # their parts folder holds files of the same names
        mine, theirs = (tmp_path / x / m["files"][0]["path"].split("/")[0] for x, m in (("a", a), ("b", b)))
        for f in mine.iterdir():
            f.unlink()
        mine.rmdir()
    else:
        mine, theirs = (tmp_path / x / _entry(m, "chunks")["path"] for x, m in (("a", a), ("b", b)))
        mine.unlink()
    mine.symlink_to(theirs)
    for f in a["files"]:  # make the sizes agree, as for same-size caches
        f["bytes"] = os.stat(tmp_path / "a" / f["path"]).st_size
    _put(str(tmp_path / "a"), None, a)
    with pytest.raises(CacheCorruptError, match=r"'a'.*symbolic link"):
        _answer_reads(str(tmp_path / "a"))


# --- 4. retrieval reads only bytes bound to this cache ------------------------------------------------------------

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=Full(), device="cpu", dtype=torch.float32,
                                  sampling=SMALL)


@pytest.mark.parametrize("swapped", [("chunks",), ("summaries",), ("chunks", "summaries")])
def test_retrieval_refuses_parts_swapped_in_from_another_cache(engine, store_root, swapped):
    """Regression (issue 18.4): with chunks-00000 and summaries-00000 replaced by another cache's of the same size,
    plain ask refused (whole-file CRC) but top-k retrieval answered with exactly the other video's tokens: lazy
    reads checked each cell against its own CRC, and nothing bound those CRCs to this cache."""
    root, options = store_root
    for name, seed in (("a", 1), ("b", 2)):
        prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=seed), f"{root}/{name}", fps=2.0,
                         storage_options=options)
    fs, path = resolve(root, options)
    a, b = _raw(f"{root}/a", options), _raw(f"{root}/b", options)
    for kind in swapped:
        mine, theirs = _entry(a, kind), _entry(b, kind)
        fs.pipe_file(f"{path}/a/{mine['path']}", fs.cat_file(f"{path}/b/{theirs['path']}"))
        mine["bytes"] = theirs["bytes"]  # same-size parts: the size check passes
    _put(f"{root}/a", options, a)
    cache = load_cache(f"{root}/a", storage_options=options)
    with pytest.raises(CacheCorruptError, match=r"'a'.*(chunks|summaries)-00000"):
        engine.ask(cache, "What happens?", max_new_tokens=1, retrieval=TopK(k=2))


# --- 6. manifests that pass their checksum but not reality -------------------------------------------------------


def _position_rows_null(m):
    m["layout"]["position_rows"] = None


def _int8_on_native(m):
    m["storage"] = "int8"


def _compression_without_kept(m):
    m["prefill"]["compression"] = {"name": "guided", "prompt": "what matters", "keep": 0.5}
    m["chunks"]["kept_tokens"] = [m["totals"]["tokens"]] * m["layout"]["num_layers"]


def _short_layer_types(m):
    m["layout"]["layer_types"] = ["full_attention"]


def _linear_first_layer_types(m):
    m["layout"]["layer_types"] = ["linear_attention"] + ["full_attention"] * (m["layout"]["num_layers"] - 1)


def _one_layer(m):
    for key in ("model", "layout"):
        m[key]["num_layers"] = 1
    m["layout"]["layer_types"] = ["full_attention"]


def _sampled_fps_zero(m):
    m["video"]["sampled_fps"] = 0


@pytest.mark.parametrize("change, field", [
    (_position_rows_null, "layout.position_rows"), (_int8_on_native, "storage"),
    (_compression_without_kept, "prefill.compression"), (_short_layer_types, "layout.layer_types"),
    (_linear_first_layer_types, "layout.layer_types"), (_one_layer, "layout.num_layers"),
    (_sampled_fps_zero, "video.sampled_fps"),
])
def test_a_manifest_that_lies_about_the_data_is_cache_corrupt_naming_the_field(store_root, change, field):
    """Regression (issue 18.6): these manifests passed their checksum and then failed as TypeError (position_rows
    null), KeyError (int8 storage on a native cache; compression without kept_NNN columns), AttributeError (short
    or linear-first layer_types), IndexError (num_layers 1) or ZeroDivisionError (sampled_fps 0): a 500
    "internal" from the service instead of `cache_corrupt`."""
    root, options = store_root
    uri = f"{root}/vid"
    m = save_cache(fake_cache(3), uri, storage_options=options)
    change(m)
    _put(uri, options, m)
    with pytest.raises(CacheCorruptError, match=rf"'vid'.*field '{field}'"):
        _answer_reads(uri, options)


# --- 7. consistent-looking lies, caught where cheap ----------------------------------------------------------------


def _with_chunk(cache, index, **changes):
    c = cache.chunks[index]
    fields = dict(index=c.index, frame_range=c.frame_range, source_frames=c.source_frames, timestamps=c.timestamps,
                  position_ids=c.position_ids, keys=c.keys, values=c.values)
    cache.chunks[index] = ChunkKV(**{**fields, **changes})
    return cache


def _inf_key(cache):
    keys = [k.clone() for k in cache.chunks[1].keys]
    keys[0][0, 0, 0] = float("inf")
    return _with_chunk(cache, 1, keys=keys)


def _huge_positions(cache):
    return _with_chunk(cache, 2, position_ids=cache.chunks[2].position_ids + 10**15)


@pytest.mark.parametrize("lie, part, int8", [
    (_inf_key, "chunk 1, layer 0", False), (_inf_key, "chunk 1, layer 0", True),
    ("nan_scale", "chunk 0, layer 0", True),
    (_huge_positions, "chunk 2", False), (_huge_positions, "chunk 2", True),
])
def test_non_finite_keys_and_impossible_positions_are_refused_on_read(store_root, monkeypatch, lie, part, int8):
    """Regression (issue 18.7): NaN int8 scales, inf keys (with their cell CRCs recomputed) and positions of 10^15
    were read and answered from."""
    root, options = store_root
    uri = f"{root}/vid"
    cache = fake_cache(3)
    if lie == "nan_scale":  # a writer gone wrong: the quantiser's scales are NaN (they are CRC'd as written)
        quantize = serde.quantize_values

        def nan_scales(v):
            q, scale = quantize(v)
            return q, torch.full_like(scale, float("nan"))

        monkeypatch.setattr(serde, "quantize_values", nan_scales)
    else:
        cache = lie(cache)
    save_cache(cache, uri, storage_options=options, int8=int8)
    with pytest.raises(CacheCorruptError, match=rf"'vid'.*{part}"):
        list(load_cache(uri, storage_options=options).chunks)


def test_permuted_summary_chunk_indices_are_refused(tmp_path):
    """Regression (issue 18.7): a summaries file whose chunk_index column was permuted (its CRCs cover the keys
    only) filed every chunk's summary key under another chunk: retrieval chose the wrong chunks."""
    uri = str(tmp_path / "vid")
    m = save_cache(fake_cache(4), uri)
    target = tmp_path / "vid" / _entry(m, "summaries")["path"]
    pf = pq.ParquetFile(target)
    table = pf.read()
    schema_ = F.summary_schema([0, 1, 2])
    table = table.set_column(0, "chunk_index", [[1, 0, 3, 2]]).cast(schema_)
    writer = F.parquet_writer(str(target), schema_)
    if pf.metadata.metadata:
        writer.add_key_value_metadata(pf.metadata.metadata)
    writer.write_table(table, row_group_size=F.SUMMARY_ROWS_PER_GROUP)
    writer.close()
    assert os.stat(target).st_size == _entry(m, "summaries")["bytes"]  # the same size: only the order differs
    with pytest.raises(CacheCorruptError, match="'vid'.*summaries-00000.*out of order"):
        load_summary_keys(uri, 0)


@pytest.mark.parametrize("key, value", [("video_start", -1000), ("grid_hw", [0, 0]), ("grid_t", 1)])
def test_a_family_cursor_that_lies_is_refused_before_answering(engine, tmp_path, key, value):
    """Regression (issue 18.7): a Qwen cursor with video_start -1000 or grid_hw [0, 0] (re-checksummed) answered
    from positions the video never had. The cursor is opaque to the store: the adapter checks it, the engine asks."""
    uri = str(tmp_path / "vid")
    prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=3), uri, fps=2.0)
    m = _raw(uri, None)
    m["family"]["cursor"][key] = value
    _put(uri, None, m)
    with pytest.raises(CacheCorruptError, match=rf"'vid'.*family\.cursor.*{key}"):
        engine.ask(load_cache(uri), "What happens?", max_new_tokens=1)


def test_caches_written_before_footer_digests_stay_readable(store_root):
    """Compatibility: a manifest without `footer_sha256` (statekv before issue 18) is read as before: cell, page
    and (full loads) whole-file CRCs, no binding of lazy reads."""
    root, options = store_root
    uri = f"{root}/old"
    m = save_cache(fake_cache(4), uri, storage_options=options, int8=True)
    for f in m["files"]:
        del f["footer_sha256"]
    _put(uri, options, m)
    _answer_reads(uri, options)
    full = load_cache(uri, storage_options=options, lazy=False)
    assert len(full.chunks) == 4 and full.state is not None


def test_a_flipped_prefill_layout_is_refused_before_answering(engine, tmp_path):
    """Regression (issue 18.7): a re-checksummed manifest whose `prefill.layout` says video-first for a prefix-first
    cache answered with the chat text moved to the wrong place. The stored prefix tokens give it away."""
    uri = str(tmp_path / "vid")
    prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=3), uri, fps=2.0)
    m = _raw(uri, None)
    assert m["prefill"]["layout"] == "prefix-first"
    m["prefill"]["layout"] = "video-first"
    _put(uri, None, m)
    with pytest.raises(CacheCorruptError, match=r"'vid'.*prefill\.layout.*'video-first'"):
        engine.ask(load_cache(uri), "What happens?", max_new_tokens=1)
