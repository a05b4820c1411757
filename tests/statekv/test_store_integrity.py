"""The store under attack and under contention (issue 14, issue 8 points 12/13/15): hostile manifests, two
writers, readers during a re-prefill, repeated resumes, corrupt manifests in a root, dropped connections,
staleness, the catalog. Local and loopback-S3 roots throughout (`store_root`)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading

import pytest
import torch
from tests.statekv.test_store import FPS, CountingFS, assert_identical, engine, fake_cache, frames  # noqa: F401 (fixtures)

from statekv.policies import LayerState
from statekv.store import (CacheChangedError, CacheCorruptError, CacheUnavailableError, CacheWriter,
                           ConcurrentWriteError, catalog, list_caches, load_cache, manifest_version,
                           prefill_to_store, read_manifest, save_cache)
from statekv.store import manifest as schema
from statekv.store.fs import resolve


def _manifest_path(uri: str, options) -> tuple[object, str]:
    fs, path = resolve(uri, options)
    return fs, f"{path}/manifest.json"


def _raw(uri: str, options) -> dict:
    fs, p = _manifest_path(uri, options)
    return json.loads(fs.cat_file(p))


def _put(uri: str, options, manifest: dict, *, reseal: bool = True) -> None:
    """Write a (tampered) manifest, re-checksummed like an adversary or a buggy writer would."""
    fs, p = _manifest_path(uri, options)
    fs.pipe_file(p, schema.encode(schema.seal(manifest) if reseal else manifest))


# --- 1. paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../a/{parts}/chunks-00000.parquet", "../../../../etc/passwd", "/etc/passwd",
                                 "{parts}/../../a/{parts}/chunks-00000.parquet", "s3://caches/x.parquet",
                                 "{parts}/./chunks-00000.parquet", "{parts}\\..\\x.parquet"])
def test_a_path_outside_the_cache_folder_is_refused_before_anything_is_read(store_root, bad):
    """Regression: a `files` path of ../other/parts-…/chunks-00000.parquet answered from another video's cache."""
    root, options = store_root
    a = save_cache(fake_cache(4, seed=1), f"{root}/a", storage_options=options)
    save_cache(fake_cache(4, seed=2), f"{root}/b", storage_options=options)
    m = _raw(f"{root}/b", options)
    theirs = next(f for f in a["files"] if f["kind"] == "chunks")
    i = next(i for i, f in enumerate(m["files"]) if f["kind"] == "chunks")
    m["files"][i].update(path=bad.format(parts=theirs["path"].split("/")[0]), bytes=theirs["bytes"],
                         crc32=theirs["crc32"])
    m["totals"]["bytes"] = sum(f["bytes"] for f in m["files"])
    _put(f"{root}/b", options, m)
    fs, _ = resolve(f"{root}/b", options)
    counting = CountingFS(fs)
    with pytest.raises(CacheCorruptError, match=r"'b'.*files\[1\]\.path.*not a file inside this cache's folder"):
        load_cache(f"{root}/b", filesystem=counting, lazy=False)
    assert all(p.endswith("manifest.json") for p in counting.bytes_read)  # no data file was opened


# --- 2. digit flips and re-checksummed changes ------------------------------------------------------------------


def test_every_digit_flip_of_a_valid_manifest_is_detected(store_root):
    """Regression: 11 of 20 digit flips (valid JSON) went unnoticed: a chunk count - 10 answered from 30 of 40
    chunks."""
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(6), uri, storage_options=options)
    fs, p = _manifest_path(uri, options)
    text = fs.cat_file(p).decode()
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    for at in random.Random(0).sample(digits, 25):
        flipped = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:]
        fs.pipe_file(p, flipped.encode())
        with pytest.raises(CacheCorruptError, match="manifest"):
            load_cache(uri, storage_options=options)


