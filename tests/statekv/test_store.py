"""Cache store: round trips (local dir and loopback S3), partial reads, crashes, corruption, append, answers."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch

from statekv import Engine, Full, StateKV
from statekv.cache import ChunkKV, ModelInfo, PrefillConfig, VideoInfo, VideoKVCache
from statekv.errors import ModelMismatchError, StateKVError
from statekv.policies import LayerState
from statekv.store import (CacheCorruptError, CacheNotFoundError, CacheWriter, list_caches, load_cache,
                           load_summary_keys, prefill_to_store, read_manifest, save_cache, serde)
from statekv.store.fs import resolve
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
FPS = 2.0
QUESTION = "What happens after the dog enters?"


# --- helpers ---------------------------------------------------------------------------------------------------


def fake_cache(num_chunks: int = 8, *, layers: int = 3, heads: int = 2, tokens: int = 6, dim: int = 16,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> VideoKVCache:
    """A cache of random tensors (no model): any size, fast."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    p = 5
    frames = list(range(2 * num_chunks))
    video = VideoInfo("<frames>", 2.0, len(frames), 2.0, (56, 84), frames, [i / 2 for i in frames])
    chunks = [ChunkKV(i, (2 * i, 2 * i + 2), frames[2 * i:2 * i + 2], video.timestamps[2 * i:2 * i + 2],
                      torch.arange(3 * tokens).view(3, tokens) + p + i * tokens,
                      [rand(heads, tokens, dim) for _ in range(layers)], [rand(heads, tokens, dim) for _ in range(layers)])
              for i in range(num_chunks)]
    state = [LayerState(rand(heads, 4, dim), rand(heads, 4, dim), torch.arange(4).expand(heads, -1).clone(),
                        torch.rand(heads, 4, generator=g)) for _ in range(layers)]
    config = PrefillConfig(policy={"name": "full"}, chunks_per_step=1, layout="prefix-first", sampling={"fps": 2.0},
                           adapter={}, attention_backend="auto")
    return VideoKVCache(ModelInfo("fake", "qwen2_vl", "f00d", layers, heads, dim), config, dtype, video,
                        torch.arange(p), [rand(heads, p, dim) for _ in range(layers)],
                        [rand(heads, p, dim) for _ in range(layers)], chunks, state, num_chunks,
                        [tokens] * num_chunks, {"next": p + num_chunks * tokens})


def cast(cache: VideoKVCache, dtype: torch.dtype) -> VideoKVCache:
    c = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    chunks = [ChunkKV(x.index, x.frame_range, x.source_frames, x.timestamps, x.position_ids, c(x.keys), c(x.values))
              for x in cache.chunks]
    state = [LayerState(s.keys.to(dtype), s.values.to(dtype), s.token_index, s.scores) for s in cache.state]
    return dataclasses.replace(cache, dtype=dtype, prefix_keys=c(cache.prefix_keys),
                               prefix_values=c(cache.prefix_values), chunks=chunks, state=state)


def assert_identical(a: VideoKVCache, b: VideoKVCache) -> None:
    assert a.dtype == b.dtype and a.model == b.model and a.config == b.config and a.video == b.video
    assert (a.num_chunks, a.chunk_tokens, a.cursor, a.prefix_len) == (b.num_chunks, b.chunk_tokens, b.cursor,
                                                                      b.prefix_len)
    assert torch.equal(a.prefix_ids, b.prefix_ids)
    assert len(a.chunks) == len(b.chunks)
    for x, y in zip(a.chunks, b.chunks):
        assert (x.index, x.frame_range, x.source_frames, x.timestamps) == (y.index, y.frame_range, y.source_frames,
                                                                          y.timestamps)
        assert torch.equal(x.position_ids, y.position_ids)
        for t, u in zip([*x.keys, *x.values], [*y.keys, *y.values]):
            assert t.dtype == u.dtype and torch.equal(t.view(torch.uint8), u.view(torch.uint8))  # bit-identical
    for layer in range(a.model.num_layers):
        for t, u in zip(a.layer_kv(layer), b.layer_kv(layer)):
            assert torch.equal(t.view(torch.uint8), u.view(torch.uint8))
    for s, t in zip(a.state, b.state):
        assert torch.equal(s.keys, t.keys) and torch.equal(s.values, t.values)
        assert torch.equal(s.token_index, t.token_index)
        assert (s.scores is None) == (t.scores is None) and (s.scores is None or torch.equal(s.scores, t.scores))


