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


# --- the proxy in the fidelity harness (`statekv eval --proxy`, issue 22 point 2) -----------------------------------


def test_proxy_items_carry_exact_answers_types_and_frames():
    from statekv.proxy.evaluate import held_out_videos, proxy_items

    items, videos = proxy_items([8, 12], 2, types=("shape", "first"))
    assert len(items) == 2 * 2 * 2 and sorted(videos) == ["proxy-12f-000", "proxy-12f-001", "proxy-8f-000",
                                                          "proxy-8f-001"]
    video = held_out_videos(12, 2)[1]
    frames, fps = videos["proxy-12f-001"]
    assert frames.shape[0] == 12 and (frames == video.frames).all() and fps == video.fps
    first = next(i for i in items if i.item_id == "proxy-12f-001/first")
    assert (first.kind, first.expected, first.question) == ("first", video.questions["first"].answer,
                                                            video.questions["first"].text)
    assert first.is_scored and not first.is_choice
    with pytest.raises(ValueError, match="unknown question types"):
        proxy_items([8], 1, types=("colour",))


def test_open_answers_are_scored_per_type_with_their_standard_error(engine, tmp_path):
    """The harness scores an open answer by its normalised text against `expected`, per question type, and the
    accuracy's standard error is the binomial one; a wrong expected answer is scored wrong (the score is real)."""
    from dataclasses import replace

    from statekv.eval import parse_settings, run_fidelity
    from statekv.proxy.evaluate import proxy_items

    items, videos = proxy_items([16], 2, types=("shape", "first"))
    lied = [replace(i, expected="hexagon") if i.kind == "shape" and i.video.endswith("000") else i for i in items]
    report = run_fidelity(engine, lied, parse_settings([]), store_root=tmp_path, max_new_tokens=4, videos=videos)
    rows = {r.item: r for r in report.items}
    assert rows["proxy-16f-000/shape"].correct is False and rows["proxy-16f-001/shape"].correct is True
    assert rows["proxy-16f-001/shape"].predicted == next(i.expected for i in items if i.item_id == "proxy-16f-001/shape")
    (full,) = report.summary()
    correct = [r.correct for r in report.items]
    p = sum(correct) / len(correct)
    assert full["accuracy"] == pytest.approx(p) and full["accuracy_se"] == pytest.approx((p * (1 - p) / 4) ** 0.5)
    assert full["accuracy_by_kind"]["shape"] == 0.5
    assert "| setting | accuracy (± s.e.) | first | shape |" in report.to_markdown()


def test_eval_proxy_command_checks_full_against_the_plain_model(tmp_path):
    """`statekv eval --proxy` on the shipped model: Full through statekv answers every question as the plain
    transformers model does (recorded in the report), accuracy per type is printed, the plot has its accuracy row."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jobs.eval", "--proxy", "--lengths", "8", "--videos-per-length", "1", "--reference",
         "--settings", "topk:1", "adaptive:1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "answered as the plain transformers model on 6/6 questions" in out.stderr
    assert "| setting | accuracy (± s.e.) | after | count | first | last | repeat | shape |" in out.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["full_agrees_with_plain_model"] == 1.0
    assert [r["setting"] for r in report["summary"]] == ["full", "topk:1", "adaptive:1"]
    assert (tmp_path / "out" / "fidelity.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--reference", "--model", "m"], "--reference goes with --proxy"),
    (["--floors", "--model", "m"], "--floors goes with --proxy"),
    (["--proxy", "--video", "a.mp4", "--question", "q"], "--proxy evaluates its own held-out videos"),
    (["--proxy", "--lengths", "16,x"], "--lengths: comma-separated frame counts"),
    (["--proxy", "--types", "shape,colour"], "unknown question types"),
    ([], "--model (or --proxy)")])
def test_eval_proxy_usage_errors(argv, message, capsys):
    from jobs.eval import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


# --- the regression guard (issue 22 point 4) -------------------------------------------------------------------


@pytest.mark.slow
def test_no_setting_falls_below_its_recorded_floor(tmp_path):
    """CI's guard: the shipped floors' held-out set and settings (every method at its default budget) through
    `statekv eval --proxy --floors`; Full answers as the plain model, and no setting is below its floor."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jobs.eval", "--proxy", "--floors", "--no-plot",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every setting at or above its floor" in out.stderr


def test_floors_name_each_setting_below_them_and_belong_to_their_weights(tmp_path):
    import json

    from statekv.proxy.floors import FLOORS, below_floors, make_floors, read_floors, weights_digest

    shipped = read_floors(FLOORS, proxy.checkpoint_path())
    assert shipped["weights"] == weights_digest(proxy.checkpoint_path()) and "full" in shipped["floors"]
    summary = [{"setting": "full", "accuracy": 0.9}, {"setting": "topk:4", "accuracy": 0.6}]
    floors = make_floors(summary, model_dir=proxy.checkpoint_path(), lengths=[16], videos_per_length=1,
                         types=["shape"], margin=0.1, command="python -m jobs.eval ...")
    assert floors["floors"] == {"full": 0.8, "topk:4": 0.5} and floors["measured"]["topk:4"] == 0.6
    assert below_floors(summary, floors) == []
    dropped = [{"setting": "full", "accuracy": 0.75}, {"setting": "topk:4", "accuracy": 0.6}]
    assert below_floors(dropped, floors) == ["full: accuracy 0.750 is below its floor 0.800 (recorded 0.900)"]
    assert below_floors(summary[:1], floors) == ["topk:4: not evaluated (the floors file lists it)"]
    other = tmp_path / "floors.json"
    other.write_text(json.dumps({**floors, "weights": "0" * 16}))
    with pytest.raises(ValueError, match="recorded for weights 0000000000000000, not these .*--record-floors"):
        read_floors(other, proxy.checkpoint_path())
    other.write_text("{}")
    with pytest.raises(ValueError, match="floors.json.*needs the keys"):
        read_floors(other, proxy.checkpoint_path())


def test_the_guard_fails_naming_the_setting_below_its_floor(tmp_path):
    """The guard can fail: a floor no setting can reach makes `--floors` exit 1 with one line naming it."""
    import json
    import subprocess
    import sys

    from statekv.proxy.floors import weights_digest

    floors = tmp_path / "floors.json"
    floors.write_text(json.dumps({"weights": weights_digest(proxy.checkpoint_path()), "lengths": [8],
                                  "videos_per_length": 1, "types": ["shape"], "measured": {"full": 1.0},
                                  "floors": {"full": 0.0, "topk:1": 1.01}}))
    out = subprocess.run([sys.executable, "-m", "jobs.eval", "--proxy", "--floors", str(floors), "--no-plot",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "below the floor" in line]
    assert len(lines) == 1 and lines[0].startswith("statekv eval: below the floor: topk:1: accuracy ")
    assert lines[0].endswith("is below its floor 1.010 (recorded nan)")
