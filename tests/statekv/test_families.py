"""Family-agnostic guarantees, parametrised over the adapters registry: a new family gets these tests for free
(it needs one entry in statekv.testing.checkpoints.TINY_CHECKPOINTS).

- resuming [0, n) + [n, 2n) equals prefilling [0, 2n) bit for bit (chunks, positions, state, the linear layers'
  recurrent states of hybrid stacks, cursor, answers);
- a resume with a different prefill config is refused, the error naming the field;
- a cache survives the store (save, load, answer) unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv import Engine, Full, StateKV, Window
from statekv.errors import PrefillConfigMismatchError
from statekv.store import load_cache, save_cache
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

# pixel bounds keep Qwen-style families at 56x84 (6 tokens per chunk); fixed-size families ignore them
SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
QUESTION = "What happens after the dog enters?"


def make_engine(path: str, policy, **kwargs) -> Engine:
    kwargs.setdefault("sampling", SMALL)
    return Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, **kwargs)


def video_for(engine: Engine, chunks: int = 6) -> np.ndarray:
    return synthetic_frames(chunks * engine.adapter.frames_per_chunk, 56, 84, seed=5)


def assert_bit_identical(a, b) -> None:
    assert (a.num_chunks, a.chunk_tokens, a.cursor, a.config) == (b.num_chunks, b.chunk_tokens, b.cursor, b.config)
    assert torch.equal(a.prefix_ids, b.prefix_ids)
    for x, y in zip(a.chunks, b.chunks):
        assert (x.index, x.frame_range) == (y.index, y.frame_range)
        assert torch.equal(x.position_ids, y.position_ids)
        for t, u in zip([*x.keys, *x.values], [*y.keys, *y.values]):
            assert (t is None and u is None) or torch.equal(t, u)  # None: linear-attention layers
    for s, t in zip(a.state, b.state):
        assert (s is None) == (t is None)  # None at linear-attention layers
        if s is not None:
            assert torch.equal(s.keys, t.keys) and torch.equal(s.values, t.values)
            assert torch.equal(s.token_index, t.token_index)
    assert a.recurrent.keys() == b.recurrent.keys() and a.prefix_recurrent.keys() == b.prefix_recurrent.keys()
    for states, others in ((a.recurrent, b.recurrent), (a.prefix_recurrent, b.prefix_recurrent)):
        for layer, s in states.items():  # hybrid stacks: the linear layers' exact states
            assert torch.equal(s.conv, others[layer].conv) and torch.equal(s.recurrent, others[layer].recurrent)


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
@pytest.mark.parametrize("policy", [StateKV(capacity=8), Window(capacity=8), Full()], ids=["statekv", "window", "full"])
@pytest.mark.parametrize("batch_chunks", [1, 3], ids=["per-step-vision", "batched-vision"])
@torch.inference_mode()
def test_resume_equals_one_prefill_bit_for_bit(family_checkpoint, policy, layout, batch_chunks):
    """With the tower run per step, or on batches of 3 chunks whose boundary is the resume point (batches are
    aligned to the stream's chunks, so the resumed prefill encodes the same batches as the whole one)."""
    engine = make_engine(family_checkpoint, policy, layout=layout)
    engine.vision_batch_frames = batch_chunks * engine.adapter.frames_per_chunk
    frames = video_for(engine)
    half = len(frames) // 2
    whole = engine.prefill(frames, fps=2.0)
    first = engine.prefill(frames[:half], fps=2.0)
    resumed = engine.prefill(frames[half:], fps=2.0, resume_from=first)
    assert first.num_chunks == whole.num_chunks // 2  # the cache resumed from is left as it was
    assert_bit_identical(whole, resumed)
    assert resumed.video.frame_indices == whole.video.frame_indices
    want = engine.ask(whole, QUESTION, max_new_tokens=4, output_scores=True)
    got = engine.ask(resumed, QUESTION, max_new_tokens=4, output_scores=True)
    assert got.token_ids == want.token_ids and all(torch.equal(x, y) for x, y in zip(got.scores, want.scores))


CHANGES = {
    "layout": dict(layout="video-first"),
    "chunks_per_step": dict(chunks_per_step=2),
    "sampling.fps": dict(sampling=SamplingConfig(fps=1.0, min_pixels=28 * 28, max_pixels=56 * 84)),
    "attention_backend": dict(attention_backend="torch"),
    "policy.capacity": dict(policy=StateKV(capacity=16)),
    "policy.name": dict(policy=Window(capacity=8)),
}


def check_resume_refused(path: str, field: str) -> None:
    engine = make_engine(path, StateKV(capacity=8))
    first = engine.prefill(video_for(engine, 2), fps=2.0)
    change = dict(CHANGES[field])
    other = make_engine(path, change.pop("policy", StateKV(capacity=8)), **change)
    with pytest.raises(PrefillConfigMismatchError, match=rf"prefill config field '{field}'") as info:
        other.prefill(video_for(engine, 2), fps=2.0, resume_from=first)
    assert info.value.field == field


# The refusal compares recorded prefill configs (PrefillConfig.first_difference) before any family code runs: every
# field is checked on one family, and every family refuses one change (was 8 families x 6 fields = 48 cases, two
# engine loads each, for a check that never touches family code).
@pytest.mark.parametrize("field", list(CHANGES))
@torch.inference_mode()
def test_resume_with_another_prefill_config_is_refused(tiny_checkpoints, field):
    check_resume_refused(tiny_checkpoints["qwen2_vl"], field)


@torch.inference_mode()
def test_every_family_refuses_a_resume_with_another_layout(family_checkpoint):
    check_resume_refused(family_checkpoint, "layout")


@torch.inference_mode()
def test_store_round_trip_answers_the_same(family_checkpoint, tmp_path):
    engine = make_engine(family_checkpoint, StateKV(capacity=8), layout="video-first")
    cache = engine.prefill(video_for(engine, 3), fps=2.0)
    manifest = save_cache(cache, str(tmp_path / "vid"))
    assert manifest["family"]["model_type"] == cache.model.model_type
    assert manifest["prefill"]["layout"] == "video-first"
    loaded = load_cache(str(tmp_path / "vid"), lazy=False)
    assert_bit_identical(cache, loaded)
    assert engine.ask(loaded, QUESTION, max_new_tokens=4).token_ids == engine.ask(cache, QUESTION,
                                                                                  max_new_tokens=4).token_ids
