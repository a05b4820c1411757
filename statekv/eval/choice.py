"""Multiple-choice long-video QA in the common layout (VideoMME's): video, question, options, answer letter.

A dataset is a `.jsonl`, `.json`, `.csv` or `.parquet` table with, per row:
- the video: a `video` (or `video_path`, `path`, `uri`) column, relative paths resolved against the table's folder
  or `video_dir`; or VideoMME's `videoID` / `video_id` column with `video_dir` (`<video_dir>/<id>.mp4`);
- `question`;
- `options`: a list such as `["A. a dog", "B. a cat", ...]` (VideoMME) or plain texts (letters are added), or one
  column per letter `A`, `B`, `C`, ...;
- `answer`: the correct letter.

Scoring reads the logits of the first answer token and picks the option letter with the highest logit: a
deterministic choice that does not depend on how the model words its answer.
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import Any

import torch

from statekv.eval.items import EvalItem

PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
          "Respond with only the letter of the correct option.\n{question}\n{options}\nThe best answer is:")
_LETTERED = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*)$", re.S)
_VIDEO_COLUMNS = ("video", "video_path", "path", "uri")
_ID_COLUMNS = ("videoID", "video_id")


def choice_prompt(question: str, options: list[str]) -> str:
    """The question with its lettered options, in the prompt format of the StateKV/InternVL VideoMME evaluation."""
    lines = [f"{string.ascii_uppercase[i]}. {text}" for i, text in enumerate(options)]
    return PROMPT.format(question=question.strip(), options="\n".join(lines))


def _options(row: dict[str, Any], where: str) -> list[str]:
    raw = row.get("options")
    if raw is None:
        raw = [row[c] for c in string.ascii_uppercase if row.get(c) not in (None, "")]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: options {raw!r} are neither a list nor JSON") from None
    raw = list(raw)
    if len(raw) < 2 or len(raw) > 26:
        raise ValueError(f"{where}: need 2..26 options, got {len(raw)}")
    texts = []
    for i, text in enumerate(raw):
        m = _LETTERED.match(str(text))
        if m and m.group(1) == string.ascii_uppercase[i]:
            texts.append(m.group(2).strip())
        else:
            texts.append(str(text).strip())
    return texts


def _video(row: dict[str, Any], base: Path, video_dir: str | None, where: str) -> str:
    for column in _VIDEO_COLUMNS:
        if row.get(column):
            value = str(row[column])
            if "://" in value or os.path.isabs(value):
                return value
            return str((Path(video_dir) if video_dir else base) / value)
    for column in _ID_COLUMNS:
        if row.get(column):
            if not video_dir:
                raise ValueError(f"{where}: rows name videos by {column}; pass the folder holding them (video_dir)")
            return str(Path(video_dir) / f"{row[column]}.mp4")
    raise ValueError(f"{where}: no video column ({', '.join(_VIDEO_COLUMNS + _ID_COLUMNS)})")


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data["rows"]
    if suffix in (".csv", ".parquet"):
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        table = pcsv.read_csv(path) if suffix == ".csv" else pq.read_table(path)
        return table.to_pylist()
    raise ValueError(f"dataset {str(path)!r}: unsupported file type {suffix!r} (.jsonl, .json, .csv, .parquet)")


def load_choice_dataset(path: str | os.PathLike, *, video_dir: str | None = None,
                        limit: int | None = None) -> list[EvalItem]:
    """Multiple-choice items of a dataset file; each names its video, prompt, options and answer letter."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r}: no such file")
    items = []
    for n, row in enumerate(_rows(path)):
        where = f"dataset {str(path)!r}, row {n}"
        if "question" not in row:
            raise ValueError(f"{where}: no 'question'")
        options = _options(row, where)
        answer = str(row.get("answer", "")).strip().upper()
        if len(answer) != 1 or answer not in string.ascii_uppercase[: len(options)]:
            raise ValueError(f"{where}: answer {row.get('answer')!r} is not one of the {len(options)} option letters")
        items.append(EvalItem(video=_video(row, path.parent, video_dir, where), question=str(row["question"]),
                              options=options, answer=answer, item_id=str(row.get("question_id", n))))
        if limit is not None and len(items) >= limit:
            break
    return items


def letter_token_ids(tokenizer: Any, count: int) -> list[int]:
    """The token id each option letter starts with (the answer's first token); letters must not share one."""
    ids = []
    for letter in string.ascii_uppercase[:count]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"the tokenizer encodes option letter {letter!r} to no token")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise ValueError("the tokenizer gives several option letters the same first token; cannot score by logits")
    return ids


def predicted_letter(first_logits: torch.Tensor, letter_ids: list[int]) -> str:
    """The option letter whose token has the highest first-step logit."""
    scores = first_logits[letter_ids]
    return string.ascii_uppercase[int(scores.argmax())]
