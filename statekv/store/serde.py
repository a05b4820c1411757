"""Tensors <-> bytes: raw little-endian C-order bytes (bit-exact for float32/float16/bfloat16), int8 quantisation.

Shapes and dtypes are not stored with the bytes: the schema and the manifest give them.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("statekv.store writes little-endian bytes and needs a little-endian host")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
    "int8": torch.int8, "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
    return name


def to_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of `t` (bf16 via its 16-bit pattern: lossless)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.view(-1).view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor of `dtype` and `shape` from bytes written by `to_bytes`."""
    raw = np.frombuffer(data, dtype=np.uint8).copy()
    t = torch.from_numpy(raw)
    # math.prod: exact on Python ints (np.prod wraps around, and a huge declared shape could then pass)
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {tuple(shape)}")
    want = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
    if raw.nbytes != want:
        raise ValueError(f"{raw.nbytes} bytes for a {dtype_name(dtype)} tensor of shape {tuple(shape)} "
                         f"({want} bytes expected)")
    if raw.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return t.view(dtype).reshape(shape)


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hkv, n, D) -> int8 (Hkv, n, D) and float32 scales (Hkv, 1, D)."""
    return _quantize(k, dim=1)


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hkv, n, D) -> int8 (Hkv, n, D) and float32 scales (Hkv, n, 1)."""
    return _quantize(v, dim=2)


def _quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = x.abs().amax(dim=dim, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)
