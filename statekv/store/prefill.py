"""Prefill a video straight into the store: chunks streamed to a `CacheWriter`, none kept in memory."""

from __future__ import annotations

import logging
import os
from typing import Any

from statekv.store.manifest import read_manifest
from statekv.store.reader import load_cache
from statekv.store.writer import CacheWriter, footage_identity, same_footage

logger = logging.getLogger(__name__)


def prefill_to_store(engine, video, uri: str | os.PathLike, *, mode: str = "overwrite", int8: bool = False,
                     resume: bool = False, storage_options: Any = None, filesystem: Any = None,
                     writer_kwargs: dict[str, Any] | None = None, **prefill_kwargs: Any) -> dict[str, Any]:
    """Prefill `video` straight into the store at `uri` (chunks streamed, none kept); returns the manifest.

    mode "skip" returns the committed manifest without prefilling. `resume=True` continues the committed cache's
    video with `video` (its carried state) and appends the new chunks; resuming with footage the cache already
    holds (same content and sampling, per the manifest's `appends`) is a no-op. The manifest's `skipped` key
    says whether this call wrote anything, `message` why not.
    """
    writer_kwargs = dict(writer_kwargs or {})
    # the video is stat-ed (size, etag) with the options it is read with, else the store's
    source_options = prefill_kwargs.get("storage_options") or storage_options
    writer_kwargs.setdefault("source_storage_options", source_options)
    footage = footage_identity(video, source_options, sampling=getattr(engine, "sampling", None),
                               fps=prefill_kwargs.get("fps"))
    if resume:
        committed = read_manifest(uri, storage_options=storage_options, filesystem=filesystem)
        for seg in committed.get("appends", []):
            if same_footage(seg.get("footage"), footage):
                a, b = seg["chunks"]
                message = (f"the cache {os.fspath(uri)!r} already holds this footage (chunks [{a}, {b}), committed "
                           f"{committed['created']}): nothing appended")
                logger.info("%s", message)
                return {**committed, "skipped": True, "message": message}
        base = load_cache(uri, storage_options=storage_options, filesystem=filesystem,
                          expect_model=engine.model_info())
        # bound to the commit the resumed state came from: a re-prefill since then refuses the append
        writer = CacheWriter(uri, mode="append", storage_options=storage_options, filesystem=filesystem,
                             base_version=base.committed.version, **writer_kwargs)
        prefill_kwargs["resume_from"] = base
    else:
        writer = CacheWriter(uri, mode=mode, int8=int8, storage_options=storage_options, filesystem=filesystem,
                             **writer_kwargs)
    with writer:
        if writer.skipped:
            return {**writer.existing, "skipped": True, "message": "a committed cache exists (mode skip)"}
        cache = engine.prefill(video, sink=writer.write_chunk, keep_chunks=False, **prefill_kwargs)
        return {**writer.commit(cache, footage=footage), "skipped": False}
