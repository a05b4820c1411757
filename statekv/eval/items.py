"""What the harness asks: a video and a question, optionally with options and the correct letter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalItem:
    """One question about one video. With `options` and `answer` it is a multiple-choice item (scored)."""

    video: str
    question: str
    options: list[str] | None = None
    answer: str | None = None  # the correct option letter
    item_id: str | None = None

    @property
    def is_choice(self) -> bool:
        return self.options is not None and self.answer is not None
