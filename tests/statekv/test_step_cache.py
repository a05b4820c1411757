"""The streaming prefill's preallocated cache (statekv/step_cache.py) and the policies' in-buffer update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv import Engine, Full, StateKV, Window
from statekv.policies import InfiniPotV, InfiniPotVStream, LayerState, Policy
from statekv.step_cache import StepLayer
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)  # 6 tokens per chunk


def kv(n: int, start: int = 0, heads: int = 2, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, heads, n, dim) keys/values that encode their position, so moves are easy to read."""
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, heads, n, dim).clone()
    return k, -k


def test_step_layer_writes_in_place_and_the_model_sees_prefix_state_step():
    layer = StepLayer(kv(2, start=100), None, reserve=3)
    storage = layer.keys.untyped_storage().data_ptr()
    keys, values = layer.update(*kv(3))
    assert keys.shape == (1, 2, 5, 4) and keys[0, 0, :, 0].tolist() == [100, 101, 0, 1, 2]
    assert torch.equal(values, -keys) and layer.get_seq_length() == 5 and layer.get_mask_sizes(1) == (6, 0)
    state = Full().update_merged(layer.merged(0), layer.state_size, None, None)
    layer.commit(state)  # Full's next state is [state | step] where it already lies
    assert layer.state_size == 3 and layer.keys.untyped_storage().data_ptr() == storage
    layer.begin_step()
    layer.update(*kv(3, start=3))  # the buffer holds 2 + 3 + 3 > its 5 columns: it grows, content kept
    assert layer.keys[0, 1, :, 0].tolist() == [100, 101, 0, 1, 2, 3, 4, 5]
    assert layer.merged(3).token_index[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_window_tail_moved_onto_an_overlapping_state_keeps_its_values():
    """Regression guard: Window's next state is a view of the same buffer overlapping the state's place."""
    layer = StepLayer(kv(1, start=100), LayerState(*[t[0] for t in kv(4)], torch.arange(4).expand(2, -1)),
                      reserve=2)
    layer.begin_step()
    layer.update(*kv(2, start=4))
    layer.commit(Window(capacity=5).update_merged(layer.merged(4), layer.state_size, None, None))
    state = layer.state()
    assert state.keys[0, :, 0].tolist() == [1, 2, 3, 4, 5] == state.token_index[0].tolist()
    assert layer.keys[0, 0, :, 0].tolist() == [100, 1, 2, 3, 4, 5]


def _merged(state_size: int, n: int, heads: int = 2, dim: int = 8) -> LayerState:
    g = torch.Generator().manual_seed(state_size * 31 + n)
    keys = torch.randn(heads, state_size + n, dim, generator=g)
    return LayerState(keys, torch.randn(heads, state_size + n, dim, generator=g),
                      torch.arange(state_size + n).expand(heads, -1).clone())


@pytest.mark.parametrize("policy", [Full(), Window(capacity=5), StateKV(capacity=5), StateKV(capacity=5, decay=0.5),
                                    StateKV(capacity=40), InfiniPotVStream(budget=5), InfiniPotV(budget=6)],
                         ids=repr)
@pytest.mark.parametrize("state_size", [0, 4, 9])
def test_update_merged_equals_update(policy, state_size):
    """The engine's in-buffer path gives exactly the state `update` gives on separate tensors."""
    merged, n = _merged(state_size, 3), 3
    if isinstance(policy, InfiniPotV) and state_size % n:
        pytest.skip("InfiniPot-V holds whole frames (here: chunks of 3 tokens)")
    heads = merged.keys.shape[0]
    carried = torch.rand(heads, state_size) if state_size else None
    scores = torch.rand(heads, state_size + n)
    state = None if not state_size else LayerState(merged.keys[:, :state_size].clone(),
                                                   merged.values[:, :state_size].clone(),
                                                   merged.token_index[:, :state_size].clone(), carried)
    chunk = LayerState(merged.keys[:, state_size:].clone(), merged.values[:, state_size:].clone(),
                       merged.token_index[:, state_size:].clone())
    expected = policy.update(state, chunk, scores if policy.needs_scores else None)
    got = policy.update_merged(merged, state_size, carried, scores if policy.needs_scores else None)
    for name in ("keys", "values", "token_index", "scores"):
        a, b = getattr(expected, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name


class Spy(Policy):
    """Full, recording where its merged [state | step] lies: the same storage every step means no new cache."""

    name = "spy"

    def __init__(self, inner: Policy) -> None:
        self.inner, self.storages = inner, []
        self.needs_scores = inner.needs_scores

    def update_merged(self, merged, state_size, carried, scores):
        self.storages.append(merged.keys.untyped_storage().data_ptr())
        return self.inner.update_merged(merged, state_size, carried, scores)

    def settings(self):
        return self.inner.settings()


def test_a_bounded_policy_streams_in_one_buffer(tiny_checkpoints):
    """Before, every step built a new DynamicCache by concatenating [prefix | state]: a new storage each step."""
    spy = Spy(StateKV(capacity=12))
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=spy, device="cpu", dtype=torch.float32,
                                    sampling=SMALL)
    frames = synthetic_frames(16, 56, 84, seed=5)  # 8 chunks, capacity reached after 2
    cache = engine.prefill(frames, fps=2.0)
    layers = len(engine.adapter.layout.attention_layers)
    per_layer = [spy.storages[i::layers] for i in range(layers)]
    assert all(len(s) == 8 and len(set(s)) == 1 for s in per_layer), per_layer
    # what leaves the prefill (chunks, final state) shares no memory with the buffers
    buffers = set(spy.storages)
    assert all(k.untyped_storage().data_ptr() not in buffers for c in cache.chunks for k in c.keys if k is not None)
    assert all(s.keys.untyped_storage().data_ptr() not in buffers for s in cache.state if s is not None)
    assert cache.state_sizes() == [12] * layers


def test_only_policies_that_need_scores_get_them(tiny_checkpoints, monkeypatch):
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SMALL)
    seen = []
    decode = engine.adapter.decode

    def recording(*args, **kwargs):
        seen.append(kwargs.get("statekv_scores"))
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.adapter, "decode", recording)
    frames = synthetic_frames(4, 56, 84, seed=1)
    for policy, wanted in ((Full(), False), (Window(capacity=6), False), (StateKV(capacity=6), True)):
        seen.clear()
        Engine(engine.adapter, policy=policy, sampling=SMALL).prefill(frames, fps=2.0)
        chunk_calls = seen[1:]  # the prefix's call never asks for scores
        assert chunk_calls and all((s is not None) == wanted for s in chunk_calls), (policy, chunk_calls)
    assert np.all([s is None for s in seen[:1]])
