"""Settings of one indexing run: a plain dataclass the entry point fills and every stage receives."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from statekv.cache import check_answer_from
from statekv.policies import POLICIES


@dataclass
class IndexConfig:
    input: str  # prefix, glob, manifest (.csv/.jsonl/.parquet) or .tar shard(s), local or s3://
    output: str  # cache root: caches at <output>/<video_id>/, reports at <output>/_reports/
    model: str  # checkpoint directory or hub id, loaded once per actor
    actors: int = 1  # model actors (one model each)
    gpus_per_actor: float = 0.0  # 0 runs CPU actors
    decode_cpus: float = 1.0  # CPUs reserved per actor: its decode thread (and, on CPU actors, the model)
    policy: str = "statekv"  # one of statekv.policies.POLICIES
    capacity: int = 4096  # carried tokens per layer and KV head (statekv, window; the budget of infinipot)
    answer_from: str = "chunks"  # chunks: store every chunk's KV | state: only the bounded carried state
    compression: dict[str, Any] | None = None  # write-time compression settings, e.g. {"name": "guided", "keep": 0.6}
    fps: float = 2.0  # frames sampled per second of video
    max_frames: int | None = None  # cap on sampled frames per video (None: no cap; a cap that lowers fps warns)
    min_pixels: int | None = None  # per frame after resizing (default: SamplingConfig's)
    max_pixels: int | None = None
    chunks_per_step: int = 1  # temporal chunks per model call
    vision_batch_frames: int = 16  # frames per vision-tower call, in whole steps (statekv's Engine default)
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
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; valid policies: {', '.join(POLICIES)}")
        check_answer_from(self.answer_from, self.compression)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
