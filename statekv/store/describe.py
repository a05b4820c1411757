"""Describing a committed cache's manifest for people (`statekv inspect`) and for programs (the service's API)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # an annotation only: describing a manifest must not import torch (`statekv inspect` is cheap)
    from statekv.cache import ModelInfo


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def state_tokens(manifest: dict[str, Any]) -> int:
    """Carried tokens per layer and KV head: every token for `full`, else at most the capacity."""
    tokens = manifest["totals"]["tokens"]
    capacity = manifest["prefill"]["policy"].get("capacity")
    return tokens if capacity is None else min(capacity, tokens)


def _duration(video: dict[str, Any]) -> float:
    """Seconds of video the cache covers (recorded; else frames / fps)."""
    if video.get("duration"):
        return float(video["duration"])
    return video["total_frames"] / video["video_fps"] if video["video_fps"] else 0.0
def linear_note(manifest: dict[str, Any]) -> str:
    """", layers 0, 1, 2 linear attention (exact recurrent state)" for hybrid models; "" otherwise."""
    linear = [i for i, kind in enumerate(manifest["layout"].get("layer_types") or []) if kind == "linear_attention"]
    if not linear:
        return ""
    return f"; layers {', '.join(map(str, linear))} linear attention (exact recurrent state, no K/V)"


def describe_manifest(uri: str, m: dict[str, Any], model: ModelInfo | None = None) -> dict[str, Any]:
    """The fields `statekv inspect` prints, structured, and its text as `summary`; `compatible`: whether `model`
    can answer from the cache (same fingerprint and token layout), None without a model."""
    video, totals, made_with, prefill = m["video"], m["totals"], m["model"], m["prefill"]
    duration = _duration(video)
    return {
        "video_id": m["video_id"], "uri": uri,
        "source": (m.get("source") or {}).get("uri") or video["source"],
        "model": {**{k: made_with[k] for k in ("name_or_path", "model_type", "fingerprint")},
                  "layout_version": made_with.get("layout_version", 1),
                  "transformers_version": made_with.get("transformers_version", "")},
        "compatible": None if model is None else (made_with["fingerprint"] == model.fingerprint
                                                  and made_with.get("layout_version", 1) == model.layout_version),
        "policy": prefill["policy"],
        "prefill": prefill,
        "frames": {"sampled": len(video["frame_indices"]), "sampled_fps": video["sampled_fps"],
                   "total": video["total_frames"], "width": video["frame_size"][1], "height": video["frame_size"][0]},
        "duration_s": duration,
        "tokens": {"video": totals["tokens"], "chunks": totals["chunks"], "prefix": m["prefix_len"],
                   "per_chunk": m["chunks"]["tokens"]},
        "family": m["family"],
        "state_tokens": state_tokens(m) if m.get("has_state") else None,
        "compression": prefill.get("compression"), "stored_tokens": m["chunks"].get("kept_tokens"),
        "storage": m["storage"], "dtype": m["dtype"],
        "bytes": totals["bytes"], "files": len(m["files"]),
        "created": m["created"], "statekv_version": m["statekv_version"],
        "summary": format_manifest(uri, m),
    }


def compression_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """A compressed cache's `stored` line: the compression and the tokens its chunks store per layer."""
    settings = m["prefill"].get("compression")
    if not settings:
        return []
    options = ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "name")
    kept = sorted(set(m["chunks"].get("kept_tokens", [])))
    counts = "/".join(str(k) for k in kept) or "0"
    return [("stored", f"{settings['name']} ({options}): {counts} of {m['totals']['tokens']} video tokens per layer")]


def _frames_text(video: dict[str, Any]) -> str:
    """How the frames were sampled; a video shorter than the sampler's minimum gives all its frames, the last
    repeated to fill whole chunks — said as such, not as a frame rate above the video's own."""
    indices = video["frame_indices"]
    distinct, total = len(set(indices)), video["total_frames"]
    if distinct == total and len(indices) > distinct:
        return f"all {total} of {total} ({len(indices) - distinct} repeated to fill whole chunks: {len(indices)} in all)"
    return f"{len(indices)} sampled at {video['sampled_fps']:.2f} fps from {total}"


def format_manifest(uri: str, m: dict[str, Any]) -> str:
    """`statekv inspect`'s text: one `name: value` line per aspect of the cache."""
    video, totals, model, prefill = m["video"], m["totals"], m["model"], m["prefill"]
    duration = _duration(video)
    policy = ", ".join(f"{k}={v}" for k, v in prefill["policy"].items() if k != "name" and v is not None)
    per_chunk = sorted(set(m["chunks"]["tokens"]))
    per_chunk_text = str(per_chunk[0]) if len(per_chunk) == 1 else f"{per_chunk[0]}..{per_chunk[-1]}"
    rows = [
        ("cache", uri),
        ("source", (m.get("source") or {}).get("uri") or video["source"]),
        ("model", f"{model['name_or_path']} ({model['model_type']}, fingerprint {model['fingerprint']}, token "
                  f"layout {model.get('layout_version', 1)})"),
        ("policy", f"{prefill['policy']['name']}" + (f" ({policy})" if policy else "")),
        ("prefill", f"layout {prefill['layout']}, {prefill['chunks_per_step']} chunk(s) per step, "
                    f"attention {prefill['attention_backend']}"),
        ("frames", f"{_frames_text(video)} ({video['frame_size'][1]}x{video['frame_size'][0]})"),
        ("duration", f"{duration:.1f} s" if duration >= 1 else f"{duration:.3g} s"),
        ("tokens", f"{totals['tokens']} video tokens in {totals['chunks']} chunks "
                   + (f"({per_chunk_text} per chunk), " if per_chunk else "") + f"prefix {m['prefix_len']}"),
        ("state", (f"{state_tokens(m)} tokens per layer and KV head" if m.get("has_state") else "none")
         + linear_note(m)),
        *compression_rows(m),
        ("storage", f"{m['storage']}{' (int8 K/V with scales)' if m['storage'] == 'int8' else ''}, "
                    f"dtype {m['dtype']}"),
        ("bytes", f"{human_bytes(totals['bytes'])} in {len(m['files'])} files"),
        ("created", f"{m['created']} by statekv {m['statekv_version']}"
                    + (f" with transformers {model['transformers_version']}" if model.get("transformers_version") else "")),
    ]
    return "\n".join(f"{name + ':':<10}{value}" for name, value in rows)
