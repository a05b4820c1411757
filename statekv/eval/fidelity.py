"""Run `Full` and other settings over the same videos and questions; measure fidelity against `Full` and cost.

Each video is prefilled once per setting into a store (`store_root/<setting>/<video_id>`), exactly as the indexing
pipeline does, and every question is answered from the stored cache, loaded cold and lazily through a `ReadMeter`,
so "bytes read per question" and "answer latency" are what a service pays for a cache it does not hold yet.

Scored items (multiple choice, or open questions with an exact `expected` answer such as the proxy task's) add
accuracy: overall with its standard error, and per question type (`EvalItem.kind`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from statekv.eval.choice import choice_prompt, letter_token_ids, predicted_letter
from statekv.eval.items import EvalItem, normalise_answer
from statekv.eval.metering import ReadMeter
from statekv.eval.metrics import first_token_kl, greedy_agreement
from statekv.eval.settings import Setting
from statekv.profiling import count_flops
from statekv.store import load_cache, prefill_to_store
from statekv.store.fs import resolve

logger = logging.getLogger(__name__)


@dataclass
class ItemResult:
    """One setting's answer to one item, with its fidelity against `Full` and its cost."""

    setting: str
    video: str
    item: str
    first_token_kl: float
    top1_agree: bool
    greedy_agreement: float
    answer_tokens: list[int]
    first_token_s: float
    answer_s: float
    bytes_read: int
    read_requests: int
    predicted: str | None = None  # the letter chosen, or an open question's normalised answer
    correct: bool | None = None
    kind: str | None = None  # the item's question type


@dataclass
class VideoCost:
    """What prefilling one video with one setting cost and stored."""

    setting: str
    video: str
    prefill_flops: int | None
    prefill_s: float
    stored_bytes: int
    chunks: int
    tokens: int


