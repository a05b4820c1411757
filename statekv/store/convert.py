"""The mapping between a `VideoKVCache` and its manifest keys (written by the writer, read by the reader)."""

from __future__ import annotations

from typing import Any

from statekv.cache import ModelInfo, PrefillConfig, VideoInfo, VideoKVCache
from statekv.store import serde


def describe_cache(cache: VideoKVCache, position_rows: int | None) -> dict[str, Any]:
    """The manifest keys that describe a `VideoKVCache` (everything but files, totals and commit metadata).

    Generic keys only; the family's own bookkeeping is the adapter's opaque cursor under "family" (the one
    family-specific place in the manifest).
    """
    m, v = cache.model, cache.video
    return {
        "model": {"name_or_path": m.name_or_path, "model_type": m.model_type, "fingerprint": m.fingerprint,
                  "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                  "linear_layers": list(m.linear_layers), "layout_version": m.layout_version,
                  "transformers_version": m.transformers_version},
        "dtype": serde.dtype_name(cache.dtype),
        "layout": {"num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                   "position_rows": position_rows, "layer_types": m.layer_types},
        "prefill": cache.config.to_dict(),
        "video": {"source": v.source, "video_fps": v.video_fps, "total_frames": v.total_frames,
                  "sampled_fps": v.sampled_fps, "frame_size": list(v.frame_size),
                  "frame_indices": list(v.frame_indices), "timestamps": list(v.timestamps),
                  "requested_fps": v.requested_fps, "duration": v.duration, "segments": list(v.segments)},
        "chunks": {"count": cache.num_chunks, "tokens": list(cache.chunk_tokens)},
        "family": {"model_type": m.model_type, "cursor": cache.cursor},
        "scenes": [list(seg) for seg in cache.scenes],
        "prefix_len": cache.prefix_len,
        "has_state": cache.state is not None,
    }


def cache_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """`VideoKVCache` keyword arguments (model, config, video, num_chunks, chunk_tokens, cursor) of a manifest."""
    v = manifest["video"]
    return {
        "model": ModelInfo(**manifest["model"]),
        "config": PrefillConfig.from_dict(manifest["prefill"]),
        "video": VideoInfo(source=v["source"], video_fps=v["video_fps"], total_frames=v["total_frames"],
                           sampled_fps=v["sampled_fps"], frame_size=tuple(v["frame_size"]),
                           frame_indices=list(v["frame_indices"]), timestamps=list(v["timestamps"]),
                           requested_fps=v.get("requested_fps", 0.0), duration=v.get("duration", 0.0),
                           segments=list(v.get("segments", []))),
        "num_chunks": manifest["chunks"]["count"],
        "chunk_tokens": list(manifest["chunks"]["tokens"]),
        "cursor": dict(manifest["family"]["cursor"]),
        "scenes": [tuple(seg) for seg in manifest.get("scenes", [])],
    }
