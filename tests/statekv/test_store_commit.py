"""The root's listing and the commit under hostile contents and kills (issue 18 points 5, 8, 9): bad manifests and
bad catalog objects are reported, never fail the listing; a commit killed after its manifest is still listed; a
resume whose base was re-prefilled meanwhile is refused. Local and loopback-S3 roots (`store_root`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.statekv.test_store import FPS, engine, fake_cache, frames  # noqa: F401 (fixtures)

import statekv.store
from statekv.store import (ConcurrentWriteError, catalog, list_caches, load_cache, prefill_to_store, read_manifest,
                           save_cache)
from statekv.store import manifest as schema
from statekv.store.fs import is_local, resolve
from statekv.testing.videos import synthetic_frames

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _three(root: str, options) -> tuple[object, str]:
    """Caches a, b, c under `root` and a catalog snapshot of them; (fs, root path)."""
    for name in ("a", "b", "c"):
        save_cache(fake_cache(1, layers=1), f"{root}/{name}", storage_options=options)
    catalog.rebuild(root, storage_options=options)
    return resolve(root, options)


# --- 5. one bad entry does not fail the listing ------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def _plant_dir(fs, target: str) -> None:
    """Make `target` a folder (local) / a key prefix (S3) instead of an object."""
    if is_local(fs):
        fs.makedirs(target, exist_ok=True)
    fs.pipe_file(f"{target}/x", b"{}")


def _plant_manifest(fs, path: str, kind: str) -> None:
    target = f"{path}/b/manifest.json"
    fs.rm_file(target)
    if kind == "directory":
        _plant_dir(fs, target)
    elif kind == "deep-json":
        fs.pipe_file(target, DEEP)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("use_catalog", [True, False])
@pytest.mark.parametrize("kind", ["directory", "deep-json"])
def test_a_hostile_manifest_is_reported_not_raised_by_the_listing(store_root, kind, use_catalog):
    """Regression: a manifest.json that is a directory or deeply nested JSON (RecursionError) made list_caches,
    `statekv ls` and GET /v1/videos fail for the whole root."""
    root, options = store_root
    if kind == "directory" and root.startswith("s3://"):
        pytest.skip("an S3 key prefix is no object: nothing to read")
    fs, path = _three(root, options)
    _plant_manifest(fs, path, kind)
    if use_catalog:
        catalog.rebuild(root, storage_options=options)  # the snapshot from a scan that meets it
    listing = list_caches(root, storage_options=options, use_catalog=use_catalog)
    assert [e.video_id for e in listing] == ["a", "c"]
    assert [bad.video_id for bad in listing.invalid] == ["b"]
    assert "manifest.json" in listing.invalid[0].reason


LIST_UNDER_A_MEMORY_LIMIT = textwrap.dedent("""
    import json, resource, sys
    sys.path[:0] = [{repo!r}]
    from statekv.store import list_caches
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # reading /dev/zero must not be it
    listing = list_caches(sys.argv[1], use_catalog=sys.argv[2] == "1")
    print(json.dumps([[e.video_id for e in listing], [b.video_id for b in listing.invalid]]))
