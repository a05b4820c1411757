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
    assert record["train_wall_s"] > 0 and 0 < record["train_cpu_s"] and record["machine"]["cores"] >= 1
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


def test_a_length_curriculum_draws_the_first_lengths_then_the_others(tmp_path, monkeypatch):
    """--first-lengths for the first --first-steps steps, --lengths after them (the held-out checks aside)."""
    from jobs.train_proxy import Batches

    frames, draw = [], Batches.draw

    def spy(self, **kwargs):  # the frames of each training batch's videos, from its video tokens (4 per 2 frames)
        out = draw(self, **kwargs)
        ids = out["inputs"]["input_ids"]
        frames.append(sorted({int((row == self.adapter.video_token_id).sum()) // 2 for row in ids}))
        return out

    monkeypatch.setattr(Batches, "draw", spy)
    small = list(SMALL)
    small[small.index("--lengths") + 1] = "12"
    assert main(["--out", str(tmp_path), "--steps", "3", "--first-lengths", "8", "--first-steps", "2",
                 *small]) == 0
    assert frames == [[8], [8], [12]]


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


def test_questions_in_one_row_get_the_logits_of_their_own_sequences(tmp_path):
    """Training puts every question about a video into one row (the video once, then one block per question that
    sees the video and itself, at the positions right after the video): each block's logits must be those of the
    processor's one-question sequence, the model computing its own positions, as the engine answers it."""
    from jobs.train_proxy import Batches, build_model, build_parser

    args = build_parser().parse_args(["--out", str(tmp_path), *SMALL])
    model, _, adapter = build_model(args, tmp_path)
    model.eval()
    batches = Batches(adapter, [8], 2, 0)
    types = list(batches.types)
    rows = batches.draw(length=10, seeds=[5, 6], jitter=0.0, noise=0.0)
    assert rows["types"] == types * 2
    with torch.no_grad():
        together = model(**rows["inputs"]).logits
        for row, seed in enumerate([5, 6]):
            single = batches.draw_single(length=10, seeds=[seed] * len(types), types=types)
            alone = model(**single["inputs"]).logits
            answers = (rows["labels"][row] != -100).nonzero().flatten().tolist()
            blocks = [answers[2 * i:2 * i + 2] for i in range(len(types))]  # one answer token and <|im_end|> each
            for i, block in enumerate(blocks):
                own = (single["labels"][i] != -100).nonzero().flatten().tolist()
                assert rows["labels"][row, block].tolist() == single["labels"][i, own].tolist()
                torch.testing.assert_close(together[row, [p - 1 for p in block]], alone[i, [p - 1 for p in own]],
                                           atol=1e-5, rtol=1e-5)


def test_state_targets_hold_what_count_after_and_repeat_answer():
    """The language-model state head's per-token targets say, at the right chunks, what the questions ask."""
    from jobs.train_proxy import state_labels
    from statekv.proxy.task import COUNT_WORDS, make_video

    for seed in range(20):
        video = make_video(24, seed, jitter=6.0, noise=2.0)
        seen, after, again = state_labels(video, 4)
        assert len(seen) == 4 * video.num_chunks
        assert COUNT_WORDS[int(seen.max()) - 1] == video.questions["count"].answer
        chunks = sorted({i // 4 for i in after.nonzero()[0]})
        assert [video.chunk_colours[c] for c in chunks] == [video.questions["after"].answer]
        back = {video.chunk_colours[i // 4] for i in again.nonzero()[0]}
        assert back == {video.questions["repeat"].answer}
        assert min(i // 4 for i in again.nonzero()[0]) == video.repeat_segments[1]