@dataclass
class FidelityReport:
    """Rows per (setting, item) and per (setting, video), and a summary per setting."""

    settings: list[str]
    items: list[ItemResult] = field(default_factory=list)
    videos: list[VideoCost] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per setting: means over items and videos (accuracy only for scored items: multiple choice, or
        open questions with an exact answer)."""
        out = []
        for name in self.settings:
            items = [r for r in self.items if r.setting == name]
            videos = [v for v in self.videos if v.setting == name]
            scored = [r for r in items if r.correct is not None]
            accuracy = _mean(float(r.correct) for r in scored) if scored else None
            kinds = sorted({r.kind for r in scored if r.kind is not None})
            flops = [v.prefill_flops for v in videos if v.prefill_flops is not None]
            out.append({
                "setting": name,
                "questions": len(items),
                "first_token_kl": _mean(r.first_token_kl for r in items),
                "top1_agreement": _mean(float(r.top1_agree) for r in items),
                "greedy_agreement": _mean(r.greedy_agreement for r in items),
                "accuracy": accuracy,
                # binomial standard error: differences between settings within ~2 of it are not significant
                "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(scored)) if scored else None,
                "accuracy_by_kind": {k: _mean(float(r.correct) for r in scored if r.kind == k) for k in kinds},
                "prefill_flops": _mean(flops) if flops else None,
                "prefill_s": _mean(v.prefill_s for v in videos),
                "stored_bytes": _mean(v.stored_bytes for v in videos),
                "bytes_read_per_question": _mean(r.bytes_read for r in items),
                "first_token_s_p50": _median(r.first_token_s for r in items),
                "answer_s_p50": _median(r.answer_s for r in items),
            })
        return out

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "summary": self.summary(), "items": [asdict(r) for r in self.items],
                "videos": [asdict(v) for v in self.videos]}

    def to_markdown(self) -> str:
        """The summary as a Markdown table (relative figures: `Full` is the reference row)."""
        rows = self.summary()
        head = ("| setting | KL(first token) | top-1 agree | greedy agree | accuracy | prefill GFLOPs | "
                "stored MB | read MB/question | first token s (p50) |")
        lines = [head, "|" + " --- |" * (head.count("|") - 1)]
        for r in rows:
            lines.append(
                f"| {r['setting']} | {r['first_token_kl']:.3g} | {r['top1_agreement']:.2f} | "
                f"{r['greedy_agreement']:.2f} | {_fmt(r['accuracy'], '.3f')} | "
                f"{_fmt(None if r['prefill_flops'] is None else r['prefill_flops'] / 1e9, '.3f')} | "
                f"{r['stored_bytes'] / 1e6:.3f} | {r['bytes_read_per_question'] / 1e6:.3f} | "
                f"{r['first_token_s_p50']:.3f} |")
        return "\n".join(lines) + "\n" + self._kinds_markdown(rows)

    @staticmethod
    def _kinds_markdown(rows: list[dict[str, Any]]) -> str:
        """Accuracy per question type (with its standard error overall), when the items have types."""
        kinds = sorted({k for r in rows for k in r["accuracy_by_kind"]})
        if not kinds:
            return ""
        lines = ["", "| setting | accuracy (± s.e.) | " + " | ".join(kinds) + " |",
                 "|" + " --- |" * (len(kinds) + 2)]
        for r in rows:
            by_kind = r["accuracy_by_kind"]
            lines.append(f"| {r['setting']} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | "
                         + " | ".join(_fmt(by_kind.get(k), ".2f") for k in kinds) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
        """Write report.json, report.md and (with matplotlib installed) fidelity.png under `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=2))
        paths["markdown"].write_text(self.to_markdown())
        if plot:
            from statekv.eval.plot import plot_fidelity

            paths["plot"] = plot_fidelity(self.summary(), out / "fidelity.png")
        return paths


def _mean(values) -> float:
    values = list(values)
    return float(statistics.fmean(values)) if values else float("nan")


def _median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _video_key(video: str) -> str:
    stem = _slug(Path(video.rstrip("/")).stem)[:48] or "video"
    return f"{stem}-{hashlib.sha1(video.encode()).hexdigest()[:8]}"


def _question_text(item: EvalItem) -> str:
    return choice_prompt(item.question, item.options) if item.is_choice else item.question


def run_fidelity(engine: Any, items: list[EvalItem], settings: list[Setting], *, store_root: str | os.PathLike,
                 max_new_tokens: int = 16, measure_flops: bool = False, storage_options: Any = None,
                 progress: Callable[[str], None] | None = None,
                 videos: Mapping[str, tuple[Any, float]] | None = None) -> FidelityReport:
    """Answer every item under every setting (the first setting must be the `Full` reference); see the module doc.

    `videos` maps an item's `video` name to its frames ((T, H, W, 3) uint8) and fps, for videos that are not files
    (the proxy task's generated ones); other names are paths.

    `engine` supplies the loaded model, sampling and step settings; each setting replaces only its policy (and its
    kept cache and compression). `measure_flops` counts each prefill's FLOPs (`statekv.profiling.count_flops`:
    exact, but the prefill then runs many times slower). `progress` receives one line per prefilled video and per
    answered question, naming the setting, the video and the question's place in the run.
    """
    say = progress or (lambda line: None)
    if not items:
        raise ValueError("no items to evaluate")
    if not settings or not settings[0].is_reference:
        raise ValueError("the first setting must be the reference 'full' (use parse_settings)")
    root = os.fspath(store_root).rstrip("/")
    frames_of = dict(videos or {})
    names = list(dict.fromkeys(item.video for item in items))  # each video once, in order
    choice_counts = {len(i.options) for i in items if i.is_choice}
    letters = {n: letter_token_ids(engine.adapter.tokenizer, n) for n in choice_counts}
    report = FidelityReport(settings=[s.name for s in settings],
                            meta={"model": engine.adapter.name_or_path, "max_new_tokens": max_new_tokens,
                                  "videos": len(names), "questions": len(items),
                                  "device": str(engine.device), "dtype": str(engine.adapter.dtype)})
    reference: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for s, setting in enumerate(settings, 1):
        run = copy.copy(engine)  # same model and sampling, this setting's policy and kept cache
        run.policy = setting.policy
        run.answer_from = setting.answer_from
        run.compression = setting.compression
        asked = 0
        for v, video in enumerate(names, 1):
            where = f"setting {s}/{len(settings)} {setting.name}, video {v}/{len(names)} {Path(video).name}"
            uri = f"{root}/{_slug(setting.name)}/{_video_key(video)}"
            cost = _prefill(run, setting, video, uri, measure_flops, storage_options, frames_of.get(video))
            report.videos.append(cost)
            say(f"{where}: prefilled {cost.chunks} chunks in {cost.prefill_s:.2f} s"
                + ("" if cost.prefill_flops is None else f" ({cost.prefill_flops / 1e9:.3g} GFLOPs)"))
            for n, item in enumerate(items):
                if item.video != video:
                    continue
                result, first_logits = _ask(run, setting, item, uri, max_new_tokens, storage_options)
                asked += 1
                say(f"{where}: question {asked}/{len(items)} answered in {result.answer_s:.2f} s")
                if setting.is_reference:
                    reference[n] = (first_logits, result.answer_tokens)
                ref_logits, ref_tokens = reference[n]
                result.first_token_kl = first_token_kl(ref_logits, first_logits)
                result.top1_agree = int(ref_logits.argmax()) == int(first_logits.argmax())
                result.greedy_agreement = greedy_agreement(ref_tokens, result.answer_tokens)
                if item.is_choice:
                    result.predicted = predicted_letter(first_logits, letters[len(item.options)])
                    result.correct = result.predicted == item.answer
                elif item.expected is not None:
                    text = engine.adapter.tokenizer.decode(result.answer_tokens, skip_special_tokens=True)
                    result.predicted = normalise_answer(text)
                    result.correct = result.predicted == item.expected
                report.items.append(result)
        logger.info("evaluated %s on %d videos, %d questions", setting.name, len(names), len(items))
    return report


def _prefill(run: Any, setting: Setting, video: str, uri: str, measure_flops: bool, storage_options: Any,
             frames: tuple[Any, float] | None) -> VideoCost:
    source, extra = (video, {}) if frames is None else (frames[0], {"fps": frames[1]})
    start = time.perf_counter()
    if measure_flops:
        with count_flops() as counter:
            manifest = prefill_to_store(run, source, uri, int8=setting.int8, storage_options=storage_options, **extra)
        flops: int | None = int(counter.get_total_flops())
    else:
        manifest = prefill_to_store(run, source, uri, int8=setting.int8, storage_options=storage_options, **extra)
        flops = None
    totals = manifest["totals"]
    return VideoCost(setting.name, video, flops, time.perf_counter() - start, int(totals["bytes"]),
                     int(totals["chunks"]), int(totals["tokens"]))


def _ask(run: Any, setting: Setting, item: EvalItem, uri: str, max_new_tokens: int,
         storage_options: Any) -> tuple[ItemResult, torch.Tensor]:
    fs, _ = resolve(uri, storage_options)
    meter = ReadMeter(fs)
    start = time.perf_counter()
    cache = load_cache(uri, filesystem=meter, lazy=True)
    loaded = time.perf_counter() - start
    answer = run.ask(cache, _question_text(item), max_new_tokens=max_new_tokens, output_scores=True, **setting.ask)
    total = time.perf_counter() - start
    result = ItemResult(setting=setting.name, video=item.video, item=item.item_id or item.question,
                        first_token_kl=0.0, top1_agree=True, greedy_agreement=1.0, answer_tokens=answer.token_ids,
                        first_token_s=loaded + answer.first_token_s, answer_s=total, bytes_read=meter.bytes_read,
                        read_requests=meter.requests, kind=item.kind)
    return result, answer.scores[0]