@pytest.mark.parametrize("change,field", [
    (lambda m: m["chunks"].update(count=m["chunks"]["count"] - 2), "chunks.count"),
    (lambda m: m["totals"].update(chunks=3), "totals.chunks"),
    (lambda m: m["chunks"]["tokens"].__setitem__(2, m["chunks"]["tokens"][2] + 1) or
     m["chunks"]["tokens"].__setitem__(3, m["chunks"]["tokens"][3] - 1), "chunks.tokens"),
    (lambda m: m["video"]["frame_indices"].__setitem__(3, 99), "video"),
    (lambda m: m["video"]["timestamps"].__setitem__(5, 0.25), "video"),
    (lambda m: m["totals"].update(tokens=m["totals"]["tokens"] + 6), "totals.tokens"),
])
def test_resealed_changes_are_caught_against_the_stored_data(store_root, change, field):
    """A manifest changed and re-checksummed still has to agree with the chunk files' rows and positions."""
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(6), uri, storage_options=options)
    m = _raw(uri, options)
    change(m)
    _put(uri, options, m)
    with pytest.raises(CacheCorruptError, match=rf"'vid'.*{field}"):
        load_cache(uri, lazy=False, storage_options=options)


def test_chunk_counts_are_checked_against_the_parquet_row_counts(store_root):
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(6), uri, storage_options=options)
    m = _raw(uri, options)  # claim 4 chunks everywhere: only the chunk file itself knows it holds 6
    for f in m["files"]:
        if f["kind"] in ("chunks", "summaries"):
            f["num_chunks"] = 4
    m["chunks"]["count"] = m["totals"]["chunks"] = 4
    m["chunks"]["tokens"] = m["chunks"]["tokens"][:4]
    m["totals"]["tokens"] = sum(m["chunks"]["tokens"])
    m["appends"][0]["chunks"] = [0, 4]
    _put(uri, options, m)
    with pytest.raises(CacheCorruptError, match=r"chunks-00000.parquet.*6 rows.*implies 4 rows"):
        list(load_cache(uri, storage_options=options).chunks)


# --- 3. schema --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("layout"), r"field 'layout'.*missing"),
    (lambda m: m.update(prefix_len="5"), r"field 'prefix_len'.*str '5' where an integer is required"),
    (lambda m: m.update(files=None), r"field 'files'.*NoneType None where a list is required"),
    (lambda m: m["files"][0].update(bytes=-1), r"field 'files\[0\]\.bytes'.*below 0"),
    (lambda m: m.update(storage="zstd"), r"field 'storage'.*not one of"),
    (lambda m: m.update(has_state=1), r"field 'has_state'.*where a boolean"),
    (lambda m: m.pop("checksum"), r"field 'checksum'.*missing"),
])
def test_missing_keys_and_wrong_types_name_the_field(store_root, change, message):
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(2), uri, storage_options=options)
    m = _raw(uri, options)
    change(m)
    _put(uri, options, m, reseal="checksum" in m)
    with pytest.raises(CacheCorruptError, match=message):
        read_manifest(uri, storage_options=options)


