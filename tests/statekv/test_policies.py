"""Carried-state policies on hand-made KV and scores."""

from __future__ import annotations

import pytest
import torch

from statekv.policies import Full, LayerState, StateKV, Window, make_policy


def layer(start: int, n: int, heads: int = 2, dim: int = 4) -> LayerState:
    """n tokens whose key/value encode their token index, so selections are easy to read."""
    index = torch.arange(start, start + n)
    keys = index.float().view(1, n, 1).expand(heads, n, dim).clone()
    return LayerState(keys, -keys, index.expand(heads, n).clone())


def test_full_concatenates_everything():
    state = Full().update(layer(0, 3), layer(3, 2), None)
    assert state.token_index[0].tolist() == [0, 1, 2, 3, 4]


def test_window_keeps_the_most_recent():
    state = Window(capacity=3).update(layer(0, 4), layer(4, 2), None)
    assert state.token_index.tolist() == [[3, 4, 5], [3, 4, 5]]
    assert torch.equal(state.keys[:, :, 0], state.token_index.float())


def test_statekv_keeps_top_scores_per_head_in_temporal_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.05, 0.7],
                           [0.6, 0.0, 0.2, 0.1, 0.9, 0.5]])
    state = StateKV(capacity=3).update(layer(0, 4), layer(4, 2), scores)
    assert state.token_index.tolist() == [[1, 3, 5], [0, 4, 5]]
    assert torch.equal(state.keys[:, :, 0], state.token_index.float())
    assert torch.equal(state.values[:, :, 0], -state.token_index.float())
    assert state.scores is None  # no decay: scores are recomputed every chunk


def test_statekv_with_room_keeps_everything():
    state = StateKV(capacity=10).update(layer(0, 4), layer(4, 2), torch.rand(2, 6))
    assert state.token_index[0].tolist() == list(range(6))


def test_statekv_decay_accumulates_scores():
    policy = StateKV(capacity=2, decay=0.5)
    first = policy.update(None, layer(0, 2), torch.tensor([[1.0, 4.0], [2.0, 2.0]]))
    assert first.scores.tolist() == [[1.0, 4.0], [2.0, 2.0]]
    # token 1 carries 4 * 0.5 = 2 into the next round and beats the new token 2 with 1.5
    second = policy.update(first, layer(2, 1), torch.tensor([[0.0, 0.0, 1.5], [0.0, 0.0, 3.0]]))
    # head 1: token 0 and 1 carry 1.0 each, token 2 brings 3.0 → ties broken by topk, token 2 always kept
    assert second.token_index[0].tolist() == [1, 2]
    assert 2 in second.token_index[1].tolist()
    assert second.scores[0].tolist() == [2.0, 1.5]


def test_statekv_rejects_missing_or_misshaped_scores():
    with pytest.raises(ValueError, match="needs the key scores"):
        StateKV(capacity=2).update(None, layer(0, 3), None)
    with pytest.raises(ValueError, match="do not match"):
        StateKV(capacity=2).update(None, layer(0, 3), torch.rand(2, 4))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_capacity_must_be_positive_integer(bad):
    with pytest.raises(ValueError, match="capacity"):
        Window(capacity=bad)
    with pytest.raises(ValueError, match="capacity"):
        StateKV(capacity=bad)


def test_make_policy_by_name_and_settings_round_trip():
    policy = make_policy("statekv", capacity=16, decay=0.9)
    assert policy == StateKV(capacity=16, decay=0.9)
    settings = policy.settings()
    assert settings == {"name": "statekv", "capacity": 16, "decay": 0.9}
    with pytest.raises(ValueError, match="valid policies: full, window, statekv"):
        make_policy("lru")
