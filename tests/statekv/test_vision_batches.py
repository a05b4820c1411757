"""Batched vision (Engine `vision_batch_frames`, adapters' `step_features`), for every family in the registry.

The tower encodes several steps' frames in one call; every family's tower keeps frames apart (Qwen: one attention
segment per temporal patch; InternVL / LLaVA-OneVision: frames are the batch dimension), so the features, and the
cache built from them, equal per-step encoding within float rounding (not bit for bit: a matrix product's rounding
may depend on how many rows it multiplies). The token layout, positions and frames are exactly the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv import Engine, Full, StateKV
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)


def make_engine(path: str, policy, **kwargs) -> Engine:
    return Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, sampling=SMALL, **kwargs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within float32 rounding of the tower's products (relative to the tensor's scale)."""
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * max(float(b.abs().max()), 1.0)


def leaves(features) -> list[torch.Tensor]:
    """The tensors of one step's features (Qwen3-VL: features and DeepStack features)."""
    if isinstance(features, torch.Tensor):
        return [features]
    main, deep = features
    return [main, *deep]


@torch.inference_mode()
def test_step_features_equal_encoding_each_step_alone(family_checkpoint):
    """Three steps of two chunks and a short last step (for two-frame chunks: an odd last frame, padded)."""
    adapter = make_engine(family_checkpoint, Full()).adapter
    step_frames = 2 * adapter.frames_per_chunk
    frames = synthetic_frames(3 * step_frames + 1, 56, 84, seed=3)
    size = adapter.frame_size(56, 84, SMALL, num_frames=len(frames))
    batched = adapter.step_features(frames, size, step_frames)
    assert len(batched) == 4
    for i, got in enumerate(batched):
        alone = adapter.step_features(frames[i * step_frames:(i + 1) * step_frames], size, step_frames)
        assert len(alone) == 1
        want = leaves(alone[0])
        assert len(leaves(got)) == len(want) and all(close(g, w) for g, w in zip(leaves(got), want))


@pytest.mark.parametrize("chunks_per_step", [1, 2])
@torch.inference_mode()
def test_batched_vision_prefill_equals_per_step_vision(family_checkpoint, chunks_per_step):
    """The same chunks, positions, cursor and (within rounding) KV and state as encoding each step alone; the tower
    runs once per batch."""
    per_step = make_engine(family_checkpoint, StateKV(capacity=8), chunks_per_step=chunks_per_step,
                           vision_batch_frames=1)
    batched = make_engine(family_checkpoint, StateKV(capacity=8), chunks_per_step=chunks_per_step,
                          vision_batch_frames=64)
    frames = synthetic_frames(7 * per_step.adapter.frames_per_chunk, 56, 84, seed=5)
    calls = []
    encode = batched.adapter.video_features
    batched.adapter.video_features = lambda *a, **k: calls.append(len(a[0])) or encode(*a, **k)
    want = per_step.prefill(frames, fps=2.0)
    got = batched.prefill(frames, fps=2.0)
    assert calls == [len(frames)]  # one tower call for the whole (short) video
    assert (got.num_chunks, got.chunk_tokens, got.cursor) == (want.num_chunks, want.chunk_tokens, want.cursor)
    for x, y in zip(got.chunks, want.chunks):
        assert x.frame_range == y.frame_range and torch.equal(x.position_ids, y.position_ids)
        assert all(t is None and u is None or close(t, u) for t, u in zip([*x.keys, *x.values], [*y.keys, *y.values]))
    for s, t in zip(got.state, want.state):
        assert (s is None) == (t is None)
        if s is not None:  # the same tokens kept (scores within rounding may only tie-break differently: none here)
            assert torch.equal(s.token_index, t.token_index) and close(s.keys, t.keys)


@torch.inference_mode()
def test_batches_follow_the_budget_and_a_resume_continues_them(family_checkpoint):
    """Batches hold `vision_batch_frames` frames in whole steps, aligned to the stream's chunks: a resume after 3
    chunks with batches of 2 chunks first finishes the batch the first prefill began, then encodes whole ones."""
    engine = make_engine(family_checkpoint, Full())
    fpc = engine.adapter.frames_per_chunk
    engine.vision_batch_frames = 2 * fpc + (fpc - 1)  # rounded down to 2 chunks
    frames = synthetic_frames(8 * fpc, 56, 84, seed=6)
    calls: list[int] = []
    encode = engine.adapter.video_features
    engine.adapter.video_features = lambda *a, **k: calls.append(len(a[0])) or encode(*a, **k)
    whole = engine.prefill(frames, fps=2.0)
    assert calls == [2 * fpc] * 4
    calls.clear()
    first = engine.prefill(frames[:3 * fpc], fps=2.0)
    resumed = engine.prefill(frames[3 * fpc:], fps=2.0, resume_from=first)
    assert calls == [2 * fpc, fpc] + [fpc, 2 * fpc, 2 * fpc]
    assert resumed.video.frame_indices == whole.video.frame_indices
    assert (resumed.chunk_tokens, resumed.cursor) == (whole.chunk_tokens, whole.cursor)
    for x, y in zip(resumed.chunks, whole.chunks):
        assert x.frame_range == y.frame_range and torch.equal(x.position_ids, y.position_ids)
        assert all(t is None and u is None or close(t, u) for t, u in zip([*x.keys, *x.values], [*y.keys, *y.values]))


def test_vision_batch_frames_must_be_positive(tiny_checkpoints):
    with pytest.raises(ValueError, match="vision_batch_frames"):
        make_engine(tiny_checkpoints["qwen2_vl"], Full(), vision_batch_frames=0)


def test_steps_must_not_split_a_temporal_patch(tiny_checkpoints):
    adapter = make_engine(tiny_checkpoints["qwen2_vl"], Full()).adapter
    with pytest.raises(ValueError, match="temporal patch"):
        adapter.step_features(np.zeros((6, 56, 84, 3), np.uint8), (56, 84), 3)


def test_the_flags_default_is_the_engines():
    """One definition (statekv/settings.py) for the flag, the indexing config and the engine."""
    from pipelines.indexing.config import IndexConfig
    from statekv.engine import DEFAULT_VISION_BATCH_FRAMES
    from statekv.settings import PrefillSettings

    assert PrefillSettings().vision_batch_frames == IndexConfig(input="i", output="o", model="m").prefill \
        .vision_batch_frames == DEFAULT_VISION_BATCH_FRAMES == 16
