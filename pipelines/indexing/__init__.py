"""Distributed indexing: video archives (prefix, glob, manifest, .tar shards) → StateKV caches, with Ray Data.

    from pipelines.indexing import IndexConfig, run_index
    summary = run_index(IndexConfig(input="s3://videos/", output="s3://caches/", model="Qwen/Qwen2-VL-2B-Instruct"))
"""

from pipelines.indexing.actor import IndexActor, PrefetchSource
from pipelines.indexing.config import IndexConfig
from pipelines.indexing.inputs import list_inputs
from pipelines.indexing.pipeline import IndexRunError, build, run_index
from pipelines.indexing.probe import probe_inputs
from pipelines.indexing.report import ReportWriter, Summary, read_report, read_summary, write_report

__all__ = ["IndexActor", "IndexConfig", "IndexRunError", "PrefetchSource", "ReportWriter", "Summary", "build",
           "list_inputs", "probe_inputs", "read_report", "read_summary", "run_index", "write_report"]
