"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

Total over every temperature >= 0 and top_p in (0, 1]: the softmax is taken over `(logits - max) / temperature`
in float64, so a temperature that underflows (1e-45, 1e-300, the smallest subnormal) sends every non-maximal
token to probability 0 instead of turning `inf - inf` into NaN; the limit is greedy among the tied maxima, which
is what temperature -> 0 means. The most likely token always survives the top-p cut, however small top_p is.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless temperature is a finite number >= 0 and top_p is in (0, 1]."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Float64 probabilities (V,) of temperature + top-p sampling: finite, >= 0, summing to 1 (temperature > 0)."""
    x = logits.detach().to(torch.float64)
    # a NaN logit is never picked; +inf counts as the largest finite value, so the maximum stays finite
    x = torch.nan_to_num(x, nan=-math.inf, posinf=torch.finfo(torch.float64).max)
    top = x.max()
    if not torch.isfinite(top):  # every logit -inf or NaN: nothing to prefer, pick uniformly
        return torch.full_like(x, 1.0 / x.numel())
    z = (x - top) / temperature  # (V,) <= 0, exactly 0 at the maxima; underflow gives -inf, never NaN
    probs = torch.exp(z)  # the maxima are exp(0) = 1, so the sum is >= 1
    probs /= probs.sum()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p, and always the most likely token
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return probs


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """Pick a token id from float logits (V,): greedy when temperature is 0."""
    check_sampling(temperature, top_p)
    if temperature == 0.0:
        return int(logits.argmax())
    probs = sampling_probs(logits, temperature=temperature, top_p=top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextDeltas:
    """The decoded text of a growing answer, given out piece by piece as tokens arrive (for streaming).

    A token that ends inside a multi-byte character decodes to U+FFFD; its text is held back until the character is
    complete, or until the last token, so that the pieces always join to the decoded whole answer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int, *, last: bool) -> str:
        """The text `token` adds (possibly "", held back); `last` gives out everything that is left."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not last and text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta
