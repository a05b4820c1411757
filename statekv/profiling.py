"""Measuring what prefill costs: peak tensor memory on the compute device, and FLOPs.

On CUDA, peak memory is the allocator's own figure. On CPU there is no such counter, so every tensor storage
created inside the block is tracked (through a dispatch mode) until it is freed, and the peak of live bytes is kept.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class MemoryReport:
    """Peak bytes of tensors allocated inside the measured block (on top of what existed before it)."""

    peak_bytes: int = 0


class _LiveStorageTracker(TorchDispatchMode):
    """Counts bytes of storages that ops create, until Python frees them."""

    def __init__(self, device: torch.device, report: MemoryReport) -> None:
        super().__init__()
        self.device = device
        self.report = report
        self.live: dict[int, int] = {}
        self.current = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._release, key)
            self.report.peak_bytes = max(self.report.peak_bytes, self.current)
        return out


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[MemoryReport]:
    """Measure the peak of tensor memory allocated on `device` inside the block."""
    device = torch.device(device)
    report = MemoryReport()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield report
        torch.cuda.synchronize(device)
        report.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        return
    with _LiveStorageTracker(device, report):
        yield report


@contextlib.contextmanager
def count_flops() -> Iterator[FlopCounterMode]:
    """Count FLOPs of the block (`.get_total_flops()`); attention is counted through the math SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        yield counter