def uri_of(root: str, video_id: str) -> str:
    return f"{root}/{video_id}"


def store_fs(uri: str, options):
    return resolve(uri, options)


class CountingFS:
    """Wraps an fsspec filesystem and counts the bytes read through it (file reads and whole-object gets)."""

    def __init__(self, fs) -> None:
        self.fs = fs
        self.bytes_read: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _count(self, path: str, n: int) -> None:
        self.bytes_read[path] = self.bytes_read.get(path, 0) + n

    def cat_file(self, path, *args, **kwargs):
        data = self.fs.cat_file(path, *args, **kwargs)
        self._count(path, len(data))
        return data

    def open(self, path, mode="rb", **kwargs):
        f = self.fs.open(path, mode, **kwargs)
        if "r" in mode:
            read = f.read

            def counted(*a):
                data = read(*a)
                self._count(path, len(data))
                return data

            f.read = counted
        return f


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=StateKV(capacity=8), device="cpu",
                                  dtype=torch.float32, sampling=SMALL)


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(12, 56, 84, seed=3)  # 6 chunks of 6 tokens


@pytest.fixture(scope="module")
def prefilled(engine, frames) -> VideoKVCache:
    return engine.prefill(frames, fps=FPS)


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_identical(store_root, prefilled, dtype):
    root, options = store_root
    cache = cast(prefilled, dtype)
    uri = uri_of(root, "vid")
    manifest = save_cache(cache, uri, storage_options=options)
    assert manifest["dtype"] == str(dtype).removeprefix("torch.") and manifest["storage"] == "native"
    assert manifest["totals"]["chunks"] == 6 and manifest["totals"]["tokens"] == 36
    assert manifest["model"]["fingerprint"] == cache.model.fingerprint
    assert manifest["chunks"] == {"count": 6, "tokens": [6] * 6} and manifest["layout"]["position_rows"] == 3
    assert manifest["family"] == {"model_type": "qwen2_vl", "cursor": cache.cursor}
    assert manifest["prefill"] == cache.config.to_dict() and manifest["format_version"] == 2
    lazy = load_cache(uri, storage_options=options)
    assert lazy.chunks.loaded == []  # nothing read before first access
    assert_identical(cache, lazy)
    assert_identical(cache, load_cache(uri, lazy=False, storage_options=options))
    assert read_manifest(uri, storage_options=options)["created"] == manifest["created"]
    entries = list_caches(root, storage_options=options)
    assert [(e.video_id, e.chunks, e.bytes) for e in entries] == [("vid", 6, manifest["totals"]["bytes"])]


def test_answers_from_a_loaded_cache_equal_the_in_memory_cache(store_root, engine, frames, prefilled):
    root, options = store_root
    uri = uri_of(root, "vid")
    manifest = prefill_to_store(engine, frames, uri, storage_options=options, fps=FPS)  # streamed: none kept
    assert manifest["skipped"] is False
    loaded = load_cache(uri, storage_options=options)
    assert_identical(prefilled, loaded)
    for q in (QUESTION, "Is there a cat?"):
        assert engine.ask(loaded, q, max_new_tokens=5).token_ids == engine.ask(prefilled, q, max_new_tokens=5).token_ids


def test_int8_round_trip_within_half_a_quantisation_step(store_root, prefilled, engine):
    root, options = store_root
    uri = uri_of(root, "vid")
    native = uri_of(root, "native")
    manifest = save_cache(prefilled, uri, int8=True, storage_options=options)
    assert manifest["storage"] == "int8"
    assert manifest["totals"]["bytes"] < save_cache(prefilled, native, storage_options=options)["totals"]["bytes"]
    loaded = load_cache(uri, storage_options=options)
    assert loaded.dtype == torch.float32
    for a, b in zip(prefilled.chunks, loaded.chunks):
        for k, kq in zip(a.keys, b.keys):  # per (head, channel) scale: error <= absmax over tokens / 254
            bound = k.abs().amax(dim=1, keepdim=True) / 254 * 1.001 + 1e-7
            assert bool(((k - kq).abs() <= bound).all())
        for v, vq in zip(a.values, b.values):  # per (head, token) scale
            bound = v.abs().amax(dim=2, keepdim=True) / 254 * 1.001 + 1e-7
            assert bool(((v - vq).abs() <= bound).all())
    for s, t in zip(prefilled.state, loaded.state):  # the carried state is int8 too, with the same bounds
        assert torch.equal(s.token_index, t.token_index) and not torch.equal(s.keys, t.keys)
        assert bool(((s.keys - t.keys).abs() <= s.keys.abs().amax(dim=1, keepdim=True) / 254 * 1.001 + 1e-7).all())
        assert bool(((s.values - t.values).abs() <= s.values.abs().amax(dim=2, keepdim=True) / 254 * 1.001
                     + 1e-7).all())
    state_bytes = {f["kind"]: f["bytes"] for f in manifest["files"]}["state"]
    native_state = {f["kind"]: f["bytes"] for f in read_manifest(native, storage_options=options)["files"]}["state"]
    assert state_bytes < 0.6 * native_state  # stored native (the same size) before; tiny tensors: footers weigh
    assert torch.equal(prefilled.prefix_keys[0], loaded.prefix_keys[0])  # the prefix stays exact
    engine.ask(loaded, QUESTION, max_new_tokens=3)  # answers from int8 K/V run


