"""Sampling is total: every temperature >= 0 and top_p in (0, 1] that validation admits picks a valid token."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statekv.generation import check_sampling, next_token, sampling_probs

VOCAB = 32
TINY = [5e-324, 1e-320, 1e-300, 1e-45, 1e-40, 1e-38, 1e-30, 1e-12]

logit_values = st.floats(allow_nan=False, allow_infinity=False, width=32)
logits_strategy = st.lists(logit_values, min_size=2, max_size=VOCAB).map(lambda v: torch.tensor(v))
temperatures = st.floats(min_value=0.0, max_value=1e308, allow_nan=False, allow_infinity=False,
                         allow_subnormal=True, exclude_min=True)
top_ps = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=True)


@settings(max_examples=300, deadline=None, database=None)
@given(logits=logits_strategy, temperature=temperatures, top_p=top_ps, seed=st.integers(0, 2**63 - 1))
def test_sampling_total(logits, temperature, top_p, seed):
    probs = sampling_probs(logits, temperature=temperature, top_p=top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)
    full = sampling_probs(logits, temperature=temperature)
    assert (probs > 0)[full == full.max()].any()  # a most likely token always survives the top-p cut
    token = next_token(logits, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed))
    assert 0 <= token < len(logits) and probs[token] > 0


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_underflowing_temperature_is_greedy(temperature, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(VOCAB) * 5).to(dtype)
    want = int(logits.argmax())
    gen = torch.Generator().manual_seed(1)
    assert {next_token(logits, temperature=temperature, generator=gen) for _ in range(20)} == {want}
    assert next_token(logits, temperature=temperature, top_p=5e-324, generator=gen) == want


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([1.0, 3.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    for top_p in (5e-324, 1e-46, 1e-45, 1e-6):
        assert next_token(logits, temperature=1.0, top_p=top_p, generator=gen) == 1


def test_ties_at_the_maximum_share_the_mass():
    probs = sampling_probs(torch.tensor([2.0, 2.0, -1.0]), temperature=1e-300)
    assert probs.tolist() == [0.5, 0.5, 0.0]


def test_non_finite_logits_never_crash():
    gen = torch.Generator().manual_seed(0)
    assert next_token(torch.tensor([0.0, math.inf, 1.0]), temperature=0.5, generator=gen) == 1
    assert next_token(torch.tensor([math.nan, 1.0, 0.0]), temperature=0.5, top_p=1e-9, generator=gen) == 1
    assert 0 <= next_token(torch.tensor([-math.inf, -math.inf]), temperature=1.0, generator=gen) < 2


def test_huge_temperature_is_uniform():
    probs = sampling_probs(torch.tensor([0.0, 10.0, -10.0, 3.0]), temperature=1.7976931348623157e308)
    assert torch.allclose(probs, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("temperature, top_p", [(-1.0, 1.0), (math.nan, 1.0), (math.inf, 1.0), (1.0, 0.0),
                                                (1.0, 1.0000001), (1.0, math.nan), (-5e-324, 1.0)])
def test_out_of_domain_rejected(temperature, top_p):
    with pytest.raises(ValueError):
        check_sampling(temperature, top_p)
    with pytest.raises(ValueError):
        next_token(torch.zeros(3), temperature=temperature, top_p=top_p)


def test_text_deltas_hold_back_a_split_character_and_join_to_the_answer(tiny_checkpoints):
    """A byte-level tokenizer splits an emoji over several tokens: no piece shows U+FFFD, a piece is held back
    while the character is incomplete, and the pieces join to the decoded answer."""
    from transformers import AutoTokenizer

    from statekv.generation import TextDeltas

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2_vl"])
    ids = tokenizer.encode("a\U0001F600b\u00e9", add_special_tokens=False)
    assert len(ids) > 4  # the emoji takes more than one token
    text = TextDeltas(tokenizer)
    pieces = [text.add(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids) == "a\U0001F600b\u00e9"
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
    cut = TextDeltas(tokenizer)  # an answer that ends mid-character gives out what it has at its last token
    partial = [cut.add(t, last=i == 1) for i, t in enumerate(ids[:2])]
    assert "".join(partial) == tokenizer.decode(ids[:2])
