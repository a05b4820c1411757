"""The run report: one Parquet row per video under `<output>/_reports/run-<timestamp>/`, and its summary."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from statekv.store.fs import StorageOptionsLike, put_atomic, resolve

REPORTS_DIR = "_reports"
REPORT_FILE = "report.parquet"
PARTS_DIR = "parts"  # rows written as videos finish; merged into report.parquet when the run ends
REPORT_COLUMNS = ("video_id", "source", "status", "chunks", "tokens", "frames", "bytes_written", "seconds",
                  "decode_wait_s", "peak_bytes", "maxrss_delta_bytes", "error")


class ReportWriter:
    """The report of one run, durable as it grows: each `add` writes its rows as one Parquet part at once.

    A killed driver therefore leaves `<run>/parts/part-*.parquet` with every row it had received (`read_report`
    reads them); `close` writes `<run>/report.parquet` with all rows and removes the parts.
    """

    def __init__(self, output: str, storage_options: StorageOptionsLike = None, *, started: float) -> None:
        stamp = dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self.run_uri = f"{output.rstrip('/')}/{REPORTS_DIR}/run-{stamp}"
        self.uri = f"{self.run_uri}/{REPORT_FILE}"
        self.storage_options = storage_options
        self.rows: list[dict[str, Any]] = []
        self._parts = 0
        self._fs, self._path = resolve(self.run_uri, storage_options)
        self._fs.makedirs(f"{self._path}/{PARTS_DIR}", exist_ok=True)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Append `rows` and write them as the next part before returning."""
        if not rows:
            return
        self.rows.extend(rows)
        _write_table(self._fs, f"{self._path}/{PARTS_DIR}/part-{self._parts:06d}.parquet", rows)
        self._parts += 1

    def close(self) -> str:
        """Write every row as `report.parquet`, drop the parts; returns the report's URI."""
        _write_table(self._fs, f"{self._path}/{REPORT_FILE}", self.rows)
        if self._fs.exists(f"{self._path}/{PARTS_DIR}"):
            self._fs.rm(f"{self._path}/{PARTS_DIR}", recursive=True)
        return self.uri


def write_report(rows: list[dict[str, Any]], output: str, storage_options: StorageOptionsLike = None, *,
                 started: float) -> str:
    """Write `rows` as `report.parquet` of a new run folder; returns its URI."""
    writer = ReportWriter(output, storage_options, started=started)
    writer.rows = list(rows)
    return writer.close()


def _write_table(fs, path: str, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as one Parquet object, atomically (a reader or a kill never sees half of it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r[k] for k in REPORT_COLUMNS} for r in rows], schema=report_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    put_atomic(fs, path, sink.getvalue().to_pybytes())


def report_schema():
    import pyarrow as pa

    return pa.schema([("video_id", pa.string()), ("source", pa.string()), ("status", pa.string()),
                      ("chunks", pa.int64()), ("tokens", pa.int64()), ("frames", pa.int64()),
                      ("bytes_written", pa.int64()), ("seconds", pa.float64()), ("decode_wait_s", pa.float64()),
                      ("peak_bytes", pa.int64()), ("maxrss_delta_bytes", pa.int64()), ("error", pa.string())])


def read_report(uri: str, storage_options: StorageOptionsLike = None) -> list[dict[str, Any]]:
    """Rows of a report: `<run>/report.parquet`, or a run folder (its report, or the parts a killed run left)."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri, storage_options)
    if not path.endswith(".parquet"):
        if fs.exists(f"{path}/{REPORT_FILE}"):
            path = f"{path}/{REPORT_FILE}"
        else:
            parts = sorted(fs.glob(f"{path}/{PARTS_DIR}/part-*.parquet"))
            if not parts:
                raise FileNotFoundError(f"report {uri!r}: no {REPORT_FILE} and no parts")
            rows = []
            for part in parts:
                with fs.open(part, "rb") as f:
                    rows += pq.read_table(f).to_pylist()
            return rows
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


@dataclass
class Summary:
    videos: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    chunks: int = 0
    frames: int = 0
    tokens: int = 0
    bytes_written: int = 0
    wall_s: float = 0.0
    busy_s: float = 0.0  # actor seconds spent on ok videos
    decode_wait_s: float = 0.0  # of which waiting for decoded frames
    report_uri: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, rows: list[dict[str, Any]], *, wall_s: float) -> "Summary":
        ok = [r for r in rows if r["status"] == "ok"]
        return cls(videos=len(rows), ok=len(ok), skipped=sum(r["status"] == "skipped" for r in rows),
                   failed=sum(r["status"] == "failed" for r in rows), chunks=sum(r["chunks"] for r in ok),
                   frames=sum(r["frames"] for r in ok), tokens=sum(r["tokens"] for r in ok),
                   bytes_written=sum(r["bytes_written"] for r in ok), wall_s=wall_s,
                   busy_s=sum(r["seconds"] for r in ok), decode_wait_s=sum(r["decode_wait_s"] for r in ok),
                   rows=rows)

    @property
    def decode_wait_share(self) -> float:
        return self.decode_wait_s / self.busy_s if self.busy_s else 0.0

    def text(self) -> str:
        lines = [f"{self.videos} video(s): {self.ok} indexed, {self.skipped} skipped, {self.failed} failed; "
                 f"{self.chunks} chunks, {self.tokens} tokens, {self.bytes_written / 2**20:.1f} MiB written "
                 f"in {self.wall_s:.1f} s (actors waited on decoding {100 * self.decode_wait_share:.1f}% "
                 "of their time)"]
        lines += [f"  failed {r['video_id']} ({r['source']}): {r['error']}"
                  for r in self.rows if r["status"] == "failed"]
        if self.report_uri:
            lines.append(f"report: {self.report_uri}")
        return "\n".join(lines)
