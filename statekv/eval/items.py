"""What the harness asks: a video and a question, optionally with options and the correct letter, or with the exact
short answer (the proxy task's one-word answers)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalItem:
    """One question about one video. With `options` and `answer` it is a multiple-choice item (scored by the
    letter); with `expected` an open question scored by its exact answer (compared after `normalise_answer`).
    `video` is a path, or a name the harness is given frames for (`run_fidelity(videos=...)`)."""

    video: str
    question: str
    options: list[str] | None = None
    answer: str | None = None  # the correct option letter
    item_id: str | None = None
    expected: str | None = None  # the exact answer of an open question
    kind: str | None = None  # the question's type, for accuracy per type (the proxy task's "shape", "after", ...)

    @property
    def is_choice(self) -> bool:
        return self.options is not None and self.answer is not None

    @property
    def is_scored(self) -> bool:
        return self.is_choice or self.expected is not None


def normalise_answer(text: str) -> str:
    """An open answer as compared with `EvalItem.expected`: lower case, no surrounding space or punctuation."""
    return re.sub(r"^\W+|\W+$", "", text.strip().lower())
