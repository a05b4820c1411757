"""Held-out accuracy on the proxy task, per question type and video length, through an `Engine` (any policy,
retrieval or answer source) and optionally the plain transformers model over the processor's own sequence.

The engine answers from its cache; the reference runs `generate` of the checkpoint's own class on
`statekv.testing.reference_inputs` (the sequence the family's processor lays out). With `Full()` the two must agree:
that is what makes the proxy's accuracy a property of the model, and every other method's accuracy a property of
the method.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from statekv.eval.items import EvalItem
from statekv.eval.items import normalise_answer as normalise  # the harness's rule, one place
from statekv.proxy.task import QUESTION_TYPES, ProxyVideo, held_out_seed, make_video
from statekv.testing.reference_inputs import reference_inputs

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4  # a one-word answer and its end token, with room to see a wrong longer one


@dataclass
class ProxyRow:
    """Accuracy of one question type at one video length."""

    length: int  # frames
    type: str
    n: int
    correct: int
    reference_correct: int | None = None  # the plain model's, when run
    agree: int | None = None  # questions the engine and the plain model answered alike

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


@dataclass
class ProxyReport:
    """Per (length, type) rows, and every answer given (for a look at what went wrong)."""

    rows: list[ProxyRow]
    answers: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self, *, type: str | None = None, length: int | None = None) -> float:
        """Accuracy over the rows that match (all when neither is given)."""
        rows = [r for r in self.rows if (type is None or r.type == type) and (length is None or r.length == length)]
        n = sum(r.n for r in rows)
        return sum(r.correct for r in rows) / n if n else float("nan")

    def agreement(self) -> float | None:
        """Share of questions on which the engine and the plain model gave the same answer (None: not run)."""
        rows = [r for r in self.rows if r.agree is not None]
        return sum(r.agree for r in rows) / sum(r.n for r in rows) if rows else None

    def table(self) -> dict[str, dict[str, float]]:
        """{"<length>": {type: accuracy}} for a JSON record or a markdown table."""
        return {str(r.length): self.table_row(r.length) for r in self.rows}

    def table_row(self, length: int) -> dict[str, float]:
        return {r.type: round(r.accuracy, 4) for r in self.rows if r.length == length}

    def markdown(self) -> str:
        """The accuracy table, one row per length, one column per question type."""
        lengths = sorted({r.length for r in self.rows})
        types = [t for t in QUESTION_TYPES if any(r.type == t for r in self.rows)]
        lines = ["| frames | " + " | ".join(types) + " | all |", "| --- |" + " --- |" * (len(types) + 1)]
        for n in lengths:
            row = self.table_row(n)
            lines.append(f"| {n} | " + " | ".join(f"{row[t]:.2f}" if t in row else "–" for t in types)
                         + f" | {self.accuracy(length=n):.2f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "agreement": self.agreement()}


def held_out_videos(length: int, count: int) -> list[ProxyVideo]:
    """The fixed held-out videos of `length` frames (seeds disjoint from training's)."""
    return [make_video(length, held_out_seed(length, i)) for i in range(count)]


def proxy_items(lengths: list[int] | tuple[int, ...], videos_per_length: int, types: tuple[str, ...] = QUESTION_TYPES
                ) -> tuple[list[EvalItem], dict[str, tuple[Any, float]]]:
    """The held-out videos as the fidelity harness's items (`statekv eval --proxy`): every question type about
    each video, with its exact answer and type, and the videos' frames and fps by name (`run_fidelity(videos=)`)."""
    unknown = set(types) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; valid: {', '.join(QUESTION_TYPES)}")
    items: list[EvalItem] = []
    videos: dict[str, tuple[Any, float]] = {}
    for length in lengths:
        for i, video in enumerate(held_out_videos(length, videos_per_length)):
            name = f"proxy-{length}f-{i:03d}"
            videos[name] = (video.frames, video.fps)
            items += [EvalItem(video=name, question=video.questions[t].text, expected=video.questions[t].answer,
                               kind=t, item_id=f"{name}/{t}") for t in types]
    return items, videos


def plain_model_answers(reference: Any, adapter: Any, items: list[EvalItem], videos: dict[str, tuple[Any, float]],
                        frame_size: tuple[int, int], *, layout: str = "prefix-first") -> dict[str, str]:
    """{item_id: normalised answer} of the plain transformers model (`reference`) for proxy items, over the
    processor's sequence at the engine's `frame_size`: what `Full` through statekv must answer too."""
    out = {}
    for item in items:
        frames, fps = videos[item.video]
        out[item.item_id] = normalise(reference_answer(reference, adapter, frames, fps, item.question, frame_size,
                                                       layout=layout))
    return out


@torch.inference_mode()
def reference_answer(model: Any, adapter: Any, frames: Any, fps: float, question: str, frame_size: tuple[int, int],
                     *, layout: str = "prefix-first", max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The plain transformers model's greedy answer over the processor's sequence for a video's `frames` at `fps`
    (resized to `frame_size`, the engine's) and `question`."""
    inputs = reference_inputs(adapter, frames, question, layout, tuple(frame_size), fps)
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None  # positions from these input_ids, not a last call's
    eos = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=adapter.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return adapter.tokenizer.decode(new, skip_special_tokens=True)


def evaluate(engine: Any, *, lengths: list[int] | tuple[int, ...], videos_per_length: int,
             types: tuple[str, ...] = QUESTION_TYPES, reference: Any = None,
             progress: Any = None) -> ProxyReport:
    """Answer every question type on `videos_per_length` held-out videos per length with `engine` (prefilling each
    video once) and, when `reference` (the checkpoint's plain transformers model) is given, with it too.

    `progress(done, total)` is called after each video. The engine's policy, retrieval and answer source are the
    caller's: the same held-out set measures every method.
    """
    unknown = set(types) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; valid: {', '.join(QUESTION_TYPES)}")
    rows: list[ProxyRow] = []
    answers: list[dict[str, Any]] = []
    total, done = len(lengths) * videos_per_length, 0
    for length in lengths:
        counts = {t: ProxyRow(length, t, 0, 0, 0 if reference is not None else None,
                              0 if reference is not None else None) for t in types}
        for i, video in enumerate(held_out_videos(length, videos_per_length)):
            cache = engine.prefill(video.frames, fps=video.fps)
            for t in types:
                q = video.questions[t]
                got = normalise(engine.ask(cache, q.text, max_new_tokens=MAX_NEW_TOKENS).text)
                row = counts[t]
                row.n += 1
                row.correct += got == q.answer
                record = {"length": length, "video": i, "type": t, "answer": q.answer, "engine": got}
                if reference is not None:
                    ref = normalise(reference_answer(reference, engine.adapter, video.frames, video.fps, q.text,
                                                     cache.video.frame_size,
                                                     layout=engine.layout))
                    row.reference_correct += ref == q.answer
                    row.agree += ref == got
                    record["reference"] = ref
                answers.append(record)
            done += 1
            if progress is not None:
                progress(done, total)
        rows.extend(counts.values())
    return ProxyReport(rows, answers)
