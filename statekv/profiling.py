"""Measuring what prefill costs: peak tensor memory on the compute device, FLOPs, and where the time goes.

On CUDA, peak memory is the allocator's own figure. On CPU there is no such counter, so every tensor storage
created inside the block is tracked (through a dispatch mode) until it is freed, and the peak of live bytes is kept.

Time per stage (`StageTimer`, `measure_stages`): the library marks where its stages' work happens — pulling decoded
frames (`iter_frame_batches`), resizing/normalising/patchifying (the preprocessing functions), writing the store
(`CacheWriter`) — with `stage` / `timed` / `timed_iter`; the vision tower and the language model are timed through
forward hooks that exist only while a measurement runs. With no timer active in the calling thread every mark is a
thread-local attribute read and nothing else, so the default path pays nothing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

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


# --- time per stage ----------------------------------------------------------------------------------------------

DECODE, PREPROCESS, VISION, LM, STORE = "decode", "preprocess", "vision", "lm", "store"
STAGES = (DECODE, PREPROCESS, VISION, LM, STORE)  # what the library marks; callers may add their own names
OTHER = "other"  # wall time inside a measurement that no stage claimed

_active = threading.local()  # .timer: the StageTimer measuring this thread, if any
_T = TypeVar("_T")


class StageTimer:
    """Exclusive wall-clock seconds per named stage of ONE thread's work, inside `measure()`.

    Stages nest (preprocessing inside a feature call, say): a stage's time excludes the stages it contains, so the
    stages' seconds never add up to more than `wall_s`; what is left is `OTHER`. Work on other threads (a decode
    thread filling a queue ahead of the model) is not counted: what the measured thread waits for it is, where it
    waits (the decode stage around pulling frames). On CUDA every stage boundary synchronises the device, so
    kernels are charged to the stage that launched them, not to whichever later call blocks on them; this happens
    only while a timer measures.
    """

    def __init__(self, *, device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.seconds: dict[str, float] = {}
        self.wall_s = 0.0
        self._clock = clock
        self._device = torch.device(device) if device is not None else None
        self._sync = self._device is not None and self._device.type == "cuda"
        self._stack: list[str] = []
        self._mark = 0.0
        self._thread: int | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator["StageTimer"]:
        """Measure the calling thread's stages inside the block (adds to earlier measurements' seconds)."""
        if self._thread is not None:
            raise RuntimeError("this StageTimer is already measuring")
        previous = getattr(_active, "timer", None)
        self._thread, _active.timer = threading.get_ident(), self
        self._synchronize()
        start = self._mark = self._clock()
        try:
            yield self
        finally:
            while self._stack:  # a stage left open by an exception thrown through a hook
                self._leave()
            self._charge()  # no stage open: only moves the mark (after the device is done)
            self.wall_s += self._mark - start
            self._thread, _active.timer = None, previous

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the block's time (less the stages inside it) to `name`."""
        if not self._mine():
            yield
            return
        self._enter(name)
        try:
            yield
        finally:
            self._leave()

    @contextlib.contextmanager
    def modules(self, name: str, modules: Iterable[torch.nn.Module]) -> Iterator[None]:
        """Charge every forward of `modules` to `name`, through hooks removed when the block ends."""
        handles = []

        def enter(module, args):
            if self._mine():
                self._enter(name)

        def leave(module, args, output):
            if self._mine() and self._stack:
                self._leave()

        try:
            for module in modules:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def shares(self) -> dict[str, float]:
        """Each stage's share of the wall time, and `OTHER`'s (they sum to 1); zeros before any measurement."""
        if self.wall_s <= 0:
            return {OTHER: 0.0, **{k: 0.0 for k in self.seconds}}
        out = {k: v / self.wall_s for k, v in self.seconds.items()}
        out[OTHER] = max(0.0, 1.0 - sum(out.values()))
        return out

    def other_s(self) -> float:
        """Wall seconds no stage claimed."""
        return max(0.0, self.wall_s - sum(self.seconds.values()))

    def _mine(self) -> bool:
        return self._thread is not None and self._thread == threading.get_ident()

    def _synchronize(self) -> None:
        if self._sync:
            torch.cuda.synchronize(self._device)

    def _charge(self) -> None:
        """Time since the last boundary goes to the innermost open stage."""
        self._synchronize()
        now = self._clock()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._mark)
        self._mark = now

    def _enter(self, name: str) -> None:
        self._charge()
        self._stack.append(name)

    def _leave(self) -> None:
        self._charge()
        self._stack.pop()


def active_timer() -> StageTimer | None:
    """The timer measuring the calling thread, if any."""
    return getattr(_active, "timer", None)


def stage(name: str) -> contextlib.AbstractContextManager:
    """A block of stage `name` for the calling thread's timer; a no-op context when none measures."""
    timer = getattr(_active, "timer", None)
    return contextlib.nullcontext() if timer is None else timer.stage(name)


def timed(name: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorator: calls of the function are stage `name` while a timer measures the calling thread."""
    def wrap(fn: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> _T:
            timer = getattr(_active, "timer", None)
            if timer is None:
                return fn(*args, **kwargs)
            with timer.stage(name):
                return fn(*args, **kwargs)
        return call
    return wrap


def timed_iter(name: str, items: Iterable[_T]) -> Iterator[_T]:
    """`items` with each pull charged to stage `name` when a timer measures the calling thread (else as is)."""
    timer = getattr(_active, "timer", None)
    if timer is None:
        return iter(items)
    return _timed_pulls(timer, name, iter(items))


def _timed_pulls(timer: StageTimer, name: str, it: Iterator[_T]) -> Iterator[_T]:
    try:
        while True:
            with timer.stage(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # stop the underlying generator (a decode thread, an open container) now
            close()


@contextlib.contextmanager
def measure_stages(adapter: Any, *, timer: StageTimer | None = None) -> Iterator[StageTimer]:
    """Measure the calling thread's stages, with the adapter's vision tower and language model timed as VISION and
    LM (`adapter.vision_modules()`, `adapter.language_model`); yields the timer (a new one unless given)."""
    timer = timer if timer is not None else StageTimer(device=adapter.device)
    with timer.modules(VISION, adapter.vision_modules()), timer.modules(LM, [adapter.language_model]), \
            timer.measure():
        yield timer
