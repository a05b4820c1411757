"""What both attention backends share: shape checks, the masking rule, and whether triton runs interpreted.

Imported by `attention.py` (torch) and `triton_attention.py` (triton), which do not import each other at module
level: `attention.py` imports the triton module only when that backend is chosen.
"""

from __future__ import annotations

import functools
import os

import torch


def check_attention_shapes(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[int, int, int, int, int, int]:
    """Validate query [B, H, q, D], key/value [B, Hkv, kv, D]; return (B, H, Hkv, q, kv, D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, len, head_dim], got shape {tuple(t.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    B, H, q_len, D = query.shape
    Bk, Hkv, kv_len, Dk = key.shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: query {B}, key/value {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim differs: query {D}, key/value {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if q_len < 1:
        raise ValueError(f"query length must be >= 1, got {q_len}")
    if kv_len < q_len:
        raise ValueError(f"key length ({kv_len}) must be >= query length ({q_len}): the chunk's own keys come last")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"devices differ: query {query.device}, key {key.device}, value {value.device}")
    return B, H, Hkv, q_len, kv_len, D


@functools.lru_cache(maxsize=8)
def visible_mask(q_start: int, q_end: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [q_end - q_start, kv], True where query row i (of q_len) may see key j.

    Cached (read-only: never modify it): every layer of a prefill step asks for the same mask.
    """
    rows = torch.arange(q_start, q_end, device=device)
    cols = torch.arange(kv_len, device=device)
    return cols[None, :] <= (kv_len - q_len + rows)[:, None]


def triton_interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
