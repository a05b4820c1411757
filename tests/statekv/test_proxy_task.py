"""The proxy task's generator (statekv/proxy/task.py): every answer is what the frames show, and a seed fixes it."""

from __future__ import annotations

import numpy as np
import pytest

from statekv.proxy.task import (ANSWER_WORDS, COLOURS, COUNT_WORDS, FRAME_SIZE, QUESTION_TYPES, SHAPE_RGB,
                                held_out_seed, make_video, shape_mask, token_labels)


def chunk_colour(frames: np.ndarray, chunk: int) -> str:
    """The colour name of a chunk, read from its pixels (a corner, away from the centred shape)."""
    rgb = frames[2 * chunk, 1, 1].astype(int)
    return min(COLOURS, key=lambda c: int(np.abs(np.array(COLOURS[c]) - rgb).sum()))


def has_shape(frames: np.ndarray, chunk: int) -> bool:
    return bool((frames[2 * chunk:2 * chunk + 2] == SHAPE_RGB).all(axis=-1).any())


@pytest.mark.parametrize("length", [8, 16, 48, 128])
@pytest.mark.parametrize("seed", range(12))
def test_answers_are_what_the_frames_show(length, seed):
    v = make_video(length, seed)
    f = v.frames
    assert f.shape == (length, FRAME_SIZE, FRAME_SIZE, 3) and f.dtype == np.uint8
    chunks = length // 2
    colours = [chunk_colour(f, c) for c in range(chunks)]
    needles = [c for c in range(chunks) if has_shape(f, c)]
    q = v.questions
    assert set(q) == set(QUESTION_TYPES) and all(x.answer in ANSWER_WORDS for x in q.values())
    assert colours == v.chunk_colours and needles == v.needles
    assert q["first"].answer == colours[0] and q["last"].answer == colours[-1]
    assert q["count"].answer == COUNT_WORDS[len(needles) - 1]
    assert q["after"].answer == colours[needles[0] + 1] != colours[needles[0]]  # the next segment, not the needle's
    masks = {s: shape_mask(s) for s in ("square", "circle", "triangle", "cross")}
    drawn = (f[2 * needles[0]] == SHAPE_RGB).all(axis=-1)
    assert [s for s, m in masks.items() if (m == drawn).all()] == [q["shape"].answer]
    # exactly one colour fills two segments with another colour between them
    runs = [colours[0]] + [c for a, c in zip(colours, colours[1:]) if c != a]
    assert len(runs) == len(set(runs)) + 1 and runs.count(q["repeat"].answer) == 2
    assert all(colours[c] == q["repeat"].answer for c in q["repeat"].evidence)


def test_a_seed_fixes_the_video_and_augmentation_only_moves_colours():
    a, b, c = make_video(32, 7), make_video(32, 7), make_video(32, 8)
    assert np.array_equal(a.frames, b.frames) and a.questions == b.questions
    assert not np.array_equal(a.frames, c.frames)
    noisy = make_video(32, 7, jitter=6.0, noise=2.0)
    assert noisy.questions == a.questions
    assert 0 < np.abs(noisy.frames.astype(int) - a.frames.astype(int)).mean() < 12


def test_token_labels_follow_chunks():
    v = make_video(16, 3)
    colour, shape = token_labels(v, 4)
    assert colour.shape == shape.shape == (32,)
    assert [int(shape[4 * c]) > 0 for c in range(8)] == [c in v.needles for c in range(8)]
    assert list(COLOURS)[int(colour[0])] == v.questions["first"].answer


def test_held_out_seeds_do_not_meet_training_seeds():
    """Training draws seeds below 1e6 (jobs/train_proxy.py); held-out sets start above it."""
    assert min(held_out_seed(n, 0) for n in (8, 128)) >= 1_000_000


def test_bad_lengths_are_refused():
    for n in (6, 9):
        with pytest.raises(ValueError, match="even and >= 8"):
            make_video(n, 0)
