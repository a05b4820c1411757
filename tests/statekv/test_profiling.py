"""Time per stage (statekv.profiling.StageTimer): exclusive accounting, one thread only, and a real prefill into the
store whose deliberately slow part (a slow decoder, a slow filesystem) shows as the largest share."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from statekv import Engine
from statekv.policies import make_policy
from statekv.profiling import (DECODE, LM, OTHER, PREPROCESS, STAGES, STORE, VISION, StageTimer, measure_stages,
                               stage, timed, timed_iter)
from statekv.store import prefill_to_store
from statekv.testing.videos import synthetic_frames
from statekv.video import FramesSource, SamplingConfig

FPS = 4.0
DELAY_S = 0.25  # what the slow part adds per call: far above a tiny model's step on a loaded 2-core machine


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_stages_are_exclusive_and_other_is_the_rest():
    clock = Clock()
    timer = StageTimer(clock=clock)
    with timer.measure():
        clock.now += 1.0  # other
        with stage("vision"):
            clock.now += 2.0
            with stage("preprocess"):  # inside vision: not vision's time
                clock.now += 3.0
            clock.now += 0.5
        with stage("vision"):
            clock.now += 1.5
    assert timer.wall_s == 8.0
    assert timer.seconds == {"vision": 4.0, "preprocess": 3.0}
    assert timer.other_s() == 1.0
    assert timer.shares() == {"vision": 0.5, "preprocess": 0.375, OTHER: 0.125}


def test_a_stage_that_raises_is_closed_and_charged():
    clock = Clock()
    timer = StageTimer(clock=clock)
    with timer.measure():
        with pytest.raises(KeyError):
            with stage("store"):
                clock.now += 2.0
                raise KeyError("x")
        clock.now += 1.0
    assert timer.seconds == {"store": 2.0} and timer.other_s() == 1.0


def test_only_the_measuring_thread_is_timed():
    """A decode thread working ahead of the model is not the model thread's time (what it waits for is)."""
    clock = Clock()
    timer = StageTimer(clock=clock)
    seen = []

    def other_thread():
        with stage(DECODE):  # no timer measures this thread: a no-op
            clock.now += 5.0
        seen.append(timed_iter(DECODE, iter([1, 2])))

    with timer.measure():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert timer.seconds == {} and timer.wall_s == 5.0 and timer.other_s() == 5.0
    assert list(seen[0]) == [1, 2]


def test_no_timer_leaves_the_default_path_as_it_is():
    items = iter([1, 2, 3])
    assert timed_iter(DECODE, items) is items  # no wrapper
    calls = []

    @timed(STORE)
    def write(x):
        calls.append(x)
        return x * 2

    assert write(3) == 6 and calls == [3]


def test_timed_iter_charges_each_pull_and_closes_the_source():
    clock = Clock()
    closed = []

    def frames():
        try:
            for i in range(3):
                clock.now += 1.0  # decoding one batch
                yield i
        finally:
            closed.append(True)

    timer = StageTimer(clock=clock)
    with timer.measure():
        for item in timed_iter(DECODE, frames()):
            clock.now += 10.0  # the model's work on it
            if item == 1:
                break
    assert timer.seconds == {DECODE: 2.0} and closed == [True]


# --- a real prefill into the store -------------------------------------------------------------------------------


class SlowFrames(FramesSource):
    """Frames in memory whose every read takes DELAY_S longer: a slow decoder. Counts its reads."""

    reads = 0

    def read(self, indices: np.ndarray) -> np.ndarray:
        self.reads += 1
        time.sleep(DELAY_S)
        return super().read(indices)


class _SlowFile:
    """A written file whose close (an object store's upload) takes DELAY_S longer."""

    def __init__(self, f) -> None:
        self.f = f

    def close(self) -> None:
        if not self.f.closed:
            time.sleep(DELAY_S)
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SlowFileSystem(LocalFileSystem):
    """The local filesystem with every written file DELAY_S slower to close: a slow object store."""

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return _SlowFile(f) if "w" in mode or "x" in mode else f


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=make_policy("statekv", capacity=24),
                                  device="cpu", sampling=SamplingConfig(fps=FPS, min_pixels=28 * 28,
                                                                        max_pixels=56 * 84))


def _prefill(engine: Engine, source, root, filesystem=None) -> StageTimer:
    with measure_stages(engine.adapter) as timer:
        prefill_to_store(engine, source, f"{root}/v", filesystem=filesystem)
    return timer


def test_every_stage_of_a_prefill_into_the_store_is_measured(engine, tmp_path):
    timer = _prefill(engine, FramesSource(synthetic_frames(8, seed=0), FPS), tmp_path)
    assert set(timer.seconds) == set(STAGES)
    assert all(timer.seconds[s] > 0 for s in STAGES)
    assert sum(timer.seconds.values()) <= timer.wall_s and timer.other_s() >= 0
    assert sum(timer.shares().values()) == pytest.approx(1.0)
    # the hooks on the vision tower and the language model are gone afterwards
    modules = [*engine.adapter.vision_modules(), engine.adapter.language_model]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


@pytest.mark.parametrize("slow", [DECODE, STORE])
def test_a_slow_stage_is_the_largest_share(engine, tmp_path, slow):
    frames = synthetic_frames(8, seed=1)
    if slow == DECODE:
        per_step = copy.copy(engine)  # one read per 2-frame step, not one per 16-frame vision batch: 4 slow reads
        per_step.vision_batch_frames = 2
        source = SlowFrames(frames, FPS)
        timer = _prefill(per_step, source, tmp_path)
        assert source.reads == 4
        injected = source.reads * DELAY_S
    else:
        timer = _prefill(engine, FramesSource(frames, FPS), tmp_path, SlowFileSystem(skip_instance_cache=True))
        injected = 3 * DELAY_S  # chunks, summaries, prefix, ... files
    assert timer.seconds[slow] >= injected
    shares = timer.shares()
    assert max(shares, key=shares.get) == slow, shares
    assert {PREPROCESS, VISION, LM} <= set(timer.seconds)


@pytest.mark.parametrize("family", ["internvl", "qwen3_vl"])
def test_other_families_time_their_preprocessing_vision_tower_and_language_model(tmp_path, family):
    """Single-frame families preprocess with their own resize/normalise and run tower + projector; Qwen3-VL has
    its own preprocessing call: every family's stages are found without per-family timing code."""
    from statekv.testing.checkpoints import save_family_checkpoint

    path = save_family_checkpoint(tmp_path / family, family)
    engine = Engine.from_pretrained(str(path), device="cpu", sampling=SamplingConfig(fps=FPS, min_pixels=28 * 28,
                                                                                     max_pixels=56 * 84))
    with measure_stages(engine.adapter) as timer:
        engine.prefill(synthetic_frames(4, seed=2), fps=FPS)
    assert {DECODE, PREPROCESS, VISION, LM} <= set(timer.seconds)
    assert all(timer.seconds[s] > 0 for s in (DECODE, PREPROCESS, VISION, LM))
    assert sum(timer.seconds.values()) <= timer.wall_s