""")


@pytest.mark.parametrize("use_catalog", [True, False])
def test_a_manifest_that_never_ends_is_not_read_whole(tmp_path, use_catalog):
    """Regression: a manifest.json linked to /dev/zero was read without a bound (the listing ran out of memory)."""
    root = str(tmp_path / "caches")
    _three(root, None)
    os.remove(f"{root}/b/manifest.json")
    os.symlink("/dev/zero", f"{root}/b/manifest.json")
    if use_catalog:
        os.remove(f"{root}/_catalog/snapshot.parquet")  # the listing builds it by a scan
    script = tmp_path / "ls.py"
    script.write_text(LIST_UNDER_A_MEMORY_LIMIT.format(repo=REPO))
    done = subprocess.run([sys.executable, str(script), root, "1" if use_catalog else "0"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [["a", "c"], ["b"]]


def _snapshot_bytes(kind: str) -> bytes:
    if kind == "other-schema":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"x": [1, 2]}), sink)
        return sink.getvalue().to_pybytes()
    if kind == "bad-row":  # the right columns, a row that is no entry
        rows = [{"video_id": None, "chunks": -1, "tokens": 0, "bytes": 0, "storage": "", "created": "x",
                 "fingerprint": "", "checksum": "", "invalid": None, "layout_version": None}]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=catalog.SCHEMA), sink)
        return sink.getvalue().to_pybytes()
    return {"json": b"{}", "empty": b""}[kind]


@pytest.mark.parametrize("kind", ["truncated", "other-schema", "bad-row", "json", "empty", "directory"])
def test_an_unreadable_catalog_snapshot_is_rebuilt_by_a_scan(store_root, kind):
    """Regression: a truncated, other-schema or non-Parquet snapshot (or one that is a directory) failed every
    listing of the root instead of being rebuilt by a scan."""
    root, options = store_root
    if kind == "directory" and root.startswith("s3://"):
        pytest.skip("an S3 key prefix is no object: the snapshot is absent, which is covered elsewhere")
    fs, path = _three(root, options)
    snap = f"{path}/_catalog/snapshot.parquet"
    if kind == "truncated":
        data = fs.cat_file(snap)
        fs.pipe_file(snap, data[: len(data) // 2])
    elif kind == "directory":
        fs.rm_file(snap)
        _plant_dir(fs, snap)
    else:
        fs.pipe_file(snap, _snapshot_bytes(kind))
    for _ in range(2):  # the first listing rebuilds (where it can), the next reads what it wrote
        listing = list_caches(root, storage_options=options)
        assert [e.video_id for e in listing] == ["a", "b", "c"] and listing.invalid == []


HOSTILE_LOG = {"empty-object": b"{}", "list": b"[1, 2]", "null-id": None, "text-chunks": None, "deep-json": DEEP}


def _hostile_entry(kind: str, good: dict) -> bytes:
    if HOSTILE_LOG[kind] is not None:
        return HOSTILE_LOG[kind]
    field, value = {"null-id": ("video_id", None), "text-chunks": ("chunks", "abc")}[kind]
    return json.dumps({**good, "created": "9999-01-01T00:00:00+00:00", field: value}).encode()  # the latest


@pytest.mark.parametrize("kind", [*HOSTILE_LOG, "directory"])
def test_a_hostile_catalog_log_object_is_skipped(store_root, kind):
    """Regression: a log object `{}`, `[1,2]`, with `video_id: null` or `chunks: "abc"` (or a directory) failed
    every listing of the root (KeyError / TypeError / a listing that 'kept changing')."""
    root, options = store_root
    fs, path = _three(root, options)
    good = catalog.entry_of(read_manifest(f"{root}/b", storage_options=options))
    log = f"{path}/_catalog/log/99990101T000000000000Z-hostile000000.json"  # sorts last, 'latest'
    if kind == "directory":
        _plant_dir(fs, log)
    else:
        fs.pipe_file(log, _hostile_entry(kind, good))
    listing = list_caches(root, storage_options=options)
    assert [(e.video_id, e.chunks) for e in listing] == [("a", 1), ("b", 1), ("c", 1)]
    assert listing == list_caches(root, storage_options=options, use_catalog=False)


def test_hostile_log_objects_are_compacted_away(store_root, monkeypatch):
    """Objects in the log that are not entries are deleted by the next compaction, not read again and again."""
    root, options = store_root
    fs, path = _three(root, options)
    for i, kind in enumerate(["empty-object", "list", "null-id", "text-chunks"]):
        good = catalog.entry_of(read_manifest(f"{root}/a", storage_options=options))
        fs.pipe_file(f"{path}/_catalog/log/2000010{i}T000000000000Z-hostile.json", _hostile_entry(kind, good))
    monkeypatch.setattr(catalog, "COMPACT_AFTER", 1)
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]
    assert catalog._log_names(fs, path) == []
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]


# --- 8. a commit killed after its manifest is listed --------------------------------------------------------------


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even `except Exception`)."""


def _killed_after_the_manifest(monkeypatch) -> None:
    """The writer dies right after its manifest is written: the catalog step that follows never happens."""
    real = catalog.record

    def record(*args, **kwargs):
        if kwargs.get("pending"):  # the step before the manifest (this fix): it runs
            return real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(catalog, "record", record)


def test_a_commit_killed_after_its_manifest_is_listed_and_a_skip_keeps_it(store_root, monkeypatch):
    """Regression: a writer killed just after writing its manifest left the cache loadable but missing from
    list_caches / `statekv ls` / GET /v1/videos (the catalog entry was written after the manifest), and the
    documented rerun (mode skip) did not repair it."""
    root, options = store_root
    fs, path = _three(root, options)
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]  # from the snapshot
    with monkeypatch.context() as m:
        _killed_after_the_manifest(m)
        with pytest.raises(Killed):
            save_cache(fake_cache(2, layers=1, seed=7), f"{root}/d", storage_options=options)
        with pytest.raises(Killed):  # a re-prefill of a listed cache, killed the same way
            save_cache(fake_cache(3, layers=1, seed=8), f"{root}/a", storage_options=options)
    assert load_cache(f"{root}/d", storage_options=options).num_chunks == 2  # committed
    expected = [("a", 3), ("b", 1), ("c", 1), ("d", 2)]
    listing = list_caches(root, storage_options=options)
    assert [(e.video_id, e.chunks) for e in listing] == expected
    assert listing == list_caches(root, storage_options=options, use_catalog=False)
    skipped = save_cache(fake_cache(2, layers=1, seed=7), f"{root}/d", mode="skip", storage_options=options)
    assert skipped["checksum"] == read_manifest(f"{root}/d", storage_options=options)["checksum"]
    monkeypatch.setattr(catalog, "COMPACT_AFTER", 0)  # the next listing folds the log into the snapshot
    for _ in range(2):
        assert [(e.video_id, e.chunks) for e in list_caches(root, storage_options=options)] == expected
    assert catalog._log_names(fs, path) == []


