"""InfiniPot-V as published (statekv.policies.InfiniPotV) against an independent implementation of the paper's rule.

The reference below is written from the paper and the description of its reference code (docs/methods.md), in plain
loops over heads, tokens and frames, calling nothing of statekv's: the memory fills frame after frame; when it holds
the budget's whole frames it is compressed to the target's frames. A compression keeps, per KV head, the newest
int(F * recent) of the F frames held (the recent window), then the older tokens least similar (mean cosine
similarity over the recent frames, same slot within the frame) until TaR's share (tar of the kept tokens, window
included) is filled, then the largest value norms among the rest.
"""

from __future__ import annotations

import math

import pytest
import torch

from statekv.policies import Full, InfiniPotV, LayerState, make_policy


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / ((a.norm() + 1e-9) * (b.norm() + 1e-9)))


def reference_compress(keys, values, frame, keep_frames, recent, tar):
    """Per head, the sorted slots one compression keeps of keys/values (H, F * frame, D)."""
    heads, size, _ = keys.shape
    frames = size // frame
    keep = keep_frames * frame
    kept = []
    for h in range(heads):
        pinned: list[int] = []
        window = min(int(frames * recent), keep_frames) if tar > 0 else 0
        if window > 0:
            old = (frames - window) * frame
            similarity = []
            for j in range(old):
                spot = j % frame  # the slot within its frame
                sims = [_cos(keys[h, j], keys[h, q * frame + spot]) for q in range(frames - window, frames)]
                similarity.append(sum(sims) / len(sims))
            tar_share = keep - round((1 - tar) * keep)
            n_tar = max(0, tar_share - window * frame)
            most_novel = sorted(range(old), key=lambda j: similarity[j])[:n_tar]
            pinned = most_novel + list(range(old, size))
        rest = sorted((j for j in range(size) if j not in pinned), key=lambda j: -float(values[h, j].double().norm()))
        kept.append(sorted(pinned + rest[:keep - len(pinned)]))
    return kept