# --- partial reads ---------------------------------------------------------------------------------------------


def test_partial_read_transfers_only_the_chunks_and_layers_asked_for(store_root):
    root, options = store_root
    uri = uri_of(root, "big")
    cache = fake_cache(24, layers=4, heads=2, tokens=256, dim=64)  # 128 KiB per layer K, 1 MiB per chunk
    manifest = save_cache(cache, uri, storage_options=options)
    fs, _ = store_fs(uri, options)
    counting = CountingFS(fs)
    part = load_cache(uri, chunks=[5, 6], layers=[2], filesystem=counting)
    assert part.committed.layers == [2] and len(part.chunks) == 2
    assert part.prefix_keys[0] is None and part.state[0] is None and part.state[2] is not None
    chunks_file = next(f for f in manifest["files"] if f["kind"] == "chunks")
    before = sum(n for p, n in counting.bytes_read.items() if p.endswith(chunks_file["path"]))
    assert before == 0  # lazy: no chunk data yet
    got = list(part.chunks)
    assert [c.index for c in got] == [5, 6] and got[0].keys[1] is None
    assert torch.equal(got[0].keys[2], cache.chunks[5].keys[2]) and torch.equal(got[1].values[2], cache.chunks[6].values[2])
    read = sum(n for p, n in counting.bytes_read.items() if p.endswith(chunks_file["path"]))
    wanted = 2 * 2 * 2 * 256 * 64 * 4  # 2 chunks x (K + V) of one layer
    assert wanted <= read <= wanted + 200_000, (read, chunks_file["bytes"])  # + footer and metadata columns
    assert read < chunks_file["bytes"] / 20
    idx, summaries = load_summary_keys(uri, 3, chunks=[0, 7], storage_options=options)
    assert idx == [0, 7] and torch.allclose(summaries[1], cache.chunks[7].keys[3].mean(dim=1))


