"""The suite's shared checkpoint loads (tests/shared_adapters.py) hand out copies that behave as fresh loads."""

from __future__ import annotations

import os
import threading

import torch

from statekv.models import load_adapter
from tests.shared_adapters import SharedLoads, copy_adapter


def _real_load():
    """The real loader (the session fixture replaces statekv.models.load_adapter with a SharedLoads of it)."""
    return getattr(load_adapter, "load", load_adapter)


def test_a_second_load_is_a_copy_that_changes_alone(tiny_checkpoints):
    shared = SharedLoads(_real_load())
    first = shared(tiny_checkpoints["qwen2_vl"])
    second = shared(tiny_checkpoints["qwen2_vl"])
    assert (shared.loads, shared.copies) == (1, 1)
    assert first is not second and first.model is not second.model
    assert first.tokenizer is second.tokenizer  # shared: nothing changes a loaded tokenizer
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    second.eos_token_ids = {0}
    with torch.no_grad():
        next(second.model.parameters()).add_(1.0)
    third = shared(tiny_checkpoints["qwen2_vl"])
    assert third.eos_token_ids == first.eos_token_ids != {0}
    assert torch.equal(next(third.model.parameters()), next(first.model.parameters()))


def test_other_arguments_or_a_changed_checkpoint_load_again(tiny_checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(tiny_checkpoints["qwen2_vl"], tmp_path / "ck")
    shared = SharedLoads(_real_load())
    shared(path)
    shared(path, dtype=torch.bfloat16)
    assert shared.loads == 2
    config = path / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    shared(path)
    assert (shared.loads, shared.copies) == (3, 0)


def test_each_copy_has_its_own_lock():
    class Holder:
        def __init__(self) -> None:
            self.tokenizer = object()
            self._lock = threading.Lock()
            self._rlock = threading.RLock()

    held = Holder()
    held._lock.acquire()
    copied = copy_adapter(held)
    assert copied.tokenizer is held.tokenizer and copied._lock is not held._lock and copied._rlock is not held._rlock
    assert copied._lock.acquire(blocking=False)
