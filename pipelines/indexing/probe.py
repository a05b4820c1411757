"""Expand shards and probe inputs before any model actor starts: in the driver, on a bounded thread pool.

Listing, tar-header reads and probes are metadata I/O (a HEAD or a small GET each). They used to be Ray Data
tasks with `num_cpus=0`, which Ray schedules without limit: every input got its own worker process importing
torch (~500 MB each), and the first video started minutes later on a small node. Here they are threads of the
driver (`IndexConfig.probe_threads` at once, no extra processes), and only the rows left to do reach Ray, so a
rerun over committed caches never starts the model actors.

A probe that fails for one input (permission denied, a corrupt committed manifest, ...) fails that row only.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines.indexing.config import IndexConfig
from pipelines.indexing.inputs import expand_shard
from statekv.store.cache_store import CacheStore
from statekv.store.errors import CacheCorruptError, CacheNotFoundError
from statekv.store.fs import resolve

logger = logging.getLogger(__name__)


def probe_inputs(rows: list[dict[str, Any]], config: IndexConfig) -> list[dict[str, Any]]:
    """Expand shard rows into member rows and probe every row, at most `config.probe_threads` at a time.

    Returns the rows in input order; each has status "" (to index), "skipped" or "failed" (with `error`).
    """
    threads = max(1, min(config.probe_threads, len(rows) or 1))
    store = config.cache_store()  # one client for every probe
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="statekv-probe") as pool:
        expanded = [r for rs in pool.map(lambda r: _expand(r, config), rows) for r in rs]
        return list(pool.map(lambda r: probe_row(r, config, store), expanded))


def _expand(row: dict[str, Any], config: IndexConfig) -> list[dict[str, Any]]:
    try:
        return expand_shard(row, config.storage_options)
    except Exception as err:  # noqa: BLE001 - any failure of one shard is that shard's failed row, not the run's
        logger.warning("shard %s failed: %s: %s", row["uri"], type(err).__name__, err)
        return [{**row, "member": "", "status": "failed", "error": f"{type(err).__name__}: {err}"}]


def probe_row(row: dict[str, Any], config: IndexConfig, store: CacheStore | None = None) -> dict[str, Any]:
    """Cheap checks before a video takes an actor: missing or zero-length inputs fail, committed caches skip."""
    row = dict(row)
    if row["status"]:
        return row
    try:
        if not config.overwrite and _committed(store or config.cache_store(), row["video_id"]):
            return {**row, "status": "skipped", "error": "committed cache exists"}
        size = row["size"] if row["member"] else _size(row["uri"], config)
    except FileNotFoundError:
        return {**row, "status": "failed", "error": "missing: no such file"}
    except Exception as err:  # noqa: BLE001 - e.g. PermissionError on one object: that row fails, the run goes on
        logger.warning("probe of %s failed: %s: %s", row["uri"], type(err).__name__, err)
        return {**row, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    if size == 0:
        return {**row, "status": "failed", "error": "zero-length file", "size": 0}
    return {**row, "size": size}


def _committed(store: CacheStore, video_id: str) -> bool:
    """A readable committed cache exists (a corrupt one is prefilled again, replacing it)."""
    try:
        committed = store.manifest(video_id)
    except (CacheNotFoundError, CacheCorruptError):
        return False
    store.reconcile(video_id, committed)  # a kill may have lost its catalog entry
    return True


def _size(uri: str, config: IndexConfig) -> int:
    fs, path = resolve(uri, config.storage_options)
    return int(fs.info(path).get("size") or 0)
