"""`statekv prefill --resume` continues with the cache's own settings; `statekv ask` answers several questions in one
run (one model load, one batch) exactly as asking them one by one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from jobs.cli import main
from statekv.store import load_cache, read_manifest
from statekv.testing.videos import synthetic_frames, write_video

PIXELS = ["--min-pixels", str(28 * 28), "--max-pixels", str(56 * 84)]
# every setting away from its default, so a resume that fell back to a default would differ
SETTINGS = ["--policy", "window", "--capacity", "8", "--fps", "4", "--chunks-per-step", "2", "--int8", *PIXELS]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("clips")
    first, second = folder / "first.mp4", folder / "second.mp4"
    write_video(first, synthetic_frames(8, 56, 84, seed=1), fps=4.0)  # 2 s at 4 fps: 8 frames, 4 chunks
    write_video(second, synthetic_frames(8, 56, 84, seed=2), fps=4.0)
    return str(first), str(second)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def chunk_tensors(uri: str) -> list[torch.Tensor]:
    cache = load_cache(uri, lazy=False)
    return [t for chunk in cache.chunks for t in (*chunk.keys, *chunk.values) if t is not None] + \
        [t for s in cache.state if s is not None for t in (s.keys, s.values)]


def test_resume_without_flags_equals_resume_with_them(capsys, tmp_path, clips, tiny_checkpoints):
    model = tiny_checkpoints["qwen2_vl"]
    first, second = clips
    bare, flagged = str(tmp_path / "bare" / "clip"), str(tmp_path / "flagged" / "clip")
    code, _, err = run(capsys, "prefill", first, "--model", model, "--out", bare, "--no-progress", *SETTINGS)
    assert code == 0, err
    shutil.copytree(tmp_path / "bare", tmp_path / "flagged")

    code, _, err = run(capsys, "prefill", second, "--model", model, "--out", bare, "--resume", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "prefill", second, "--model", model, "--out", flagged, "--resume", "--no-progress",
                       *SETTINGS)
    assert code == 0, err

    got, want = read_manifest(bare), read_manifest(flagged)
    assert got["prefill"] == want["prefill"] and got["storage"] == want["storage"] == "int8"
    assert got["prefill"]["policy"] == {"name": "window", "capacity": 8}
    assert got["prefill"]["chunks_per_step"] == 2 and got["prefill"]["sampling"]["fps"] == 4.0
    assert got["totals"] == want["totals"] and got["totals"]["chunks"] == 8
    for a, b in zip(chunk_tensors(bare), chunk_tensors(flagged), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("flag", "value", "recorded"), [("--capacity", "16", "8"), ("--policy", "statekv", "window"),
                                                          ("--fps", "2.5", "4.0")])
def test_resume_refuses_a_flag_that_differs_naming_it(capsys, tmp_path, clips, tiny_checkpoints, monkeypatch, flag,
                                                      value, recorded):
    model = tiny_checkpoints["qwen2_vl"]
    first, second = clips
    uri = str(tmp_path / "caches" / "clip")
    code, _, err = run(capsys, "prefill", first, "--model", model, "--out", uri, "--no-progress", *SETTINGS)
    assert code == 0, err
    before = read_manifest(uri)

    def no_model(*args, **kwargs):  # the refusal comes before any model loads
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("statekv.Engine.from_pretrained", no_model)
    code, out, err = run(capsys, "prefill", second, "--model", model, "--out", uri, "--resume", flag, value)
    assert code == 1 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith(f"statekv prefill: error: {uri}: {flag} {value} differs")
    assert f"the cache's {flag} {recorded}" in line and "leave the flag out" in line
    assert read_manifest(uri) == before


def test_several_questions_equal_asking_one_by_one(capsys, tmp_path, clips, tiny_checkpoints):
    model = tiny_checkpoints["qwen2_vl"]
    uri = str(tmp_path / "caches" / "clip")
    code, _, err = run(capsys, "prefill", clips[0], "--model", model, "--out", uri, "--capacity", "8",
                       "--no-progress", *PIXELS)
    assert code == 0, err
    questions = ["What happens?", "What colour is the square?", "How many frames are there?", "Who moves?"]
    alone = []
    for q in questions:
        code, out, err = run(capsys, "ask", uri, q, "--max-new-tokens", "5", "--json")
        assert code == 0, err
        alone.append(json.loads(out))

    file = tmp_path / "questions.txt"
    file.write_text(f"\n{questions[2]}\n\n  {questions[3]}  \n", encoding="utf-8")
    code, out, err = run(capsys, "ask", uri, questions[0], "--question", questions[1], "--questions-file", str(file),
                         "--max-new-tokens", "5", "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(questions)  # JSON lines, in order
    together = [json.loads(line) for line in lines]
    for one, many in zip(alone, together, strict=True):
        assert many["question"] == one["question"]
        assert many["token_ids"] == one["token_ids"] and many["answer"] == one["answer"]
        assert many["prompt_ids"] == one["prompt_ids"] and many["tokens"] == one["tokens"]

    code, out, err = run(capsys, "ask", uri, "--question", questions[0], "--question", questions[1],
                         "--max-new-tokens", "5")
    assert code == 0, err
    assert out == "".join(f"Q: {o['question']}\nA: {o['answer']}\n" for o in alone[:2])

    code, out, err = run(capsys, "ask", uri, "--question", questions[0], "--question", questions[1], "--top-k", "1",
                         "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert [json.loads(line)["question"] for line in out.splitlines()] == questions[:2]


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give a QUESTION"),
    (["--question", " "], "question 1 is empty"),
    (["--question", "a", "--question", "b", "--stream"], "--stream answers one question, got 2"),
    (["--questions-file", "/nonexistent/questions.txt"], "--questions-file '/nonexistent/questions.txt'"),
])
def test_ask_question_usage_errors_exit_2(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["ask", str(tmp_path / "caches" / "clip"), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_one_frame_clip_is_described_as_it_is(capsys, tmp_path, tiny_checkpoints):
    """Regression: a 1-frame clip was "2 sampled at 60.00 fps from 1, duration 0.0 s"."""
    clip = tmp_path / "one.mp4"
    write_video(clip, synthetic_frames(1, 56, 84), fps=30.0)
    uri = str(tmp_path / "caches" / "one")
    code, _, err = run(capsys, "prefill", str(clip), "--model", tiny_checkpoints["qwen2_vl"], "--out", uri,
                       "--no-progress", *PIXELS)
    assert code == 0, err
    code, out, _ = run(capsys, "inspect", uri)
    assert code == 0
    assert "frames:   all 1 of 1 (1 repeated to fill whole chunks: 2 in all)" in out
    assert "duration: 0.0333 s" in out and "fps" not in out.split("frames:")[1].splitlines()[0]
