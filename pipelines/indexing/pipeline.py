"""The Ray Data pipeline: list → expand shards → probe → model actors → report rows.

Every `map_batches` / resource setting lives in `build()` (Ray's argument names drift between releases).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from pipelines.indexing.actor import IndexActor, probe_rows
from pipelines.indexing.config import IndexConfig
from pipelines.indexing.inputs import expand_shard, list_inputs
from pipelines.indexing.report import Summary, write_report

logger = logging.getLogger(__name__)

PROBE_CPUS = 0  # metadata I/O only: must run even when the actors hold every CPU of the cluster


def build(config: IndexConfig, rows: list[dict[str, Any]] | None = None):
    """The dataset of report rows for `config` (lazy: consuming it runs the job)."""
    import ray

    rows = list_inputs(config.input, config.storage_options) if rows is None else rows
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
    ds = ds.flat_map(functools.partial(expand_shard, storage_options=config.storage_options),
                     num_cpus=PROBE_CPUS)
    # one row per block, so that every model actor gets videos (a bigger batch would merge them into one block)
    ds = ds.map_batches(probe_rows, fn_kwargs={"config": config}, batch_size=1, num_cpus=PROBE_CPUS)
    ds = ds.map_batches(
        IndexActor,
        fn_constructor_kwargs={"config": config.to_dict()},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.decode_cpus,
        batch_size=1,  # one video per call: a video is already a stream of chunks
    )
    return ds


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` ("auto" = the one on this node), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(log_to_driver=True)


def run_index(config: IndexConfig, *, address: str | None = None, echo=print) -> Summary:
    """Run the job to the end: index every video, write the report, return (and echo) the summary."""
    init_ray(address)
    started = time.time()
    rows = list_inputs(config.input, config.storage_options)
    echo(f"indexing {len(rows)} input(s) from {config.input} into {config.output} "
         f"with {config.actors} actor(s), {config.gpus_per_actor} GPU(s) each")
    report = []
    for row in build(config, rows).iter_rows():
        report.append(dict(row))
        echo(f"[{len(report)}] {row['status']:<7} {row['video_id']}"
             + (f": {row['chunks']} chunks in {row['seconds']:.1f} s" if row["status"] == "ok" else "")
             + (f" ({row['error']})" if row["error"] else ""))
    summary = Summary.of(report, wall_s=time.time() - started)
    summary.report_uri = write_report(report, config.output, config.storage_options, started=started)
    echo(summary.text())
    return summary
