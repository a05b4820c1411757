"""A prefill that fails part-way leaves nothing under the cache root.

Regression: the writer removed its `parts-<uuid>/` attempt folder on failure but left the `<root>/<video_id>/`
folder it had created, empty, so `ls` of the root showed a folder that is no cache and a rerun found clutter.
"""

from __future__ import annotations

import numpy as np
import pytest

from statekv import Engine, StateKV
from statekv.errors import VideoDecodeError
from statekv.store import load_cache, prefill_to_store
from statekv.testing.videos import synthetic_frames
from statekv.video import FramesSource, SamplingConfig


class FailsPartWay(FramesSource):
    """Frames that decode until frame `fail_at`, as a video whose second half is corrupt does."""

    def __init__(self, frames: np.ndarray, fps: float, fail_at: int) -> None:
        super().__init__(frames, fps, source="half-corrupt.mp4")
        self.fail_at = fail_at

    def read(self, indices: np.ndarray) -> np.ndarray:
        if np.max(indices) >= self.fail_at:
            raise VideoDecodeError(self.source, f"cannot decode frame {int(np.max(indices))}")
        return super().read(indices)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu", policy=StateKV(capacity=8),
                                  sampling=SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84))


def test_a_failed_first_prefill_leaves_no_folder(tmp_path, engine):
    # 24 chunks, read 8 at a time (the vision batch's 16 frames): the third read fails, after 16 chunks were written
    source = FailsPartWay(synthetic_frames(48, 56, 84), fps=2.0, fail_at=40)
    written = []
    with pytest.raises(VideoDecodeError, match="half-corrupt.mp4"):
        prefill_to_store(engine, source, tmp_path / "caches" / "vid", progress=lambda done, total: written.append(done))
    assert written, "the failure must come after chunks were written, or this tests nothing"
    assert list((tmp_path / "caches").iterdir()) == []


def test_a_failed_overwrite_keeps_the_committed_cache(tmp_path, engine):
    uri = tmp_path / "caches" / "vid"
    prefill_to_store(engine, FramesSource(synthetic_frames(8, 56, 84), fps=2.0), uri)
    with pytest.raises(VideoDecodeError):
        prefill_to_store(engine, FailsPartWay(synthetic_frames(16, 56, 84), fps=2.0, fail_at=8), uri)
    assert load_cache(uri).num_chunks == 4  # still the committed one; only its own files are left
    assert sorted(p.name for p in uri.iterdir() if p.name.startswith("parts-")).__len__() == 1
