"""InfiniPot-V as the stored-cache policy: only the bounded carried state is kept and answered from."""

from __future__ import annotations

import pytest
import torch

from statekv import Engine, Full
from statekv.policies import InfiniPotV
from statekv.retrieval import TopK
from statekv.store import load_cache, prefill_to_store
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
QUESTION = "Describe the video."


def engine_for(path, policy, answer_from="chunks"):
    return Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, sampling=SMALL,
                                  answer_from=answer_from)


def test_a_budget_above_all_tokens_answers_like_full(tiny_checkpoint):
    frames = synthetic_frames(16, 56, 84, seed=4)
    full = engine_for(tiny_checkpoint, Full())
    ref = full.ask(full.prefill(frames, fps=2.0), QUESTION, max_new_tokens=4, output_scores=True)
    bounded = engine_for(tiny_checkpoint, InfiniPotV(budget=10_000), answer_from="state")
    cache = bounded.prefill(frames, fps=2.0)
    assert cache.chunks == [] and cache.num_chunks == 8
    got = bounded.ask(cache, QUESTION, max_new_tokens=4, output_scores=True)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), rtol=0, atol=1e-5)
    assert got.token_ids == ref.token_ids
    with pytest.raises(ValueError, match="answers from its carried state"):
        bounded.ask(cache, QUESTION, retrieval=TopK(k=2))


def test_stored_bytes_and_state_stay_within_the_budget_for_any_length(tiny_checkpoints, tmp_path):
    engine = engine_for(tiny_checkpoints["qwen2_vl"], InfiniPotV(budget=20), answer_from="state")
    sizes = {}
    for n in (16, 64):
        uri = str(tmp_path / f"v{n}")
        manifest = prefill_to_store(engine, synthetic_frames(n, 56, 84, seed=n), uri, fps=2.0)
        assert [f["kind"] for f in manifest["files"]] == ["prefix", "state"]
        sizes[n] = manifest["totals"]["bytes"]
        cache = load_cache(uri)
        # frames of 6 tokens: the memory holds at most 3 (18 tokens), compressed to 2 when full
        assert cache.state_sizes() == [12] * engine.adapter.layout.num_layers
        in_memory = engine.prefill(synthetic_frames(n, 56, 84, seed=n), fps=2.0)
        a = engine.ask(cache, QUESTION, max_new_tokens=3, output_scores=True)
        b = engine.ask(in_memory, QUESTION, max_new_tokens=3, output_scores=True)
        torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), rtol=0, atol=0)
    assert abs(sizes[64] - sizes[16]) < 0.02 * sizes[16]  # 4x the video, the same bytes


def test_resuming_a_state_cache_is_exact(tiny_checkpoints):
    engine = engine_for(tiny_checkpoints["qwen2_5_vl"], InfiniPotV(budget=15), answer_from="state")
    frames = synthetic_frames(24, 56, 84, seed=9)
    whole = engine.prefill(frames, fps=2.0)
    part = engine.prefill(frames[12:], fps=2.0, resume_from=engine.prefill(frames[:12], fps=2.0))
    for a, b in zip(whole.state, part.state):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.token_index, b.token_index)