@pytest.mark.parametrize("per_group", [1, 3])
def test_held_row_groups_write_the_same_files_in_bounded_memory(tmp_path, per_group):
    """A writer holds finished row groups and writes them in one call (the per-chunk Parquet call was most of the
    store's time at small chunks); the files are byte for byte those of writing each row group at once, every
    chunk group still its own row group, and what is held stays within the buffer plus one chunk."""
    import pyarrow.parquet as pq

    cache = fake_cache(20, tokens=6)
    chunk_bytes = 2 * 3 * 2 * 6 * 16 * 4  # K and V of 3 layers, (2, 6, 16) float32
    files = {}
    for buffer in (0, 5 * chunk_bytes, 1 << 30):
        uri = str(tmp_path / f"b{buffer}-{per_group}")
        with CacheWriter(uri, buffer_bytes=buffer, chunks_per_row_group=per_group) as writer:
            for chunk in cache.chunks:
                writer.write_chunk(chunk)
                assert writer._file.held_bytes <= buffer + 2 * chunk_bytes  # + summary keys and positions
            manifest = writer.commit(cache)
        files[buffer] = {f["kind"]: (tmp_path / uri / f["path"]).read_bytes() for f in manifest["files"]}
        chunks = next(f for f in manifest["files"] if f["kind"] == "chunks")
        assert pq.ParquetFile(str(tmp_path / uri / chunks["path"])).num_row_groups == -(-20 // per_group)
        loaded = load_cache(uri)
        assert all(torch.equal(a.keys[1], b.keys[1]) for a, b in zip(cache.chunks, loaded.chunks))
    assert files[0]["chunks"] == files[5 * chunk_bytes]["chunks"] == files[1 << 30]["chunks"]
    assert files[0]["summaries"] == files[1 << 30]["summaries"]


# --- crashes and modes -----------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_writer_killed_half_way_leaves_nothing_committed_and_a_rewrite_succeeds(store_root, engine, frames):
    root, options = store_root
    uri = uri_of(root, "vid")
    writer = CacheWriter(uri, storage_options=options)

    def sink(chunk):
        if chunk.index == 3:
            raise Boom("killed")
        writer.write_chunk(chunk)

    with pytest.raises(Boom):
        engine.prefill(frames, fps=FPS, sink=sink, keep_chunks=False)  # no abort: the files stay, as after a crash
    fs, path = store_fs(uri, options)
    fs.invalidate_cache()
    if options is None:  # garbage left behind (S3 objects appear only when their upload completes)...
        assert fs.ls(path)
    assert list_caches(root, storage_options=options) == []  # ...but nothing committed
    with pytest.raises(CacheNotFoundError, match="vid"):
        load_cache(uri, storage_options=options)
    with pytest.raises(Boom):  # the same through prefill_to_store (which aborts: deletes its own attempt)
        prefill_to_store(engine, frames, uri, storage_options=options, fps=FPS, progress=_raise_at(2))
    manifest = prefill_to_store(engine, frames, uri, storage_options=options, fps=FPS,
                                writer_kwargs={"sweep_grace_s": 0})  # the crashed attempt is swept at once
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path) if not p.endswith("/.lock")) == sorted(
        ["manifest.json", manifest["files"][0]["path"].split("/")[0]])
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["vid"]
    # a crash while overwriting a committed cache leaves the old one readable
    with pytest.raises(Boom):
        prefill_to_store(engine, frames, uri, storage_options=options, fps=FPS, progress=_raise_at(2))
    assert read_manifest(uri, storage_options=options)["created"] == manifest["created"]
    load_cache(uri, storage_options=options, lazy=False)


def _raise_at(n):
    def progress(done, total):
        if done == n:
            raise Boom("killed")
    return progress


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}]
    from tests.statekv.test_store import fake_cache
    from statekv.store import CacheWriter
    cache = fake_cache(6)
    w = CacheWriter(sys.argv[1], chunks_per_row_group=1)
    for chunk in cache.chunks[:3]:
        w.write_chunk(chunk)
    print("WROTE", flush=True)
    time.sleep(60)
