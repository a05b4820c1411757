"""A byte-bounded LRU of loaded caches, shared by a replica's concurrent requests.

An entry's size is fixed when it is loaded (a whole cache), or grows while it is used (a lazily held cache,
whose owner reports its new size with `resize`); either way the bound holds after every change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class CacheLRU:
    """Loaded caches by video id, least recently used evicted first once their bytes exceed `capacity_bytes`.

    Thread-safe. Concurrent misses of one key share a single load (the others wait for it); a failed load is
    not remembered. An item larger than the whole capacity is returned but not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.loads = self.evictions = self.invalidations = 0

    def get(self, key: str, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """(value, hit): the kept value, or `load()`'s (value, nbytes) run once however many ask at once."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0], True
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self.misses += 1
            else:
                self.hits += 1  # shares the load in flight
        if not owner:
            return pending.result(), True
        try:
            value, nbytes = load()
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            pending.set_exception(err)
            raise
        with self._lock:
            del self._loading[key]
            self.loads += 1
            if nbytes <= self.capacity_bytes:
                self._items[key] = (value, nbytes)
                self.bytes += nbytes
                self._evict()
        pending.set_result(value)
        return value, False

    def resize(self, key: str, value: Any, nbytes: int) -> bool:
        """`key` (if it still holds `value`) now takes `nbytes`; least recently used entries go until the bound
        holds again (this one last: an entry grown beyond the whole capacity is dropped). True if it was held."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] is not value:
                return False
            self._items[key] = (value, int(nbytes))
            self.bytes += int(nbytes) - item[1]
            self._evict(keep=key)
            return True

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used entries until the bytes fit (`keep` only if it alone does not fit)."""
        while self.bytes > self.capacity_bytes:
            victim = next((k for k in self._items if k != keep), keep)
            _, size = self._items.pop(victim)
            self.bytes -= size
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                    "hits": self.hits, "misses": self.misses, "loads": self.loads, "evictions": self.evictions,
                    "invalidations": self.invalidations}

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def peek(self, key: str) -> Any | None:
        """The kept value of `key` without touching its recency, or None."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def discard(self, key: str, value: Any) -> bool:
        """Drop `key` if it still holds `value` (a newer load is kept); True if something was dropped."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] is not value:
                return False
            del self._items[key]
            self.bytes -= item[1]
            self.invalidations += 1
            return True

