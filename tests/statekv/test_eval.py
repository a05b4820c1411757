"""Fidelity harness: metrics, settings, the end-to-end run over stored caches, and multiple-choice scoring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from statekv import Engine
from statekv.eval import (EvalItem, ReadMeter, first_token_kl, greedy_agreement, load_choice_dataset, parse_setting,
                          parse_settings, run_fidelity)
from statekv.eval.choice import choice_prompt, letter_token_ids
from statekv.eval.plot import fidelity_figure, method_of
from statekv.retrieval import TopK
from statekv.store.fs import resolve
from statekv.testing.videos import synthetic_frames, write_video
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)


# --- metrics and settings --------------------------------------------------------------------------------------


def test_first_token_kl_matches_the_definition():
    p = torch.tensor([2.0, 0.5, -1.0, 0.0])
    q = torch.tensor([1.0, 1.0, 0.0, -2.0])
    pp, qq = torch.softmax(p.double(), 0), torch.softmax(q.double(), 0)
    assert first_token_kl(p, q) == pytest.approx(float((pp * (pp / qq).log()).sum()), rel=1e-12)
    assert first_token_kl(p, p + 3.0) == pytest.approx(0.0, abs=1e-12)  # a shift is the same distribution
    assert first_token_kl(p, q) != pytest.approx(first_token_kl(q, p))  # not symmetric: Full is the reference


def test_greedy_agreement_counts_the_common_leading_run():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # the 4 after a difference does not count
    assert greedy_agreement([1, 2, 3, 4], [7, 2, 3, 4]) == 0.0
    assert greedy_agreement([1, 2, 3, 4], [1, 2]) == 0.5


def test_settings_parse_and_full_comes_first():
    settings = parse_settings(["statekv:64", "window:32+int8"])
    assert [s.name for s in settings] == ["full", "statekv:64", "window:32+int8"]
    assert settings[2].int8 and settings[2].policy.capacity == 32
    assert parse_setting("statekv:8:0.5").policy.decay == 0.5
    assert parse_setting("infinipot:64:0.5").policy.recent == 0.5
    assert parse_setting("infinipot:64").policy.name == "infinipot"  # the published rule
    stream = parse_setting("infinipot-stream:64:0.5")
    assert (stream.name, stream.policy.name, stream.policy.recent) == ("infinipot-stream:64:0.5", "infinipot-stream",
                                                                       0.5)
    rekv = parse_setting("rekv:128:8:2")
    assert rekv.name == "rekv:128:8:2" and rekv.policy.capacity == 128 and rekv.ask["retrieval"].k == 8
    assert parse_setting("segments:4").ask["retrieval"].recent == 0 and not parse_setting("topk:4").is_reference
    for spec, name, window, k, recent, query in (("topk:4:question", "topk:4:question", None, 4, 0, "question"),
                                                 ("topk:4:2:question", "topk:4:2:question", None, 4, 2, "question"),
                                                 ("topk:4:prompt", "topk:4", None, 4, 0, "prompt"),
                                                 ("rekv:64:4:question", "rekv:64:4:question", 64, 4, 0, "question")):
        s = parse_setting(spec)  # ReKV's published query: a trailing ":question" on the top-k kinds
        r = s.ask["retrieval"]
        assert (s.name, getattr(s.policy, "capacity", None), r.k, r.recent, r.query) == (name, window, k, recent, query)
    assert parse_setting("adaptive:3:question").ask["retrieval"] == TopK(k=3, adaptive_budget=True, query="question")
    with pytest.raises(ValueError, match="'segments' takes no query"):
        parse_setting("segments:4:question")
    for bad in ("window", "window:0", "nope:3", "statekv:x"):
        with pytest.raises(ValueError):
            parse_setting(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_settings(["window:4", "window:4"])


def test_read_meter_counts_what_is_read(tmp_path):
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    fs, path = resolve(str(tmp_path))
    meter = ReadMeter(fs)
    with meter.open(f"{path}/blob", "rb") as f:
        f.seek(100)
        assert len(f.read(250)) == 250
    assert meter.bytes_read == 250
    meter.cat_file(f"{path}/blob")
    assert meter.bytes_read == 1250 and meter.requests == 2


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "clip.mp4"
    write_video(path, synthetic_frames(16, 56, 84, seed=3), fps=4.0)
    return str(path)


def test_harness_runs_end_to_end_and_writes_its_table_and_plot(tiny_checkpoint, eval_video, tmp_path):
    engine = Engine.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, sampling=SMALL)
    items = [EvalItem(eval_video, "What happens after the dog enters?"), EvalItem(eval_video, "Describe the video.")]
    # 16 frames at 2 fps sampled -> 8 chunks of 6 tokens: capacity 1000 keeps everything, 1 keeps one token
    settings = parse_settings(["statekv:1000", "window:1", "statekv:6", "infinipot:1000", "topk:100", "topk:1",
                               "infinipot-cache:12"])
    lines: list[str] = []
    report = run_fidelity(engine, items, settings, store_root=tmp_path / "caches", max_new_tokens=4,
                          measure_flops=True, progress=lines.append)
    assert len(lines) == len(settings) * (1 + len(items))  # one line per prefill and per answer
    assert lines[-1].startswith("setting 8/8 infinipot-cache:12, video 1/1 ") and "question 2/2 answered" in lines[-1]
    rows = {r["setting"]: r for r in report.summary()}
    assert list(rows) == ["full", "statekv:1000", "window:1", "statekv:6", "infinipot:1000", "topk:100", "topk:1",
                          "infinipot-cache:12"]
    assert rows["infinipot-cache:12"]["stored_bytes"] < rows["full"]["stored_bytes"]  # 12 of 48 tokens kept
    assert rows["topk:100"]["first_token_kl"] < 1e-9  # retrieving every chunk is Full
    assert rows["topk:1"]["first_token_kl"] > 1e-9  # one chunk per layer is not
    # (bytes read with retrieval are tested on a cache whose columns are large enough to be read apart:
    # test_retrieval_engine.py; these tiny files are read whole)
    assert rows["infinipot:1000"]["first_token_kl"] < 1e-9  # a budget above all tokens keeps everything
    assert rows["full"]["first_token_kl"] == 0.0 and rows["full"]["top1_agreement"] == 1.0
    # a setting that keeps everything is Full: fidelity is exact
    assert rows["statekv:1000"]["first_token_kl"] < 1e-9
    assert rows["statekv:1000"]["greedy_agreement"] == 1.0
    # a 1-token window changes what the chunks attend to, so the answers' distribution moves
    assert rows["window:1"]["first_token_kl"] > 1e-9
    for r in rows.values():
        assert r["prefill_flops"] > 0 and r["stored_bytes"] > 0
        # a whole-cache answer reads every stored object (Parquet reads a small file's footer region, which is
        # the whole file, and then its column chunks: up to twice the bytes of files under 64 KiB)
        if not r["setting"].startswith("topk"):  # + the manifest, which the stored bytes do not count
            assert r["stored_bytes"] <= r["bytes_read_per_question"] <= 2 * r["stored_bytes"] + 16_384
    # a small carried state costs fewer prefill FLOPs than full attention over the whole video
    assert rows["statekv:6"]["prefill_flops"] < rows["full"]["prefill_flops"]
    paths = report.write(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["summary"][0]["setting"] == "full"
    assert "| statekv:6 |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_of_groups_settings_that_differ_in_their_budget():
    assert method_of("full") == ("full", None)
    assert method_of("window:64") == ("window", 64.0)
    assert method_of("statekv:4096:0.9") == ("statekv (·:0.9)", 4096.0)
    assert method_of("rekv:4096:64:8+int8") == ("rekv (·:64:8)+int8", 4096.0)
    assert method_of("guided:0.25") == ("guided", 0.25)


def summary_row(setting: str, kl: float, top1: float, stored: float, read: float, flops: float | None) -> dict:
    return {"setting": setting, "first_token_kl": kl, "top1_agreement": top1, "greedy_agreement": top1,
            "accuracy": None, "prefill_flops": flops, "stored_bytes": stored, "bytes_read_per_question": read,
            "first_token_s_p50": 0.01}


@pytest.mark.parametrize("flops", [None, 2e9])
def test_fidelity_figure_draws_one_line_per_method_and_full_at_zero(flops):
    import matplotlib.pyplot as plt

    summary = [summary_row("full", 0.0, 1.0, 4e6, 4e6, flops),
               summary_row("window:16", 0.3, 0.5, 1e6, 4e6, flops), summary_row("window:64", 0.1, 0.75, 2e6, 4e6, flops),
               summary_row("statekv:64", 0.05, 1.0, 2e6, 4e6, flops), summary_row("statekv:16", 0.2, 0.5, 1e6, 4e6, flops)]
    fig = fidelity_figure(summary)
    try:
        panels = [ax for ax in fig.axes if ax.lines]
        assert len(panels) == (3 if flops else 2) * 2  # no empty FLOPs panel when none were counted
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["full (reference)", "window", "statekv"]
        kl_stored = panels[0]
        lines = {line.get_label(): line for line in kl_stored.lines}
        assert list(lines["full (reference)"].get_ydata()) == [0.0]  # drawn at its KL, not a made-up floor
        assert kl_stored.get_yscale() == "symlog"
        # one line per method, its points in budget order, at their measured cost
        assert list(lines["window"].get_xdata()) == [1.0, 2.0] and list(lines["window"].get_ydata()) == [0.3, 0.1]
        assert list(lines["statekv"].get_xdata()) == [1.0, 2.0] and list(lines["statekv"].get_ydata()) == [0.2, 0.05]
        table = next(ax for ax in fig.axes if ax.tables).tables[0]
        texts = {cell.get_text().get_text() for cell in table.get_celld().values()}
        assert {"setting", "window:16", "statekv:64", "0.3", "MB stored per video"} <= texts
    finally:
        plt.close(fig)


def test_guided_settings_parse_and_compare_in_the_harness(tiny_checkpoints, eval_video, tmp_path):
    """StreamKV's guidance compression as harness settings: keep=1 is Full (KL 0, same stored K/V), a quarter
    stores less and moves the answer; its whole recipe (window prefill + segments) runs too."""
    guided = parse_setting("guided:0.25")
    assert guided.compression.keep == 0.25 and not guided.is_reference and not parse_setting("guided:1").is_reference
    recipe = parse_setting("streamkv-guided:0.6:6:2:1")
    assert recipe.compression.keep == 0.6 and recipe.policy.capacity == 6 and recipe.ask["retrieval"].k == 2
    assert parse_setting("guided:0.5+int8").compression.keep == 0.5
    for bad in ("guided", "guided:0", "guided:1.5", "streamkv-guided:0.5:6"):
        with pytest.raises(ValueError):
            parse_setting(bad)
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu", dtype=torch.float32, sampling=SMALL)
    items = [EvalItem(eval_video, "What happens after the dog enters?")]
    report = run_fidelity(engine, items, parse_settings(["guided:1", "guided:0.25", "streamkv-guided:0.5:6:2:1"]),
                          store_root=tmp_path / "caches", max_new_tokens=3, measure_flops=False)
    rows = {r["setting"]: r for r in report.summary()}
    assert rows["guided:1"]["first_token_kl"] < 1e-9 and rows["guided:1"]["greedy_agreement"] == 1.0
    assert rows["guided:0.25"]["first_token_kl"] > 1e-9
    assert rows["guided:0.25"]["stored_bytes"] < rows["full"]["stored_bytes"]
    assert rows["streamkv-guided:0.5:6:2:1"]["stored_bytes"] < rows["full"]["stored_bytes"]


def test_multiple_choice_scores_against_the_answer_key(tiny_checkpoints, eval_video, tmp_path):
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu", dtype=torch.float32, sampling=SMALL)
    options = ["a dog", "a cat", "a car", "a red square"]
    questions = ["What moves?", "What is shown?", "Which object appears?", "What is in the video?"]
    # the letter each question's answer starts with, read off the plain engine independently of the harness
    letters = letter_token_ids(engine.adapter.tokenizer, 4)
    cache = engine.prefill(eval_video)
    predicted = []
    for q in questions:
        logits = engine.ask(cache, choice_prompt(q, options), max_new_tokens=1, output_scores=True).scores[0]
        predicted.append("ABCD"[int(logits[letters].argmax())])
    # key: right for the first three questions, wrong for the last -> accuracy 0.75 exactly
    key = predicted[:3] + ["ABCD"[("ABCD".index(predicted[3]) + 1) % 4]]
    rows = [{"video": "clip.mp4", "question": q, "options": [f"{l}. {o}" for l, o in zip("ABCD", options)],
             "answer": a, "question_id": f"q{i}"} for i, (q, a) in enumerate(zip(questions, key))]
    dataset = tmp_path / "mcq.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_choice_dataset(dataset, video_dir=str(tmp_path.parent), limit=None)
    assert items[0].video == str(tmp_path.parent / "clip.mp4")
    items = [EvalItem(eval_video, i.question, i.options, i.answer, i.item_id) for i in items]
    assert items[0].options == options  # "A. " prefixes are read as letters, not as option text
    report = run_fidelity(engine, items, parse_settings([]), store_root=tmp_path / "caches", max_new_tokens=1,
                          measure_flops=False)
    assert [r.predicted for r in report.items] == predicted
    assert report.summary()[0]["accuracy"] == pytest.approx(0.75)


def test_choice_dataset_errors_name_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "v.mp4", "question": "?", "options": ["x", "y"], "answer": "C"}))
    with pytest.raises(ValueError, match=r"row 0: answer 'C' is not one of the 2 option letters"):
        load_choice_dataset(bad)
    ids = tmp_path / "ids.csv"
    ids.write_text("videoID,question,A,B,answer\nabc,what?,yes,no,B\n")
    with pytest.raises(ValueError, match="video_dir"):
        load_choice_dataset(ids)
    item, = load_choice_dataset(ids, video_dir="/data/videomme")
    assert item.video == "/data/videomme/abc.mp4" and item.options == ["yes", "no"] and item.answer == "B"


def test_eval_command_prints_the_table(tiny_checkpoints, eval_video, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jobs.eval", "--model", tiny_checkpoints["qwen2_5_vl"], "--video", eval_video,
         "--question", "Describe the video.", "--settings", "window:6", "--max-new-tokens", "2", "--no-flops",
         "--fps", "2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| full |" in out.stdout and "| window:6 |" in out.stdout
    assert (tmp_path / "out" / "fidelity.png").exists()