""")


def test_sigkilled_writer_process_leaves_nothing_committed(tmp_path):
    root = str(tmp_path / "caches")
    uri = uri_of(root, "vid")
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(repo=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    proc = subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WROTE"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert any(p.name.startswith("parts-") for p in (tmp_path / "caches" / "vid").iterdir())
    assert list_caches(root) == []
    with pytest.raises(CacheNotFoundError):
        load_cache(uri)
    cache = fake_cache(6)
    save_cache(cache, uri, sweep_grace_s=0)
    assert_identical(cache, load_cache(uri))
    assert len([p for p in (tmp_path / "caches" / "vid").iterdir() if p.name.startswith("parts-")]) == 1


def test_skip_mode_does_not_rewrite(store_root, engine, frames):
    root, options = store_root
    uri = uri_of(root, "vid")
    first = prefill_to_store(engine, frames, uri, storage_options=options, fps=FPS)
    called = []
    again = prefill_to_store(engine, frames, uri, mode="skip", storage_options=options, fps=FPS,
                             progress=lambda *a: called.append(a))
    assert again["skipped"] is True and not called and again["created"] == first["created"]
    writer = CacheWriter(uri, mode="skip", storage_options=options)
    assert writer.skipped
    with pytest.raises(ValueError, match="valid modes: overwrite, skip, append"):
        CacheWriter(uri, mode="replace", storage_options=options)


def test_appending_chunks_equals_the_resumed_in_memory_cache(store_root, engine, frames):
    root, options = store_root
    uri = uri_of(root, "vid")
    prefill_to_store(engine, frames[:6], uri, storage_options=options, fps=FPS)
    first_files = read_manifest(uri, storage_options=options)["files"]
    manifest = prefill_to_store(engine, frames[6:], uri, resume=True, storage_options=options, fps=FPS)
    chunk_files = [f for f in manifest["files"] if f["kind"] == "chunks"]
    assert [(f["first_chunk"], f["num_chunks"]) for f in chunk_files] == [(0, 3), (3, 3)]
    assert chunk_files[0] == next(f for f in first_files if f["kind"] == "chunks")  # old chunk file kept as is
    in_memory = engine.prefill(frames[6:], fps=FPS, resume_from=engine.prefill(frames[:6], fps=FPS))
    loaded = load_cache(uri, storage_options=options)
    assert_identical(in_memory, loaded)
    assert engine.ask(loaded, QUESTION, max_new_tokens=5).token_ids == \
        engine.ask(in_memory, QUESTION, max_new_tokens=5).token_ids


# --- integrity -------------------------------------------------------------------------------------------------


def test_a_flipped_byte_or_truncation_is_detected(store_root):
    root, options = store_root
    uri = uri_of(root, "vid")
    cache = fake_cache(6)
    manifest = save_cache(cache, uri, storage_options=options)
    fs, path = store_fs(uri, options)
    entry = next(f for f in manifest["files"] if f["kind"] == "chunks")
    obj = f"{path}/{entry['path']}"
    data = bytearray(fs.cat_file(obj))
    at = data.find(serde.to_bytes(cache.chunks[2].keys[1])) + 17
    data[at] ^= 0x01
    fs.pipe_file(obj, bytes(data))
    lazy = load_cache(uri, storage_options=options)
    lazy.chunks[0]  # other chunks still read fine
    with pytest.raises(CacheCorruptError, match=r"'vid'.*chunk 2, layer 1.*checksum"):
        lazy.chunks[2]
    with pytest.raises(CacheCorruptError, match=r"chunks-00000.parquet.*CRC-32"):
        load_cache(uri, lazy=False, storage_options=options)  # a full load checks whole-object CRCs
    fs.pipe_file(obj, bytes(data[: len(data) // 2]))
    with pytest.raises(CacheCorruptError, match="truncated"):
        list(load_cache(uri, storage_options=options).chunks)
    assert issubclass(CacheCorruptError, StateKVError)


def test_missing_cache_and_other_model_are_named(store_root):
    root, options = store_root
    with pytest.raises(CacheNotFoundError, match="nope"):
        load_cache(uri_of(root, "nope"), storage_options=options)
    uri = uri_of(root, "vid")
    cache = fake_cache(2)
    save_cache(cache, uri, storage_options=options)
    with pytest.raises(ModelMismatchError, match="f00d.*beef"):
        load_cache(uri, expect_model=dataclasses.replace(cache.model, fingerprint="beef"), storage_options=options)


def test_s3_through_environment_credentials(s3_server, monkeypatch):
    endpoint, _ = s3_server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cache = fake_cache(3, dtype=torch.bfloat16)
    save_cache(cache, "s3://caches/env/vid", storage_options={"endpoint_url": endpoint})
    assert_identical(cache, load_cache("s3://caches/env/vid", storage_options={"endpoint_url": endpoint}))


def test_a_version_1_cache_is_refused_with_a_reindex_message(store_root, engine, frames):
    """Format v1 (statekv 0.1: Qwen grid and 3 position rows in the generic manifest, no prefill config, no
    cursor) is not read: load, list and append all say to re-index with statekv >= 0.2."""
    from statekv.store import CacheVersionError
    from statekv.store.format import MANIFEST

    root, options = store_root
    uri = f"{root}/old"
    manifest = prefill_to_store(engine, frames[:4], uri, storage_options=options, fps=FPS)
    v1 = {k: v for k, v in manifest.items() if k not in ("prefill", "family", "chunks", "video", "skipped")}
    v1.update(format_version=1, statekv_version="0.1.0", grid={"grid_t": 2, "grid_h": 4, "grid_w": 6},
              max_position=24, policy={"name": "statekv", "capacity": 8, "decay": None})
    fs, path = resolve(uri, options)
    fs.pipe_file(f"{path}/{MANIFEST}", json.dumps(v1).encode())
    for call in (lambda: load_cache(uri, storage_options=options), lambda: read_manifest(uri, storage_options=options),
                 lambda: CacheWriter(uri, mode="append", storage_options=options)):
        with pytest.raises(CacheVersionError, match=r"format version 1 \(written by statekv 0.1.0\) is no longer "
                                                    r"read; re-index the video with statekv >= 0.2"):
            call()