def test_the_cli_reports_a_schema_violation_in_one_line(tmp_path):
    """Regression: `prefix_len` as a string gave a traceback in the CLI."""
    uri = str(tmp_path / "caches" / "vid")
    save_cache(fake_cache(2), uri)
    m = _raw(uri, None)
    m["prefix_len"] = "5"
    _put(uri, None, m)
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "inspect", uri], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "prefix_len" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# --- 5. two writers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["create", "replace"])
def test_two_concurrent_writers_leave_one_committed_readable_cache(store_root, existing):
    """Regression: two prefills on one id both printed "committed"; one version silently vanished, and a cache
    could be listed whose data files were deleted."""
    root, options = store_root
    uri = f"{root}/vid"
    if existing:
        save_cache(fake_cache(3, seed=9), uri, storage_options=options)
    caches = {1: fake_cache(5, seed=1), 2: fake_cache(5, seed=2)}
    started = threading.Barrier(2)
    results: dict[int, object] = {}
    writers: dict[int, CacheWriter] = {}

    def write(n: int) -> None:
        writer = writers[n] = CacheWriter(uri, storage_options=options)
        started.wait()  # both writers started from the same committed state
        try:
            for chunk in caches[n].chunks:
                writer.write_chunk(chunk)
            results[n] = writer.commit(caches[n])
        except ConcurrentWriteError as err:
            results[n] = err

    threads = [threading.Thread(target=write, args=(n,)) for n in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = {n: r for n, r in results.items() if isinstance(r, ConcurrentWriteError)}
    winners = {n: r for n, r in results.items() if isinstance(r, dict)}
    assert len(errors) == 1 and len(winners) == 1, results
    (winner, m), = winners.items()
    err = next(iter(errors.values()))
    assert f"another writer committed this cache at {m['created']}" in str(err)
    assert read_manifest(uri, storage_options=options)["checksum"] == m["checksum"]
    assert_identical(caches[winner], load_cache(uri, lazy=False, storage_options=options))
    fs, path = resolve(uri, options)
    fs.invalidate_cache()
    folders = {p.rsplit("/", 1)[-1] for p in fs.ls(path) if "parts-" in p}
    assert {f["path"].split("/")[0] for f in m["files"]} <= folders
    assert writers[next(iter(errors))].attempt not in folders  # the loser removed its own attempt


# --- 6. readers during a re-prefill -----------------------------------------------------------------------------


def test_a_reader_of_the_old_commit_finishes_reading_it_during_a_re_prefill(store_root):
    """Regression: a request during a re-prefill got 500 cache_corrupt (the old parts deleted under it)."""
    root, options = store_root
    uri = f"{root}/vid"
    old = fake_cache(6, seed=1)
    save_cache(old, uri, storage_options=options)
    reading = load_cache(uri, storage_options=options)  # manifest read, chunks not yet
    save_cache(fake_cache(6, seed=2), uri, storage_options=options)  # default grace: old files kept for now
    assert_identical(old, reading)  # the reader finishes the commit it opened


def test_a_reader_whose_files_were_swept_is_told_to_retry_never_corrupt(store_root):
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(6, seed=1), uri, storage_options=options)
    reading = load_cache(uri, storage_options=options)
    new = fake_cache(6, seed=2)
    save_cache(new, uri, storage_options=options, sweep_grace_s=0)  # old files deleted at once
    with pytest.raises(CacheChangedError, match="'vid' was replaced by a newer commit.*load it again") as info:
        list(reading.chunks)
    assert not isinstance(info.value, CacheCorruptError) and info.value.retryable


class ReprefillOnFirstDataRead(CountingFS):
    """A filesystem whose first data-file read is preceded by a re-prefill of the cache that sweeps at once."""

    def __init__(self, fs, uri: str, options, new) -> None:
        super().__init__(fs)
        self.uri, self.options, self.new, self.done = uri, options, new, False

    def _maybe(self, path: str) -> None:
        if path.endswith(".parquet") and not self.done:
            self.done = True
            save_cache(self.new, self.uri, storage_options=self.options, sweep_grace_s=0)

    def cat_file(self, path, *args, **kwargs):
        self._maybe(path)
        return super().cat_file(path, *args, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        self._maybe(path)
        return super().open(path, mode, **kwargs)


def test_a_full_load_interrupted_by_a_re_prefill_reads_the_new_commit(store_root):
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(6, seed=1), uri, storage_options=options)
    new = fake_cache(4, seed=2)
    fs, _ = resolve(uri, options)
    racing = ReprefillOnFirstDataRead(fs, uri, options, new)
    loaded = load_cache(uri, lazy=False, filesystem=racing)
    assert racing.done
    assert_identical(new, loaded)


# --- 7. resume idempotence --------------------------------------------------------------------------------------


def test_resuming_twice_with_the_same_footage_appends_once(store_root, engine, frames):  # noqa: F811
    """Regression: a resume killed after its commit, run again, appended the same footage twice (44 -> 84)."""
    root, options = store_root
    uri = f"{root}/vid"
    prefill_to_store(engine, frames[:6], uri, storage_options=options, fps=FPS)
    first = prefill_to_store(engine, frames[6:], uri, resume=True, storage_options=options, fps=FPS)
    assert first["skipped"] is False and first["totals"]["chunks"] == 6
    assert [s["chunks"] for s in first["appends"]] == [[0, 3], [3, 6]]
    again = prefill_to_store(engine, frames[6:], uri, resume=True, storage_options=options, fps=FPS)
    assert again["skipped"] is True and "already holds this footage (chunks [3, 6)" in again["message"]
    assert read_manifest(uri, storage_options=options)["totals"]["chunks"] == 6
    assert read_manifest(uri, storage_options=options)["checksum"] == first["checksum"]
    more = prefill_to_store(engine, frames[:4], uri, resume=True, storage_options=options, fps=FPS)
    assert more["skipped"] is False and more["totals"]["chunks"] == 8  # other footage still appends