def test_a_commit_that_never_happened_is_not_listed(store_root, monkeypatch):
    """The catalog entry now comes first: a writer killed between it and its manifest must not list a cache."""
    root, options = store_root
    fs, path = _three(root, options)
    real_put = statekv.store.writer.put_if_version

    def killed_put(fs_, target, *args, **kwargs):
        if target.endswith("/d/manifest.json"):
            raise Killed
        return real_put(fs_, target, *args, **kwargs)

    monkeypatch.setattr(statekv.store.writer, "put_if_version", killed_put)
    with pytest.raises(Killed):
        save_cache(fake_cache(2, layers=1), f"{root}/d", storage_options=options)
    monkeypatch.undo()
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]
    monkeypatch.setattr(catalog, "PENDING_GRACE_S", -1.0)  # long ago: compaction deletes the stale entry
    monkeypatch.setattr(catalog, "COMPACT_AFTER", 0)
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]
    assert catalog._log_names(fs, path) == []


def test_a_skip_relists_an_older_commit_that_lost_its_catalog_entry(store_root):
    """Regression: caches committed before this fix whose catalog entry a kill lost stayed unlisted; the
    documented rerun (`prefill`, mode skip) must add them back."""
    root, options = store_root
    fs, path = _three(root, options)
    fake = fake_cache(2, layers=1, seed=3)
    save_cache(fake, f"{root}/d", storage_options=options)
    m = read_manifest(f"{root}/d", storage_options=options)
    m.pop("catalog_entry", None)  # written by an older statekv: logged after the manifest, and that was lost
    m = schema.seal(m)
    fs.pipe_file(f"{path}/d/manifest.json", schema.encode(m))
    fs.rm(f"{path}/_catalog/log", recursive=True)
    assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c"]  # the bug's state
    for _ in range(2):  # idempotent
        assert save_cache(fake, f"{root}/d", mode="skip", storage_options=options)["checksum"] == m["checksum"]
        assert [e.video_id for e in list_caches(root, storage_options=options)] == ["a", "b", "c", "d"]


KILLED_AFTER_MANIFEST = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}]
    from tests.statekv.test_store import fake_cache
    from statekv.store import catalog, save_cache
    real = catalog.record
    def record(*args, **kwargs):
        if kwargs.get("pending"):
            return real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # right after the manifest, where the catalog step used to be
    catalog.record = record
    save_cache(fake_cache(2, layers=1, seed=7), sys.argv[1])
""")


def test_sigkilled_after_the_manifest_the_cache_is_listed(tmp_path):
    """The same kill as above, as a real SIGKILL of a writer process."""
    root = str(tmp_path / "caches")
    _three(root, None)
    script = tmp_path / "writer.py"
    script.write_text(KILLED_AFTER_MANIFEST.format(repo=REPO))
    done = subprocess.run([sys.executable, str(script), f"{root}/d"], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert load_cache(f"{root}/d").num_chunks == 2
    assert [e.video_id for e in list_caches(root)] == ["a", "b", "c", "d"]


# --- 9. a resume racing an overwrite -----------------------------------------------------------------------------


def test_a_resume_whose_base_was_replaced_is_refused(store_root, engine, frames, monkeypatch):  # noqa: F811
    """Regression: an overwrite committed between a resume's base load and its writer's start was continued from
    the old base's state: the committed cache held the overwrite's 3 chunks plus 3 continued from the old video."""
    root, options = store_root
    uri = f"{root}/vid"
    prefill_to_store(engine, frames[:6], uri, storage_options=options, fps=FPS)
    other = synthetic_frames(6, 56, 84, seed=11)  # as many chunks as the base: the resume's chunks fit after it
    real_load = statekv.store.prefill.load_cache
    winner = {}

    def load_then_overwrite(*args, **kwargs):
        base = real_load(*args, **kwargs)
        winner.update(prefill_to_store(engine, other, uri, storage_options=options, fps=FPS))
        return base

    monkeypatch.setattr(statekv.store.prefill, "load_cache", load_then_overwrite)
    with pytest.raises(ConcurrentWriteError, match="another writer committed"):
        prefill_to_store(engine, frames[6:], uri, resume=True, storage_options=options, fps=FPS)
    monkeypatch.undo()
    committed = read_manifest(uri, storage_options=options)
    assert committed["checksum"] == winner["checksum"] and committed["chunks"]["count"] == 3
    assert load_cache(uri, storage_options=options).num_chunks == 3
    assert [(e.video_id, e.checksum) for e in list_caches(root, storage_options=options)] == \
        [("vid", winner["checksum"])]
