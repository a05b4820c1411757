"""Fidelity metrics of an approximate setting's answer against `Full`'s answer to the same question."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_ref || P) in nats of the next-token distributions given by two logit vectors (V,).

    Computed in float64 from log-softmax so that near-identical distributions give ~0, not rounding noise.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits of shapes {tuple(reference_logits.shape)} and {tuple(logits.shape)} differ")
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return float(max(0.0, (log_p.exp() * (log_p - log_q)).sum().item()))


def greedy_agreement(reference: Sequence[int], tokens: Sequence[int]) -> float:
    """Share of the reference's greedy tokens reproduced before the first difference (1.0: identical answers).

    Greedy decoding is not teacher-forced: once the answers differ, later tokens answer different prefixes and are
    not comparable, so only the common leading run counts.
    """
    if not reference:
        return 1.0 if not tokens else 0.0
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same / len(reference)