# --- 8 and issue 8.13: corrupt manifests in whole-root operations -----------------------------------------------


@pytest.mark.parametrize("use_catalog", [True, False])
def test_one_corrupt_manifest_is_skipped_and_reported_by_list_caches(store_root, use_catalog):
    """Regression: one invalid manifest.json made list_caches / statekv ls / GET /v1/videos fail for the root."""
    root, options = store_root
    for name in ("a", "b", "c"):
        save_cache(fake_cache(2), f"{root}/{name}", storage_options=options)
    fs, p = _manifest_path(f"{root}/b", options)
    fs.pipe_file(p, b'{"format": "statekv-cache", "format_version": 1, "video_id": "b"')
    catalog.rebuild(root, storage_options=options)  # (the catalog's snapshot comes from a scan here)
    listing = list_caches(root, storage_options=options, use_catalog=use_catalog)
    assert [e.video_id for e in listing] == ["a", "c"]
    assert [(bad.video_id, "not valid JSON" in bad.reason) for bad in listing.invalid] == [("b", True)]


def test_overwrite_replaces_a_corrupt_cache_and_append_refuses_it(store_root):
    """Regression: `prefill --mode overwrite` refused to replace a corrupt cache ("re-prefill the video" failed)."""
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(2), uri, storage_options=options)
    m = _raw(uri, options)
    m["layout"] = None
    _put(uri, options, m)
    with pytest.raises(CacheCorruptError, match="layout"):
        CacheWriter(uri, mode="append", storage_options=options)
    fresh = fake_cache(3, seed=4)
    save_cache(fresh, uri, storage_options=options)
    assert_identical(fresh, load_cache(uri, storage_options=options))


# --- issue 8.13: a dropped connection is not corruption ---------------------------------------------------------


