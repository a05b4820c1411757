"""The run report: one Parquet row per video under `<output>/_reports/run-<timestamp>/`, and its summary.

Each row carries where its actor's wall time went (`<stage>_s`, measured by `statekv.profiling.StageTimer` where the
work happens): fetching a remote input to scratch, pulling decoded frames, preprocessing, the vision tower, the
language model, writing the store, and `other_s` (what no stage claimed: policy updates, copies off the device,
bookkeeping); they add up to `seconds`. The summary gives the shares per video and over the run, as text and as
`summary.json` next to `report.parquet`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from statekv.profiling import OTHER, STAGES
from statekv.store.fs import StorageOptionsLike, put_atomic, resolve

REPORTS_DIR = "_reports"
REPORT_FILE = "report.parquet"
SUMMARY_FILE = "summary.json"
FETCH = "fetch"  # the actor's own stage: copying a remote video (or a tar member) to local scratch
STAGE_NAMES = (FETCH, *STAGES)
SHARE_NAMES = (*STAGE_NAMES, OTHER)  # every part of a video's actor time, in the order the report shows them
STAGE_COLUMNS = tuple(f"{name}_s" for name in SHARE_NAMES)
PARTS_DIR = "parts"  # rows written as videos finish; merged into report.parquet when the run ends
REPORT_COLUMNS = ("video_id", "source", "status", "chunks", "tokens", "frames", "bytes_written", "seconds",
                  "decode_wait_s", *STAGE_COLUMNS, "peak_bytes", "maxrss_delta_bytes", "error")


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

    def close(self, summary: dict[str, Any] | None = None) -> str:
        """Write every row as `report.parquet` (and `summary`, if given, as `summary.json`), drop the parts;
        returns the report's URI."""
        _write_table(self._fs, f"{self._path}/{REPORT_FILE}", self.rows)
        if summary is not None:
            put_atomic(self._fs, f"{self._path}/{SUMMARY_FILE}", json.dumps(summary, indent=1).encode())
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
                      *((name, pa.float64()) for name in STAGE_COLUMNS), ("peak_bytes", pa.int64()),
                      ("maxrss_delta_bytes", pa.int64()), ("error", pa.string())])


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


def read_summary(uri: str, storage_options: StorageOptionsLike = None) -> dict[str, Any]:
    """The `summary.json` of a finished run (`<run>` folder or its `report.parquet`)."""
    fs, path = resolve(uri, storage_options)
    if path.endswith(".parquet"):
        path = path.rsplit("/", 1)[0]
    with fs.open(f"{path}/{SUMMARY_FILE}", "rb") as f:
        return json.loads(f.read())


def stage_seconds(row: dict[str, Any]) -> dict[str, float]:
    """{stage: seconds} of a report row, `other` included (zeros for a report written before stages existed)."""
    return {name: float(row.get(f"{name}_s") or 0.0) for name in SHARE_NAMES}


def shares(seconds: dict[str, float], total: float) -> dict[str, float]:
    """Each part's share of `total` seconds (zeros when nothing was timed)."""
    return {name: (seconds.get(name, 0.0) / total if total > 0 else 0.0) for name in SHARE_NAMES}


def format_shares(parts: dict[str, float]) -> str:
    """'decode 3.1%, preprocess 5.0%, ...' in the report's order."""
    return ", ".join(f"{name} {100 * parts.get(name, 0.0):.1f}%" for name in SHARE_NAMES)


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
    stage_s: dict[str, float] = field(default_factory=dict)  # busy_s by stage (`other` included), ok videos
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
                   stage_s={name: sum(stage_seconds(r)[name] for r in ok) for name in SHARE_NAMES}, rows=rows)

    @property
    def decode_wait_share(self) -> float:
        return self.decode_wait_s / self.busy_s if self.busy_s else 0.0

    @property
    def stage_shares(self) -> dict[str, float]:
        """Share of the actors' time on ok videos per stage (`other` included; they sum to 1)."""
        return shares(self.stage_s, self.busy_s)

    def video_shares(self) -> list[dict[str, Any]]:
        """Per ok video: its id, actor seconds, and seconds and share per stage."""
        return [{"video_id": r["video_id"], "seconds": r["seconds"], "stage_s": stage_seconds(r),
                 "stage_shares": shares(stage_seconds(r), r["seconds"])} for r in self.rows if r["status"] == "ok"]

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-able data (what `summary.json` holds): counts, totals, shares overall and per video."""
        counts = {k: getattr(self, k) for k in ("videos", "ok", "skipped", "failed", "chunks", "frames", "tokens",
                                                 "bytes_written", "wall_s", "busy_s", "decode_wait_s")}
        return {**counts, "report_uri": self.report_uri, "stage_s": self.stage_s,
                "stage_shares": self.stage_shares, "per_video": self.video_shares(),
                "failures": [{"video_id": r["video_id"], "source": r["source"], "error": r["error"]}
                             for r in self.rows if r["status"] == "failed"]}

    def text(self, *, max_videos: int = 20) -> str:
        """Human-readable: totals, the actors' time by stage, the same per video (the slowest `max_videos`)."""
        lines = [f"{self.videos} video(s): {self.ok} indexed, {self.skipped} skipped, {self.failed} failed; "
                 f"{self.chunks} chunks, {self.tokens} tokens, {self.bytes_written / 2**20:.1f} MiB written "
                 f"in {self.wall_s:.1f} s (actors waited on decoding {100 * self.decode_wait_share:.1f}% "
                 "of their time)"]
        if self.ok:
            lines.append(f"actor time {self.busy_s:.1f} s: {format_shares(self.stage_shares)}")
            videos = sorted(self.video_shares(), key=lambda v: -v["seconds"])
            lines += [f"  {v['video_id']} {v['seconds']:.1f} s: {format_shares(v['stage_shares'])}"
                      for v in videos[:max_videos]]
            if len(videos) > max_videos:
                lines.append(f"  ... {len(videos) - max_videos} more video(s) in {SUMMARY_FILE}")
        lines += [f"  failed {r['video_id']} ({r['source']}): {r['error']}"
                  for r in self.rows if r["status"] == "failed"]
        if self.report_uri:
            lines.append(f"report: {self.report_uri}")
        return "\n".join(lines)
