"""Lazily held caches for retrieval questions: what the service keeps of a video is what it has read of it.

A retrieval question reads the summary keys of each layer and the chosen chunks' K/V of that layer only
(`statekv.store.reader.LazyChunks`). `HeldChunks` wraps those chunks for a replica's concurrent questions: reads
of one video are serialised (nothing is read twice, and the held bytes are counted while nothing changes them),
and each read runs through the service's `call`, which maps store failures onto HTTP errors and charges the
grown bytes to the LRU at once (so the LRU's bound holds while a question reads, not only between questions).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from statekv.cache import ChunkKV, VideoKVCache
from statekv.store.reader import LazyChunks

T = TypeVar("T")
Call = Callable[[Callable[[], Any]], Any]  # runs one read of the store and returns its result


class HeldChunks(Sequence[ChunkKV]):
    """`LazyChunks` shared by concurrent questions: reads serialised, each run through `call`."""

    def __init__(self, chunks: LazyChunks, call: Call) -> None:
        self._chunks = chunks
        self._call = call
        self._lock = threading.RLock()  # `call` measures `nbytes` while the read's lock is held

    def _read(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return self._call(fn)

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, i):
        return self._read(lambda: self._chunks[i])

    def __iter__(self) -> Iterator[ChunkKV]:
        return iter(self._read(lambda: list(self._chunks)))

    def summary_keys(self, layer: int, *, pre_rope: bool = False) -> torch.Tensor:
        """(C, Hkv, D) summary keys of every chunk at `layer` (read once, then held); `pre_rope`: the means of the
        keys before RoPE (ReKV's query, `TopK(query="question")`)."""
        return self._read(lambda: self._chunks.summary_keys(layer, pre_rope=pre_rope))

    def read_layer(self, layer: int, indices: Iterable[int]) -> dict[int, ChunkKV]:
        """The chunks `indices` holding `layer`'s K/V only (read once, then held)."""
        wanted = list(indices)
        return self._read(lambda: self._chunks.read_layer(layer, wanted))

    @property
    def nbytes(self) -> int:
        """Bytes held: summary keys, per-layer chunk reads and chunks read whole (`LazyChunks.nbytes`)."""
        with self._lock:
            return self._chunks.nbytes

    @property
    def loaded(self) -> list[int]:
        """Chunks read whole (retrieval reads none: it reads chunks layer by layer)."""
        return self._chunks.loaded

    def __repr__(self) -> str:
        return f"HeldChunks({self._chunks!r}, {self.nbytes} bytes)"


def held_nbytes(cache: VideoKVCache) -> int:
    """Bytes a lazily loaded cache holds in memory: prefix K/V, the linear layers' states and what its chunks hold.

    Not `cache.nbytes`, which sums every chunk (and so would read every chunk of a lazy cache).
    """
    return cache.prefix_nbytes + cache.recurrent_nbytes + cache.chunks.nbytes
