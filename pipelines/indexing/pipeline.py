"""The indexing run: list → expand shards and probe (driver threads) → model actors (Ray Data) → report rows.

Every `map_batches` / resource setting lives in `build()` (Ray's argument names drift between releases). Only
rows left to do after the probe reach Ray, so a rerun with nothing to do starts no actor (and no local Ray).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipelines import cluster
from pipelines.indexing.actor import IndexActor, report_row
from pipelines.indexing.config import IndexConfig
from pipelines.indexing.inputs import list_inputs
from pipelines.indexing.probe import probe_inputs
from pipelines.indexing.report import ReportWriter, Summary, format_shares, shares, stage_seconds
from statekv.errors import StateKVError

logger = logging.getLogger(__name__)

CREDENTIALS_HINT = ("a job started with `ray job submit` does not see the submitting shell's environment: pass "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the runtime env's "
                    "env_vars, or give the nodes an instance profile (IRSA on Kubernetes)")


class IndexRunError(StateKVError, RuntimeError):
    """The run itself could not proceed (inputs not listable, no credentials, model actors failing to start).

    A StateKVError, so `statekv index` and `python -m jobs.index_videos` print it as their one-line error.
    """


def build(config: IndexConfig, rows: list[dict[str, Any]]):
    """The dataset of report rows for the probed `rows` still to index (lazy: consuming it runs the actors)."""
    import ray

    # about one row per block, so that every actor gets videos (a block is one actor task, its rows in sequence)
    blocks = max(1, min(len(rows), max(64, 16 * config.actors)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.map_batches(
        IndexActor,
        fn_constructor_kwargs={"config": config.to_dict()},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.decode_cpus,
        batch_size=1,  # one video per call: a video is already a stream of chunks
    )


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` ("auto" = the one on this node) with this shell's storage credentials, or
    start a local one (`pipelines.cluster.init_ray`)."""
    cluster.init_ray(address, log_to_driver=True)


def run_index(config: IndexConfig, *, address: str | None = None, echo=print) -> Summary:
    """Run the job to the end: index every video, write the report as rows arrive, return (and echo) the summary.

    Per-video failures are report rows. IndexRunError when the run cannot proceed; the report of what was done
    is still written (and named in the error).
    """
    from botocore.exceptions import NoCredentialsError

    try:
        return _run(config, address, echo)
    except NoCredentialsError as err:  # listing the input, or writing the report to an s3:// output
        raise IndexRunError(f"no AWS credentials to list {config.input!r} or write {config.output!r} ({err}); "
                            f"{CREDENTIALS_HINT}") from err


def _run(config: IndexConfig, address: str | None, echo) -> Summary:
    started = time.time()
    rows = _list(config)
    report = ReportWriter(config.output, config.storage_options, started=started)
    probed = probe_inputs(rows, config)
    todo = [r for r in probed if not r["status"]]
    echo(f"{len(probed)} video(s) in {config.input}: {len(todo)} to index into {config.output}, "
         f"{sum(r['status'] == 'skipped' for r in probed)} already committed, "
         f"{sum(r['status'] == 'failed' for r in probed)} failed the probe")
    _add(report, [report_row(r, r["status"], error=r["error"]) for r in probed if r["status"]], echo)
    failure: BaseException | None = None
    if todo:
        echo(f"starting {config.actors} model actor(s), {config.gpus_per_actor} GPU(s) each")
        finished: set[str] = set()
        try:
            init_ray(address)
            for row in build(config, todo).iter_rows():
                _add(report, [dict(row)], echo)
                finished.add(row["video_id"])
        except BaseException as err:  # noqa: BLE001 - the report is written first, then the run's error raised
            failure = err
            reason = f"not indexed: the run stopped ({type(err).__name__})"
            report.rows.extend(report_row(r, "failed", error=reason) for r in todo if r["video_id"] not in finished)
    summary = Summary.of(report.rows, wall_s=time.time() - started)
    summary.report_uri = report.uri
    report.close(summary.to_dict())
    echo(summary.text())
    if failure is not None:
        if not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt, SystemExit: the report is written, the interruption goes on
        raise IndexRunError(f"the run stopped after {len(finished)} of {len(todo)} video(s): "
                            f"{type(failure).__name__}: {_first_line(failure)}; report: {summary.report_uri}") \
            from failure
    return summary


def _list(config: IndexConfig) -> list[dict[str, Any]]:
    """The input rows; a listing that fails for want of permission is the run's error."""
    try:
        return list_inputs(config.input, config.storage_options)
    except PermissionError as err:
        raise IndexRunError(f"permission denied listing {config.input!r}: {err}") from err


def _add(report: ReportWriter, rows: list[dict[str, Any]], echo) -> None:
    start = len(report.rows)
    report.add(rows)
    for i, row in enumerate(rows, start + 1):
        echo(f"[{i}] {row['status']:<7} {row['video_id']}"
             + (f": {row['chunks']} chunks in {row['seconds']:.1f} s "
                f"({format_shares(shares(stage_seconds(row), row['seconds']))})" if row["status"] == "ok" else "")
             + (f" ({row['error']})" if row["error"] else ""))


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else ""
