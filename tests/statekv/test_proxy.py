"""The shipped proxy model (statekv/proxy/weights) and its evaluation (statekv/proxy/evaluate.py)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
import torch

from statekv import Engine, Full, proxy
from statekv.proxy.evaluate import ProxyReport, ProxyRow, evaluate, normalise
from statekv.proxy.task import QUESTION_TYPES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(str(proxy.checkpoint_path()), policy=Full(), device="cpu", dtype=torch.float32)


def test_shipped_weights_answer_held_out_questions_like_the_plain_model(engine):
    """Loaded through the real from_pretrained path, `Full()` answers held-out videos right, as the plain
    transformers model over the processor's sequence does (same answers, question by question)."""
    from statekv.testing.reference import reference_model

    report = evaluate(engine, lengths=[16, 48], videos_per_length=3,
                      reference=reference_model(str(proxy.checkpoint_path())))
    assert report.agreement() == 1.0
    # the types the record says the model has learned (>= 95 % at every evaluated length) are answered right here
    learned = [t for t in QUESTION_TYPES
               if all(row[t] >= 0.95 for row in proxy.training_record()["held_out"]["accuracy"].values())]
    assert "shape" in learned  # the demo's question
    wrong = [a for a in report.answers if a["type"] in learned and a["engine"] != a["answer"]]
    assert wrong == []
    assert report.accuracy() > 0.4  # chance over the six types is about 0.2


def test_training_record_says_how_the_weights_were_made():
    record = proxy.training_record()
    assert record["script"].startswith("python -m jobs.train_proxy") and record["steps"] > 0
    assert {"seed", "train_wall_s", "machine", "held_out", "parameters"} <= set(record)
    for length, row in record["held_out"]["accuracy"].items():
        assert set(row) == set(QUESTION_TYPES), length
    assert record["held_out"]["engine_reference_agreement"] == 1.0


def test_package_data_ships_every_weights_file():
    """A non-editable install carries the proxy: every file of the checkpoint matches pyproject's package-data."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["statekv.proxy"]
    base = ROOT / "statekv" / "proxy"
    files = [p.relative_to(base).as_posix() for p in (base / "weights").rglob("*") if p.is_file()]
    assert {"weights/qwen2_vl/model.safetensors", "weights/qwen2_vl/config.json",
            "weights/qwen2_vl/training.json"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_report_tables():
    report = ProxyReport([ProxyRow(16, "shape", 4, 3), ProxyRow(16, "first", 4, 4), ProxyRow(32, "shape", 2, 1)])
    assert report.accuracy() == 0.8 and report.accuracy(type="shape") == pytest.approx(4 / 6)
    assert report.table() == {"16": {"shape": 0.75, "first": 1.0}, "32": {"shape": 0.5}}
    assert report.agreement() is None
    with pytest.raises(ValueError, match="unknown question types"):
        evaluate(None, lengths=[8], videos_per_length=1, types=("colour",))
    assert normalise(" Red.\n") == "red"
    assert report.markdown().splitlines()[-1] == "| 32 | 0.50 | – | 0.50 |"
