"""Materialised answer contexts on the model's device, kept in a byte-bounded LRU.

Answering a question attends to the video's whole KV (prefix + every chunk, or prefix + carried state). Building
that context means concatenating the per-chunk K/V of every layer and copying it to the accelerator: the cost of
a prefill's worth of bytes, paid per question if nothing is kept. `DeviceCacheLRU` keeps the built contexts
(`DeviceVideo`) so that repeated questions on a video reuse them; they are read-only (every question keeps its own
tokens apart, statekv/decoding.py), so one copy serves any number of questions, concurrent ones included.

Separate from the query service's host LRU (pipelines/serving/lru.py), which keeps loaded caches in host memory:
this one bounds accelerator memory. Entries are keyed by the host cache object itself (a re-loaded or re-prefilled
cache is another object, hence another entry) and dropped when that object is garbage-collected.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from statekv.cache import RecurrentState, VideoKVCache

DEFAULT_DEVICE_CACHE_BYTES = 2 << 30


@dataclass
class DeviceVideo:
    """A video's answer context on the device: read-only, shared by every question on it."""

    keys: list[torch.Tensor | None]  # per layer (1, Hkv, S, D); None at linear-attention layers
    values: list[torch.Tensor | None]
    recurrent: dict[int, RecurrentState] = field(default_factory=dict)  # linear layers' final states (copied per use)

    @property
    def nbytes(self) -> int:
        kv = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)
        return kv + sum(s.nbytes for s in self.recurrent.values())

    @classmethod
    def from_cache(cls, cache: VideoKVCache, num_layers: int, linear_layers: tuple[int, ...],
                   device: torch.device, *, prefix_only: bool = False) -> "DeviceVideo":
        """Concatenate the cache's KV per layer (`cache.layer_kv`) and move it to `device`, once. `prefix_only`:
        the text prefix's KV alone (what retrieval questions share; each adds the chunks chosen for it)."""
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for i in range(num_layers):
            if i in linear_layers:
                keys.append(None)
                values.append(None)
                continue
            k, v = (cache.prefix_keys[i], cache.prefix_values[i]) if prefix_only else cache.layer_kv(i)  # (Hkv, S, D)
            keys.append(k.to(device).unsqueeze(0).contiguous())
            values.append(v.to(device).unsqueeze(0).contiguous())
        return cls(keys, values, {i: r.to(device) for i, r in cache.recurrent.items()})


def cache_version(cache: VideoKVCache) -> tuple[int, int, int]:
    """What changes if a cache object gains chunks (a guard; the engine never changes a cache it answers from)."""
    return cache.num_chunks, len(cache.chunks), cache.num_video_tokens


class DeviceCacheLRU:
    """`DeviceVideo`s by host cache object, least recently used evicted first once their bytes exceed
    `capacity_bytes`. Thread-safe; a context larger than the whole capacity is returned but not kept, and an
    evicted context still in use by a decoder lives on until that decoder lets it go (its bytes are no longer
    counted here). `capacity_bytes=0` keeps nothing: every question builds its own context."""

    def __init__(self, capacity_bytes: int = DEFAULT_DEVICE_CACHE_BYTES) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"device cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        # id(cache) -> (weakref to the cache, its version, the context, bytes)
        self._items: OrderedDict[int, tuple[weakref.ref, tuple, DeviceVideo, int]] = OrderedDict()
        self._lock = threading.RLock()  # re-entrant: a weakref callback may run while it is held (GC)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, cache: VideoKVCache, build: Callable[[], DeviceVideo]) -> DeviceVideo:
        """The kept context of `cache`, or `build()`'s, kept if it fits (builds are serialised)."""
        key, version = id(cache), cache_version(cache)
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0]() is cache and item[1] == version:
                self._items.move_to_end(key)
                self.hits += 1
                return item[2]
            if item is not None:  # a dead object's id reused, or a cache that changed
                self._pop(key)
            self.misses += 1
            video = build()
            nbytes = video.nbytes
            if nbytes <= self.capacity_bytes:
                self._items[key] = (weakref.ref(cache, self._forget(key)), version, video, nbytes)
                self.bytes += nbytes
                while self.bytes > self.capacity_bytes:
                    self._pop(next(iter(self._items)))
                    self.evictions += 1
            return video

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def drop(ref: weakref.ref) -> None:  # the host cache is gone: nobody can ask about it again
            with self._lock:
                item = self._items.get(key)
                if item is not None and item[0] is ref:
                    self._pop(key)
        return drop

    def _pop(self, key: int) -> None:
        item = self._items.pop(key)
        self.bytes -= item[3]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
