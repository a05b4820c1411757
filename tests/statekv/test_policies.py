"""Carried-state policies on hand-made KV and scores."""

from __future__ import annotations

import pytest
import torch

from statekv.policies import Full, InfiniPotVStream, LayerState, StateKV, Window, make_policy


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


# --- infinipot-stream: statekv's per-chunk InfiniPot-V variant (the published rule: test_infinipot.py) ----------


def random_chunk(start: int, n: int, heads: int = 2, dim: int = 8, *, seed: int, keys: torch.Tensor | None = None,
                 values: torch.Tensor | None = None) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(heads, n, dim, generator=g) if keys is None else keys
    v = torch.ones(heads, n, dim) if values is None else values
    return LayerState(k, v, torch.arange(start, start + n).expand(heads, n).clone())


def run_chunks(policy, chunks):
    state = None
    for c in chunks:
        state = policy.update(state, c, None)
    return state


def test_infinipot_stream_with_budget_at_least_all_tokens_is_full():
    chunks = [random_chunk(6 * i, 6, seed=i) for i in range(5)]
    got, ref = run_chunks(InfiniPotVStream(budget=30), chunks), run_chunks(Full(), chunks)
    for a, b in ((got.keys, ref.keys), (got.values, ref.values), (got.token_index, ref.token_index)):
        assert torch.equal(a, b)


def test_infinipot_stream_budget_holds_for_any_length():
    policy = InfiniPotVStream(budget=10, recent=0.3, tar=0.5)
    state = None
    for i in range(40):
        state = policy.update(state, random_chunk(4 * i, 4, seed=i), None)
        assert state.size == min(10, 4 * (i + 1))
        assert bool((state.token_index.diff(dim=1) > 0).all())  # temporal order
    assert state.token_index[:, -3:].tolist() == [[157, 158, 159]] * 2  # newest 30 % of the budget kept


def test_infinipot_stream_temporal_redundancy_drops_the_tokens_that_repeat_the_previous_chunk():
    """Chunk 2 repeats chunk 1 at its first 4 spatial positions and is new at the last 4: with the whole
    non-recent budget given to TaR, the repeated tokens are the ones dropped (reversing novelty would keep them)."""
    first = random_chunk(0, 8, seed=0)
    fresh = random_chunk(8, 8, seed=1).keys
    second_keys = torch.cat([first.keys[:, :4], fresh[:, 4:]], dim=1)
    second = random_chunk(8, 8, seed=1, keys=second_keys)
    state = run_chunks(InfiniPotVStream(budget=12, recent=0.0, tar=1.0), [first, second])
    assert state.token_index.tolist() == [list(range(8)) + [12, 13, 14, 15]] * 2


def test_infinipot_stream_value_norm_fills_what_temporal_redundancy_leaves():
    values = torch.ones(2, 8, 8)
    values[:, [1, 6]] *= 10.0  # two tokens with large values
    state = run_chunks(InfiniPotVStream(budget=2, recent=0.0, tar=0.0),
                       [random_chunk(0, 8, seed=0, values=values), random_chunk(8, 8, seed=1)])
    assert state.token_index.tolist() == [[1, 6]] * 2  # the large-norm tokens survive, the newer chunk does not
    # TaR first, then VaN from what is left: the novel tokens of chunk 2 and then the large values
    state = run_chunks(InfiniPotVStream(budget=4, recent=0.0, tar=0.5),
                       [random_chunk(0, 8, seed=0, values=values), random_chunk(8, 8, seed=1)])
    assert set(state.token_index[0].tolist()) >= {1, 6} and state.size == 4


def test_infinipot_stream_all_recent_is_a_window():
    chunks = [random_chunk(5 * i, 5, seed=i) for i in range(6)]
    got, ref = run_chunks(InfiniPotVStream(budget=12, recent=1.0), chunks), run_chunks(Window(12), chunks)
    assert torch.equal(got.token_index, ref.token_index) and torch.equal(got.keys, ref.keys)
    assert make_policy("infinipot-stream", budget=12, recent=1.0) == InfiniPotVStream(budget=12, recent=1.0)