def reference_stream(steps, budget, target, recent, tar):
    """Token indices (per head) the memory holds after each step; steps: list of (keys, values) (H, k * frame, D)
    with `frame` tokens per frame, given as (keys, values, frame)."""
    heads = steps[0][0].shape[0]
    mem_k = [[] for _ in range(heads)]  # per head: list of (token index, key, value)
    held = []
    token = 0
    for keys, values, frame in steps:
        for h in range(heads):
            for j in range(keys.shape[1]):
                mem_k[h].append((token + j, keys[h, j], values[h, j]))
        token += keys.shape[1]
        size = len(mem_k[0])
        budget_frames = max(1, budget // frame)
        if size >= budget_frames * frame:
            keep_frames = max(1, int(budget_frames * target))
            if size > keep_frames * frame:
                k = torch.stack([torch.stack([x[1] for x in mem_k[h]]) for h in range(heads)])
                v = torch.stack([torch.stack([x[2] for x in mem_k[h]]) for h in range(heads)])
                slots = reference_compress(k, v, frame, keep_frames, recent, tar)
                mem_k = [[mem_k[h][s] for s in slots[h]] for h in range(heads)]
        held.append([[x[0] for x in mem_k[h]] for h in range(heads)])
    return held


def run_policy(policy, steps):
    """Drive the policy as the engine does: update_merged on [state; step], told the step's chunk sizes."""
    state, held, token = None, [], 0
    for keys, values, frame in steps:
        n = keys.shape[1]
        step = LayerState(keys, values, torch.arange(token, token + n).expand(keys.shape[0], n).clone())
        token += n
        merged = LayerState.concat(state, step)
        state = policy.update_merged(merged, 0 if state is None else state.size, None, None,
                                     chunk_tokens=(frame,) * (n // frame))
        held.append(state.token_index.tolist())
    return held, state


def random_steps(heads, frame, dim, frames, per_step, seed):
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(math.ceil(frames / per_step)):
        n = per_step * frame
        steps.append((torch.randn(heads, n, dim, generator=g),
                      torch.randn(heads, n, dim, generator=g) * torch.rand(heads, n, 1, generator=g), frame))
    return steps


@pytest.mark.parametrize("heads,frame,dim,frames,per_step,budget,target,recent,tar", [
    (2, 4, 8, 20, 1, 32, 0.75, 0.25, 0.5),  # 8 frames held, compressed to 6
    (1, 6, 16, 25, 2, 60, 0.75, 0.25, 0.5),  # two frames a step, a budget of 10 frames
    (3, 5, 4, 70, 1, 5 * 32, 0.75, 0.25, 0.5),  # the paper's 32 frames -> 24
    (2, 3, 8, 30, 3, 3 * 12 + 2, 0.5, 0.5, 0.25),  # a budget that is not whole frames
    (2, 4, 8, 24, 1, 32, 0.75, 0.25, 1.0),  # TaR only
    (2, 4, 8, 24, 1, 32, 0.75, 0.25, 0.0),  # VaN only (no recent window, as in the reference code)
    (2, 4, 8, 24, 1, 32, 0.5, 0.5, 0.9),  # TaR's share smaller than the recent window
])
def test_infinipot_equals_an_independent_implementation_of_the_published_rule(heads, frame, dim, frames, per_step,
                                                                               budget, target, recent, tar):
    steps = random_steps(heads, frame, dim, frames, per_step, seed=heads * 100 + frame)
    expected = reference_stream(steps, budget, target, recent, tar)
    got, state = run_policy(InfiniPotV(budget=budget, target=target, recent=recent, tar=tar), steps)
    assert got == expected
    assert max(len(h[0]) for h in got) <= budget


def test_infinipot_fills_then_compresses_block_wise():
    """The memory grows to the budget (8 frames of 4 tokens) and is compressed to 6 frames only when full: the
    earlier rule compressed after every chunk once over budget."""
    steps = random_steps(2, 4, 8, 12, 1, seed=3)
    held, _ = run_policy(InfiniPotV(budget=32), steps)
    assert [len(h[0]) for h in held] == [4, 8, 12, 16, 20, 24, 28, 24, 28, 24, 28, 24]


def test_infinipot_tar_keeps_the_tokens_that_differ_from_the_recent_frames():
    """Frames 0-2 against the recent frame 3 (the newest of the 4 held; 2 kept): the four old tokens whose key is
    opposite the recent key at their slot are kept, the repeated ones dropped. Reversed scores would keep repeats;
    a recent window taken from the oldest frame would keep frame 0 whole."""
    g = torch.Generator().manual_seed(0)
    recent = torch.randn(1, 4, 8, generator=g)  # (H, frame, D)
    f0, f1, f2 = recent.clone(), recent.clone(), recent.clone()
    f1[:, 2:] = -recent[:, 2:]  # novel at slots 2 and 3
    f2[:, :2] = -recent[:, :2]  # novel at slots 0 and 1
    keys = torch.cat([f0, f1, f2, recent], dim=1)
    values = torch.ones(1, 16, 8)
    steps = [(keys[:, 4 * i:4 * i + 4], values[:, 4 * i:4 * i + 4], 4) for i in range(4)]
    held, _ = run_policy(InfiniPotV(budget=16, target=0.5, recent=0.25, tar=1.0), steps)
    assert held[-1] == [[6, 7, 8, 9, 12, 13, 14, 15]]
    assert reference_stream(steps, 16, 0.5, 0.25, 1.0)[-1] == held[-1]


def test_infinipot_van_keeps_the_largest_values_outside_tar():
    """With TaR's share equal to the recent window, VaN picks every other kept token: the largest value norms."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 16, 8, generator=g)
    values = torch.ones(2, 16, 8)
    values[0, [1, 5]] *= 10.0
    values[1, [2, 9]] *= 10.0
    steps = [(keys[:, 4 * i:4 * i + 4], values[:, 4 * i:4 * i + 4], 4) for i in range(4)]
    held, _ = run_policy(InfiniPotV(budget=16, target=0.75, recent=0.25, tar=1 / 3), steps)
    # keep 12 tokens: the recent frame (12-15) = TaR's share round-trip (12 - round(2/3 * 12) = 4), VaN 8 more
    top = [sorted([1, 5] + list(range(12, 16))), sorted([2, 9] + list(range(12, 16)))]
    for h in range(2):
        assert set(top[h]) <= set(held[-1][h]) and len(held[-1][h]) == 12


def test_infinipot_with_a_budget_above_all_tokens_is_full():
    """A memory that never holds the budget's whole frames is never compressed (5 frames of 6 tokens; a budget of
    31 tokens is 5 whole frames, full after the last one)."""
    steps = random_steps(2, 6, 8, 5, 1, seed=4)
    assert run_policy(InfiniPotV(budget=31), steps)[1].size == 18
    got = run_policy(InfiniPotV(budget=36), steps)[1]
    ref = None
    for keys, values, _ in steps:
        n = keys.shape[1]
        start = 0 if ref is None else ref.size
        ref = Full().update(ref, LayerState(keys, values, torch.arange(start, start + n).expand(2, n).clone()), None)
    for a, b in ((got.keys, ref.keys), (got.values, ref.values), (got.token_index, ref.token_index)):
        assert torch.equal(a, b)


def test_infinipot_needs_frames_of_equal_size_only_when_it_compresses():
    policy = InfiniPotV(budget=10)
    merged = LayerState(torch.randn(1, 7, 4), torch.randn(1, 7, 4), torch.arange(7).view(1, 7))
    assert policy.update_merged(merged, 3, None, None, chunk_tokens=(4,)).size == 7  # not full: nothing to check
    merged = LayerState(torch.randn(1, 13, 4), torch.randn(1, 13, 4), torch.arange(13).view(1, 13))
    with pytest.raises(ValueError, match="infinipot-stream"):
        policy.update_merged(merged, 9, None, None, chunk_tokens=(4,))


def test_infinipot_settings_round_trip():
    policy = make_policy("infinipot", budget=64, target=0.5, recent=0.25, tar=0.5)
    assert policy == InfiniPotV(budget=64, target=0.5)
    assert policy.settings() == {"name": "infinipot", "budget": 64, "target": 0.5, "recent": 0.25, "tar": 0.5}
    with pytest.raises(ValueError, match="target"):
        InfiniPotV(target=1.5)


@pytest.mark.parametrize("chunks_per_step", [1, 2])
def test_the_engine_state_is_the_published_rule_on_the_chunks_it_made(tiny_checkpoints, chunks_per_step):
    """End to end: the engine tells the policy its chunks' sizes (6 tokens each here), so the carried state after a
    prefill is the reference's memory over the very K/V each step produced (stored as the cache's chunks). Taking a
    two-chunk step for one frame would give a 12-token state instead of 18 (5 frames held at most, 3 kept)."""
    from statekv import Engine
    from statekv.testing.videos import synthetic_frames
    from statekv.video import SamplingConfig

    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=InfiniPotV(budget=30), device="cpu",
                                    dtype=torch.float32, chunks_per_step=chunks_per_step,
                                    sampling=SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84))
    cache = engine.prefill(synthetic_frames(16, 56, 84, seed=5), fps=2.0)
    assert set(cache.chunk_tokens) == {6} and cache.num_chunks == 8
    for layer, state in enumerate(cache.state):
        steps = []
        for i in range(0, cache.num_chunks, chunks_per_step):
            group = cache.chunks[i:i + chunks_per_step]
            steps.append((torch.cat([c.keys[layer] for c in group], dim=1),
                          torch.cat([c.values[layer] for c in group], dim=1), 6))
        expected = reference_stream(steps, 30, 0.75, 0.25, 0.5)[-1]
        assert state.token_index.tolist() == expected
        assert state.size == {1: 24, 2: 18}[chunks_per_step]  # 8 chunks: ..., 30 -> 18, 24 / ..., 36 -> 18, 30 -> 18
        flat_k = torch.cat([s[0] for s in steps], dim=1)
        assert torch.equal(state.keys, flat_k.gather(1, state.token_index.unsqueeze(-1).expand_as(state.keys)))
