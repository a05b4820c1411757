"""The StateKV selection itself, against an independent re-implementation on the plain model's eager attention.

Why this test exists: every other test of StateKV checks properties that a wrong selection also has (capacity
kept, temporal order, capacity >= all tokens equals Full()) or the policy alone on hand-made scores. A mutant that
reverses the key scores the engine hands the policy (`scores[layer][0, :, prefix_len:].flip(-1)` in
statekv/engine.py: each key gets another key's mass) passes every other test (checked: test_engine,
test_policies, test_ops_attention stay green; these four fail), as would scores sliced at the wrong offset or
summed over the wrong heads. Here the engine's carried
token indices after every chunk, at every layer and KV head, must equal those chosen by
`statekv.testing.selection.reference_selection` (transformers' eager attention with output_attentions, summed
over the chunk's queries and the query heads of each KV group, top-capacity per layer and KV head, temporal
order), for both layouts and every family in the adapters registry (Qwen3-VL with its DeepStack inputs).
`test_the_check_catches_reversed_scores` runs the same comparison on
exactly that mutant and requires it to be caught.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from statekv import Engine, StateKV
from statekv.policies import LayerState
from statekv.testing.reference import reference_model
from statekv.testing.reference_inputs import reference_inputs
from statekv.testing.selection import reference_selection
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)  # 6 tokens per chunk
CAPACITY = 8


@dataclass
class RecordingStateKV(StateKV):
    """StateKV that records the token indices it carries after each update (layer by layer, chunk by chunk)."""

    carried: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    def update_merged(self, merged, state_size, carried, scores):  # what the engine calls
        new = super().update_merged(merged, state_size, carried, scores)
        self.carried.append(new.token_index.cpu().clone())
        return new

    def settings(self):
        return {"name": self.name, "capacity": self.capacity, "decay": self.decay}


@dataclass
class ReversedStateKV(RecordingStateKV):
    """The mutant: keeps the keys with the least attention mass."""

    def update_merged(self, merged, state_size, carried, scores):
        return super().update_merged(merged, state_size, carried, -scores)


def engine_selection(path: str, policy: RecordingStateKV, frames: np.ndarray, layout: str):
    engine = Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, sampling=SMALL,
                                    layout=layout)
    cache = engine.prefill(frames, fps=2.0)
    layers = len(engine.adapter.layout.attention_layers)  # the policy sees attention layers only
    per_chunk = [policy.carried[i:i + layers] for i in range(0, len(policy.carried), layers)]
    return engine, cache, per_chunk


def mismatches(path: str, policy: RecordingStateKV, frames: np.ndarray, layout: str) -> list[tuple[int, int]]:
    """(chunk, layer) pairs where the engine's carried indices differ from the re-implementation's."""
    engine, cache, ours = engine_selection(path, policy, frames, layout)
    model = reference_model(path, attn_implementation="eager")
    inputs = reference_inputs(engine.adapter, frames, "What happens?", layout, cache.video.frame_size,
                                             cache.video.sampled_fps)
    theirs = reference_selection(model, inputs, cache.prefix_len, cache.chunk_tokens, CAPACITY)
    assert len(ours) == len(theirs) == cache.num_chunks
    return [(c, l) for c, (a, b) in enumerate(zip(ours, theirs)) for l, (x, y) in enumerate(zip(a, b))
            if not torch.equal(x, y)]


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synthetic_frames(12, 56, 84, seed=11)  # 6 chunks of 6 tokens: selection from 14 -> 8 from chunk 2 on


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
def test_engine_carries_exactly_the_keys_the_rule_selects(family_checkpoint, frames, layout):
    assert mismatches(family_checkpoint, RecordingStateKV(capacity=CAPACITY), frames, layout) == []


def test_the_check_catches_reversed_scores(tiny_checkpoints, frames):
    wrong = mismatches(tiny_checkpoints["qwen2_vl"], ReversedStateKV(capacity=CAPACITY), frames, "prefix-first")
    assert len(wrong) >= 4  # from the first real selection on, at every layer


def test_recording_policy_carries_what_statekv_carries(tiny_checkpoints, frames):
    """The recording subclass changes nothing: its final state is StateKV's."""
    path = tiny_checkpoints["qwen2_5_vl"]
    plain = Engine.from_pretrained(path, policy=StateKV(capacity=CAPACITY), device="cpu", dtype=torch.float32,
                                   sampling=SMALL).prefill(frames, fps=2.0)
    _, recorded, per_chunk = engine_selection(path, RecordingStateKV(capacity=CAPACITY), frames, "prefix-first")
    for a, b, last in zip(plain.state, recorded.state, per_chunk[-1]):
        assert isinstance(a, LayerState) and torch.equal(a.token_index, b.token_index)
        assert torch.equal(b.token_index, last)