class DroppingProxy:
    """A TCP proxy to the moto server that, once `drop` is set, cuts every connection after a few bytes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.drop = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if downstream and self.drop:
                    dst.sendall(data[:20])
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_a_dropped_connection_is_a_retryable_error_not_corruption(s3_server):
    """Regression: a dropped connection while reading a chunk was reported as a corrupt cache."""
    endpoint, _ = s3_server
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = DroppingProxy((host, int(port)))
    try:
        via = {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "key": "testing", "secret": "testing",
               "region": "us-east-1", "config_kwargs": {"retries": {"max_attempts": 1}}}
        uri = "s3://caches/dropped/vid"
        cache = fake_cache(4)
        save_cache(cache, uri, storage_options=via)
        lazy = load_cache(uri, storage_options=via)
        proxy.drop = True
        with pytest.raises(CacheUnavailableError, match="'vid'.*retry") as info:
            list(lazy.chunks)
        assert info.value.retryable and not isinstance(info.value, CacheCorruptError)
        with pytest.raises(CacheUnavailableError):
            read_manifest(uri, storage_options=via)
        proxy.drop = False
        assert_identical(cache, load_cache(uri, storage_options=via))  # the same cache reads fine afterwards
    finally:
        proxy.close()


def test_a_garbled_parquet_footer_is_still_corruption(store_root):
    """The other side of the split: bytes that arrive but do not parse are corruption, not a store outage."""
    root, options = store_root
    uri = f"{root}/vid"
    m = save_cache(fake_cache(4), uri, storage_options=options)
    fs, path = resolve(uri, options)
    entry = next(f for f in m["files"] if f["kind"] == "chunks")
    data = bytearray(fs.cat_file(f"{path}/{entry['path']}"))
    footer = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer:-8] = bytes(b ^ 0x5A for b in data[-8 - footer:-8])  # the footer's metadata, same size
    fs.pipe_file(f"{path}/{entry['path']}", bytes(data))
    with pytest.raises(CacheCorruptError, match="chunks-00000.parquet.*footer differs"):  # its recorded digest
        list(load_cache(uri, storage_options=options).chunks)
    with pytest.raises(CacheCorruptError, match="chunks-00000.parquet.*unreadable"):  # and Parquet's parser
        list(load_cache(uri, storage_options=options, verify=False).chunks)


# --- issue 8.13: cheap staleness detection ----------------------------------------------------------------------


def test_manifest_version_detects_a_re_prefill(store_root):
    root, options = store_root
    uri = f"{root}/vid"
    save_cache(fake_cache(2, seed=1), uri, storage_options=options)
    loaded = load_cache(uri, storage_options=options)
    assert manifest_version(uri, storage_options=options) == loaded.committed.version
    save_cache(fake_cache(2, seed=2), uri, storage_options=options)
    assert manifest_version(uri, storage_options=options) != loaded.committed.version


# --- issue 8.15: the catalog ------------------------------------------------------------------------------------


def test_the_catalog_lists_like_a_scan_in_a_few_reads(tmp_path, monkeypatch):
    """Regression: every listing read every manifest; with a catalog it reads a snapshot and a short log."""
    monkeypatch.setattr(catalog, "COMPACT_AFTER", 8)
    root = str(tmp_path / "caches")
    for i in range(30):
        save_cache(fake_cache(1, layers=1, seed=i), f"{root}/v{i:03d}")
    save_cache(fake_cache(2, layers=1, seed=99), f"{root}/v007")  # re-prefilled: the later commit wins
    fs, _ = resolve(root, None)

    def reads(**kw):
        counting = CountingFS(fs)
        return list_caches(root, filesystem=counting, **kw), len(counting.bytes_read)

    scan, scan_reads = reads(use_catalog=False)
    first, _ = reads()  # no snapshot yet: built by one scan
    again, catalog_reads = reads()
    save_cache(fake_cache(1, layers=1, seed=100), f"{root}/v100")
    later, later_reads = reads()
    assert [(e.video_id, e.chunks, e.checksum) for e in scan] == [(e.video_id, e.chunks, e.checksum) for e in first]
    assert [e.video_id for e in again] == [e.video_id for e in scan]
    assert next(e for e in again if e.video_id == "v007").chunks == 2
    assert [e.video_id for e in later][-1] == "v100"
    assert scan_reads == 30 and catalog_reads == 1 and later_reads == 2, (scan_reads, catalog_reads, later_reads)


def test_the_catalog_on_s3_follows_commits(store_root):
    root, options = store_root
    for i in range(3):
        save_cache(fake_cache(1, layers=1, seed=i), f"{root}/v{i}", storage_options=options)
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["v0", "v1", "v2"]
    save_cache(fake_cache(3, layers=1), f"{root}/v1", storage_options=options)
    save_cache(fake_cache(1, layers=1), f"{root}/v3", storage_options=options)
    listing = list_caches(root, storage_options=options)
    assert [(e.video_id, e.chunks) for e in listing] == [("v0", 1), ("v1", 3), ("v2", 1), ("v3", 1)]
    assert listing == list_caches(root, storage_options=options, use_catalog=False)


def test_int8_state_halves_what_the_carried_state_costs():
    """Regression (issue 8.12): --int8 stored the carried state in native precision."""
    cache = fake_cache(2, layers=2, heads=2, tokens=6, dim=64)
    cache.state = [LayerState(torch.randn(2, 256, 64), torch.randn(2, 256, 64),  # a realistic carried state
                              torch.arange(256).expand(2, -1).clone()) for _ in range(2)]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        native = {f["kind"]: f["bytes"] for f in save_cache(cache, f"{d}/n")["files"]}
        int8 = {f["kind"]: f["bytes"] for f in save_cache(cache, f"{d}/q", int8=True)["files"]}
    assert int8["state"] < 0.5 * native["state"], (int8, native)
