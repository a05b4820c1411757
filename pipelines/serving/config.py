"""Settings of the query service: one dataclass, built from CLI flags or from a Serve config's `args`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from statekv.store import StorageOptions


@dataclass
class ServiceConfig:
    """What one query-service application needs: the model, the cache root, limits and resources."""

    model: str  # checkpoint directory or hub id, loaded once per replica
    caches_root: str  # local directory or s3://bucket/prefix; only caches directly under it are served
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, a loopback server)
    region: str | None = None
    storage_options: dict[str, Any] | None = None  # extra fsspec/s3fs options (key, secret, config_kwargs, ...)
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # float32 / bfloat16 / float16 (default: bfloat16 on cuda, float32 on cpu)
    lru_bytes: int = 4 << 30  # host memory for loaded caches, per replica
    device_cache_bytes: int = 2 << 30  # accelerator memory for answer contexts (the video KV, built), per replica
    batching: bool = True  # decode concurrent questions about one video together (False: one at a time)
    max_batch: int = 32  # questions about one video decoded together at most
    max_question_chars: int = 4000  # a cheap bound checked before tokenizing (422 above it)
    max_question_tokens: int = 1024  # the question's limit in tokens, chat template included (413 above it)
    max_new_tokens_limit: int = 512  # the schema's maximum of max_new_tokens
    retry_after_s: int = 5  # Retry-After of a 503 when the store is unreachable
    revalidate_s: float = 1.0  # a kept cache re-prefilled under its id is served stale for at most this long
    # who may ask (auth.py): a key file mounted into the replicas (never the keys themselves in this config); without
    # one the service answers loopback clients only, unless no_auth opens it to every client on purpose
    api_keys_file: str | None = None
    no_auth: bool = False
    keys_check_s: float = 1.0  # the key file is checked for changes at most this often (rotation, revocation)
    audit_questions: bool = False  # put the question text in the audit log (off: never logged)
    # each key's limits per replica (a key's `limits` in the key file override them)
    key_requests_per_s: float = 5.0
    key_request_burst: float = 20.0
    key_tokens_per_s: float = 1000.0
    key_token_burst: float = 8192.0
    key_max_concurrent: int = 4
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_ongoing_requests: int = 16
    autoscaling: dict[str, Any] = field(default_factory=lambda: {
        "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (checkpoint directory or hub id)")
        if not self.caches_root:
            raise ValueError("caches_root is required (local directory or s3://bucket/prefix)")
        if int(self.device_cache_bytes) < 0:
            raise ValueError(f"device_cache_bytes must be >= 0, got {self.device_cache_bytes}")
        for name in ("lru_bytes", "max_batch", "max_question_chars", "max_question_tokens", "max_new_tokens_limit",
                     "max_ongoing_requests"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.revalidate_s >= 0:
            raise ValueError(f"revalidate_s must be >= 0, got {self.revalidate_s}")
        if self.api_keys_file and self.no_auth:
            raise ValueError("api_keys_file and no_auth exclude each other: keys close the service, no_auth opens it")
        if not self.keys_check_s >= 0:
            raise ValueError(f"keys_check_s must be >= 0, got {self.keys_check_s}")
        self.limits()  # each must be > 0
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_gpus and num_cpus must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServiceConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown query-service settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def limits(self):
        """The per-key limits every key gets unless its entry in the key file overrides them."""
        from pipelines.serving.limits import Limits

        return Limits(requests_per_s=self.key_requests_per_s, request_burst=self.key_request_burst,
                      tokens_per_s=self.key_tokens_per_s, token_burst=self.key_token_burst,
                      max_concurrent=self.key_max_concurrent)

    def storage(self) -> dict[str, Any] | None:
        """fsspec options for the cache root (None for local roots with no settings)."""
        opts = StorageOptions(endpoint_url=self.endpoint_url, region=self.region).to_fsspec()
        if self.storage_options:
            extra = dict(self.storage_options)
            client = {**opts.get("client_kwargs", {}), **extra.pop("client_kwargs", {})}
            opts.update(extra)
            if client:
                opts["client_kwargs"] = client
        return opts or None
