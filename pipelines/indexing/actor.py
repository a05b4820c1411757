"""The model actor: one engine per actor, one video at a time, decoding overlapped with the model.

`IndexActor` is a plain class (model built in `__init__`, work in `__call__`), so tests call it on a hand-made
batch with no Ray running; `pipeline.build` wraps it in `map_batches(..., compute=ActorPoolStrategy(...))`.

Overlap: a background thread decodes frame batches (decord/PyAV, through `statekv.video.open_video`) into a
bounded queue while the engine runs the model on the previous batch (`PrefetchSource`). Memory per video is
bounded by the queue depth times one batch, whatever the video's length; the time the model waits on the queue
is measured and reported (`decode_wait_s`).

Where each video's time goes: `index_one` measures it with `statekv.profiling.measure_stages` (fetch, decode,
preprocess, vision tower, language model, store writes, other), and the row carries the seconds per stage (see
report.py). On CUDA each stage boundary then synchronises the device (`IndexConfig.stage_times=False` turns the
measurement off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.indexing.config import IndexConfig
from pipelines.indexing.inputs import fetch_file, fetch_member
from pipelines.indexing.report import FETCH, REPORT_COLUMNS, STAGE_COLUMNS, STAGE_NAMES
from statekv.errors import VideoNotFoundError
from statekv.profiling import OTHER, StageTimer, measure_stages, stage
from statekv.video import ClipSource, iter_frame_batches, open_video

logger = logging.getLogger(__name__)

def report_row(row: dict[str, Any], status: str, *, error: str = "", **fields: Any) -> dict[str, Any]:
    """The report row of input `row`: its id, source and `status`, zeros for the figures `fields` leaves out."""
    source = row["uri"] + (f"#{row['member']}" if row.get("member") else "")
    out = {"video_id": row["video_id"], "source": source, "status": status, "chunks": 0, "tokens": 0,
           "frames": 0, "bytes_written": 0, "seconds": 0.0, "decode_wait_s": 0.0, "peak_bytes": 0,
           "maxrss_delta_bytes": 0, "error": error, **dict.fromkeys(STAGE_COLUMNS, 0.0)}
    out.update(fields)
    return out


# --- frame sources ---------------------------------------------------------------------------------------------


_DONE = object()


class PrefetchSource:
    """Decode `base`'s frame batches on a background thread, at most `depth` batches ahead of the consumer.

    `wait_s` adds up the time the consumer (the model) spent waiting for a decoded batch.
    """

    def __init__(self, base, depth: int = 4) -> None:
        self.base, self.depth = base, max(1, depth)
        self.source, self.fps, self.num_frames = base.source, base.fps, base.num_frames
        self.height, self.width = base.height, base.width
        self.frame_times, self.start_time = getattr(base, "frame_times", None), getattr(base, "start_time", 0.0)
        self.wait_s = 0.0
        self.frames = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.base.read(indices)

    def iter_batches(self, indices: np.ndarray, batch_frames: int) -> Iterator[np.ndarray]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)

        def put(item) -> bool:
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in iter_frame_batches(self.base, indices, batch_frames):
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
                put(err)

        self._thread = threading.Thread(target=produce, name=f"decode-{os.getpid()}", daemon=True)
        self._thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.frames += len(item)
                yield item
        finally:
            self._stop.set()
            self._thread.join()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.base.close()


# --- batches <-> rows ----------------------------------------------------------------------------------------


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: _py(batch[k][i]) for k in names} for i in range(n)]


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _columns(rows: list[dict[str, Any]], names) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
            for k in names} if rows else {k: np.array([]) for k in names}


# --- the model actor ---------------------------------------------------------------------------------------------


class IndexActor:
    """Holds one engine; `__call__` indexes each row of a batch and returns one report row per video."""

    def __init__(self, config: IndexConfig | dict[str, Any]) -> None:
        import torch

        from statekv import Engine

        self.config = config if isinstance(config, IndexConfig) else IndexConfig(**config)
        c = self.config
        # our progress at INFO; other libraries' INFO (botocore's "Found credentials ..." on every S3 client) stays out
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in ("pipelines", "statekv"):
            logging.getLogger(name).setLevel(logging.INFO)
        self.engine = Engine.from_settings(c.model, c.prefill, device=c.device,
                                           dtype=getattr(torch, c.dtype) if c.dtype else None)
        self.store = c.cache_store()
        self._hook = _load_hook(c.video_hook) if c.video_hook else None
        logger.info("actor %d ready: %s on %s", os.getpid(), c.model, self.engine.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.index_one(row) for row in _rows(batch)]
        return _columns(out, REPORT_COLUMNS)

    def index_one(self, row: dict[str, Any]) -> dict[str, Any]:
        """Index one video row; whatever goes wrong with this video becomes its failed report row.

        Any exception is caught here, not only the expected video and store errors: a missing decoder, a
        permission error on one object or an accelerator out-of-memory on one long video must not end a run over
        thousands of videos and lose its report. The row keeps the exception's type and message, the actor's log
        the traceback. What makes the whole run impossible (the model does not load) fails in `__init__` instead.
        """
        if row["status"] == "skipped":
            return report_row(row, "skipped", error=row["error"])
        if row["status"] == "failed":
            return report_row(row, "failed", error=row["error"])
        start = time.perf_counter()
        timer = StageTimer(device=self.engine.device) if self.config.stage_times else None
        with measure_stages(self.engine.adapter, timer=timer) if timer is not None else contextlib.nullcontext():
            try:
                if self._hook is not None:
                    self._hook(row, **self.config.video_hook_args)
                out = self._index(row, start)
            except Exception as err:  # noqa: BLE001 - one video's failure, of any type, is that video's row
                logger.warning("%s failed: %s: %s", row["video_id"], type(err).__name__, err, exc_info=True)
                self._recover()
                out = report_row(row, "failed", error=f"{type(err).__name__}: {err}")
        if timer is None:
            return {**out, "seconds": time.perf_counter() - start}
        return {**out, **stage_fields(timer)}

    def _recover(self) -> None:
        """Give back what a failed video held on the accelerator (an out-of-memory leaves its tensors cached)."""
        import gc

        import torch

        gc.collect()
        if torch.device(self.engine.device).type == "cuda":
            torch.cuda.empty_cache()

    def _index(self, row: dict[str, Any], start: float) -> dict[str, Any]:
        c = self.config
        scratch = None
        try:
            if row["member"]:  # a tar member: its bytes go to local scratch, then to the decoder
                suffix = os.path.splitext(row["member"])[1]
                fd, scratch = tempfile.mkstemp(prefix="statekv-index-", suffix=suffix, dir=c.scratch_dir)
                os.close(fd)
                try:
                    with stage(FETCH):
                        fetch_member(row, scratch, c.storage_options)
                except FileNotFoundError as err:
                    raise VideoNotFoundError(row["uri"], "shard not found") from err
                local = scratch
            elif "://" in row["uri"] and not row["uri"].startswith("file://"):
                suffix = os.path.splitext(row["uri"])[1]
                fd, scratch = tempfile.mkstemp(prefix="statekv-index-", suffix=suffix, dir=c.scratch_dir)
                os.close(fd)
                try:
                    with stage(FETCH):
                        fetch_file(row["uri"], scratch, c.storage_options)
                except FileNotFoundError as err:
                    raise VideoNotFoundError(row["uri"], "no such file") from err
                local = scratch
            else:
                local = row["uri"]
            return self._prefill(row, local, start)
        finally:
            if scratch is not None and os.path.exists(scratch):
                os.remove(scratch)

    def _prefill(self, row: dict[str, Any], local: str, start: float) -> dict[str, Any]:
        from statekv.profiling import peak_memory

        c = self.config
        video_id = row["video_id"]
        base = open_video(local, backend=c.backend, name=_source_name(row, c))  # errors name the input, not scratch
        try:
            source = PrefetchSource(ClipSource(base, row["start"], row["end"]), depth=c.prefetch_batches)
        except BaseException:
            base.close()
            raise
        source.source = _source_name(row, c)
        progress = self._progress(video_id)
        rss0 = _maxrss()
        mode = "overwrite" if c.overwrite else "skip"
        try:
            with peak_memory(self.engine.device) if c.track_memory else contextlib.nullcontext() as mem:
                manifest = self.store.prefill(self.engine, source, video_id, mode=mode, int8=c.int8,
                                              progress=progress,
                                              writer_kwargs={"buffer_bytes": int(c.store_buffer_mib * 2**20)})
        finally:
            source.close()
        if manifest["skipped"]:  # committed after the probe looked (a retried or concurrent task)
            return report_row(row, "skipped", error="committed cache exists")
        peak = mem.peak_bytes if mem is not None else 0
        totals = manifest["totals"]
        seconds = time.perf_counter() - start  # for the log: index_one sets the row's (the stage timer's wall time)
        logger.info("%s committed: %d chunks, %d tokens, %d bytes in %.1f s (waited %.2f s on decoding)",
                    video_id, totals["chunks"], totals["tokens"], totals["bytes"], seconds, source.wait_s)
        return report_row(row, "ok", chunks=totals["chunks"], tokens=totals["tokens"], frames=source.frames,
                          bytes_written=totals["bytes"], seconds=seconds, decode_wait_s=source.wait_s,
                          peak_bytes=int(peak), maxrss_delta_bytes=_maxrss() - rss0)

    def _progress(self, video_id: str):
        every = max(1, self.config.log_every)

        def progress(done: int, total: int) -> None:
            if done == total or done % every == 0:
                logger.info("%s: %d/%d chunks", video_id, done, total)

        return progress


def stage_fields(timer: StageTimer) -> dict[str, float]:
    """A report row's `seconds` and `<stage>_s` from the timer that measured its video (they add up)."""
    out = {f"{name}_s": timer.seconds.get(name, 0.0) for name in STAGE_NAMES}
    unknown = set(timer.seconds) - set(STAGE_NAMES)
    if unknown:  # a stage the report has no column for would silently land in `other`
        raise ValueError(f"stages {sorted(unknown)} have no report column (known: {', '.join(STAGE_NAMES)})")
    return {**out, f"{OTHER}_s": timer.other_s(), "seconds": timer.wall_s}


def _source_name(row: dict[str, Any], config: IndexConfig) -> str:
    """The video's name in the cache's manifest: its URI, and the member's name for a tar shard."""
    return row["uri"] + (f"#{row['member']}" if row["member"] else "")


def _load_hook(spec: str):
    """The function named `module:function` (IndexConfig.video_hook)."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"video_hook {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
