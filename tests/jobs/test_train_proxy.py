"""`python -m jobs.train_proxy` keeps working: a much smaller model trained for a few steps, saved so that the
engine loads it through `from_pretrained`, deterministic given its seed, with its record and plot."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from jobs.train_proxy import main

SMALL = ["--hidden", "32", "--layers", "1", "--vision-depth", "1", "--vision-dim", "16", "--lengths", "8,12",
         "--batch", "4", "--eval-every", "2", "--eval-videos", "1", "--eval-lengths", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    for run in ("a", "b"):
        assert main(["--out", str(root / run), "--steps", "4", "--seed", "3", *SMALL,
                     *(["--plot", str(root / "a.png")] if run == "a" else [])]) == 0
    return root


def test_training_writes_a_checkpoint_the_engine_loads_and_its_record(trained):
    from statekv import Engine, Full
    from statekv.proxy.task import make_video

    out = trained / "a"
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 4 and record["seed"] == 3 and record["script"].startswith("python -m jobs.train_proxy")
    assert record["train_wall_s"] > 0 and record["machine"]["cores"] >= 1
    held = record["held_out"]
    assert held["lengths"] == [8] and set(held["accuracy"]["8"]) == {"shape", "after", "first", "last", "count",
                                                                      "repeat"}
    assert held["engine_reference_agreement"] == 1.0  # Full through statekv = the plain model, even untrained
    assert [c["step"] for c in record["curve"]] == [2, 4]
    assert (trained / "a.png").stat().st_size > 10_000
    engine = Engine.from_pretrained(str(out), policy=Full(), device="cpu", dtype=torch.float32)
    video = make_video(8, 0)
    cache = engine.prefill(video.frames, fps=video.fps)
    assert cache.num_video_tokens == 4 * 4  # 56 x 56 frames: 4 tokens per two-frame chunk, whatever the input
    assert engine.ask(cache, video.questions["shape"].text, max_new_tokens=2).token_ids


def test_training_is_deterministic_given_its_seed(trained):
    a, b = (load_file(str(trained / run / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_too_small_a_vocabulary_is_refused(tmp_path):
    """Every answer must be one token (the training's held-out check reads the first answer token)."""
    with pytest.raises(SystemExit, match="more than one token"):
        main(["--out", str(tmp_path), "--steps", "1", "--vocab", "270", *SMALL])


def test_a_further_stage_starts_from_the_earlier_weights_and_keeps_its_record(trained, tmp_path):
    """With a learning rate of 0 a further stage saves exactly the weights it started from: those of --init."""
    assert main(["--init", str(trained / "a"), "--out", str(tmp_path / "c"), "--steps", "2", "--seed", "4",
                 "--lr", "0", *SMALL]) == 0
    record = json.loads((tmp_path / "c" / "training.json").read_text())
    earlier = json.loads((trained / "a" / "training.json").read_text())
    assert record["earlier_stages"] == [earlier] and record["seed"] == 4
    assert abs(record["train_wall_s_all_stages"] - earlier["train_wall_s"] - record["train_wall_s"]) < 0.2
    a, c = (load_file(str(d / "model.safetensors")) for d in (trained / "a", tmp_path / "c"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
