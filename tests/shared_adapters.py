"""One `from_pretrained` per tiny checkpoint in a test process: `load_adapter` of a local checkpoint already loaded
returns a deep copy of that adapter instead of reading the checkpoint again.

A tiny checkpoint takes 75-125 ms to load (config, weights, tokenizer, preprocessor config) and 11-18 ms to deep-copy;
the suite loads about 800 of them. A copy, not the same object: tests change the adapters they get (an engine's
`eos_token_ids`, a wrapped `video_features`), and a copy keeps that to the test. Only the tokenizer is shared (nothing
changes a loaded tokenizer) and each copy gets its own locks. A checkpoint is the same one only if its files have
not changed since (path, size and mtime of every file), and loads with other arguments (device, dtype, adapter
options) are other entries. Set STATEKV_TEST_FRESH_LOADS=1 to load every time, e.g. to rule this out.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

LOCKS = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


def checkpoint_state(path: Path) -> tuple:
    """What identifies a checkpoint directory's contents cheaply: every file's name, size and mtime."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))


def copy_adapter(adapter: Any) -> Any:
    """A deep copy that shares the tokenizer and gives the copy fresh locks (a lock cannot be copied)."""
    memo: dict[int, Any] = {id(adapter.tokenizer): adapter.tokenizer}
    for value in vars(adapter).values():
        if type(value) in LOCKS:
            memo[id(value)] = LOCKS[type(value)]()
    return copy.deepcopy(adapter, memo)


class SharedLoads:
    """A `load_adapter` that loads each local checkpoint once and hands out copies (least recently used first out,
    at most `size` held)."""

    def __init__(self, load: Callable[..., Any], size: int = 24) -> None:
        self.load = load
        self.size = size
        self.held: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = self.copies = 0

    def __call__(self, name_or_path: Any, **kwargs: Any) -> Any:
        path = Path(name_or_path)
        if not path.is_dir():  # a hub id, or a missing path: the real load says what is wrong
            return self.load(name_or_path, **kwargs)
        key = (str(path.resolve()), checkpoint_state(path), repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        with self.lock:
            adapter = self.held.get(key)
            if adapter is not None:
                self.held.move_to_end(key)
                self.copies += 1
                return copy_adapter(adapter)
        adapter = self.load(name_or_path, **kwargs)
        with self.lock:
            self.loads += 1
            self.held[key] = adapter
            while len(self.held) > self.size:
                self.held.popitem(last=False)
        return copy_adapter(adapter)
