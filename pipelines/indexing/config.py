"""Settings of one indexing run: a plain dataclass the entry point fills and every stage receives."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from statekv.settings import PrefillSettings
from statekv.store.cache_store import CacheStore


@dataclass
class IndexConfig:
    input: str  # prefix, glob, manifest (.csv/.jsonl/.parquet) or .tar shard(s), local or s3://
    output: str  # cache root: caches at <output>/<video_id>/, reports at <output>/_reports/
    model: str  # checkpoint directory or hub id, loaded once per actor
    actors: int = 1  # model actors (one model each)
    gpus_per_actor: float = 0.0  # 0 runs CPU actors
    decode_cpus: float = 1.0  # CPUs reserved per actor: its decode thread (and, on CPU actors, the model)
    prefill: PrefillSettings = field(default_factory=PrefillSettings)  # policy, sampling, chunking (statekv.settings)
    int8: bool = False  # store K/V as int8 with scales
    overwrite: bool = False  # redo committed caches too (default: skip them)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec/s3fs options for input and output
    backend: str = "auto"  # video decoder: auto (decord, PyAV fallback) | decord | pyav
    device: str | None = None  # default: cuda when the actor has a GPU
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)
    prefetch_batches: int = 4  # decoded frame batches queued ahead of the model, per actor
    scratch_dir: str | None = None  # local folder for fetched videos (default: the system temp dir)
    track_memory: bool = False  # measure peak tensor memory per video (costly on CPU)
    store_buffer_mib: float = 2.0  # chunk rows a writer holds before one Parquet write (0: write each at once)
    stage_times: bool = True  # time each video's stages (report's <stage>_s; on CUDA: a device sync per stage)
    log_every: int = 16  # log a video's chunk count every N chunks
    probe_threads: int = 16  # driver threads listing shards and probing inputs (metadata I/O only)
    video_hook: str | None = None  # "module:function" the actor calls as fn(row, **video_hook_args) before
    #                                indexing each row (fault injection: pipelines.indexing.faults); what it raises
    #                                fails that row
    video_hook_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if hasattr(self.storage_options, "to_fsspec"):  # a statekv.store.StorageOptions
            self.storage_options = self.storage_options.to_fsspec()
        self.storage_options = dict(self.storage_options or {})
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.probe_threads < 1:
            raise ValueError(f"probe_threads must be >= 1, got {self.probe_threads}")
        if self.gpus_per_actor < 0 or self.decode_cpus <= 0:
            raise ValueError("gpus_per_actor must be >= 0 and decode_cpus > 0")
        if isinstance(self.prefill, dict):  # from `to_dict` (how the config travels to the actors)
            self.prefill = PrefillSettings(**self.prefill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_store(self) -> CacheStore:
        """The output root's `CacheStore` (caches at `<output>/<video_id>`); made where it is used, never shipped
        to an actor (its filesystem client belongs to the process that made it)."""
        return CacheStore(self.output, storage_options=self.storage_options)
