"""The replica's batch scheduler (pipelines/serving/batching.py), a plain class driven without Ray: concurrent
questions about one video decode together and equal answering each alone; videos interleave fairly; a client that
goes away stops its question only."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipelines.serving.batching import BatchScheduler
from pipelines.serving.errors import ClientGone
from pipelines.serving.service import QueryService
from statekv.decoding import AnswerRequest
from statekv.store.errors import CacheCorruptError
from statekv.store import prefill_to_store
from statekv.testing.videos import synthetic_frames

QUESTIONS = ["What happens?", "Which colour is the square at the start?", "Why?", "Who enters the room, and when?",
             "Describe it.", "Is it raining?"]


@pytest.fixture(scope="module")
def caches(engine):
    return [engine.prefill(synthetic_frames(n, 56, 84, seed=n), fps=2.0) for n in (6, 8)]


@torch.inference_mode()
def _alone(engine, cache, request: AnswerRequest):
    return engine.ask(cache, request.question, max_new_tokens=request.max_new_tokens)


def test_concurrent_questions_on_one_video_are_batched_and_equal_alone(engine, caches):
    cache = caches[0]
    requests = [AnswerRequest(q, max_new_tokens=4 + i) for i, q in enumerate(QUESTIONS)]
    want = [_alone(engine, cache, r) for r in requests]
    scheduler = BatchScheduler(engine, max_batch=4)
    try:
        futures = [scheduler.submit(cache, r) for r in requests]
        got = [f.result(timeout=300) for f in futures]
    finally:
        scheduler.close()
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert 1 < scheduler.max_seen_batch <= 4
    assert scheduler.steps < sum(len(w.token_ids) for w in want)


def test_videos_interleave_fairly(engine, caches, monkeypatch):
    """A single question about one video, queued behind many long ones about another, is answered after a few
    rounds, not after all of them."""
    monkeypatch.setattr(engine.adapter, "eos_token_ids", set())  # every answer runs to max_new_tokens
    busy, quiet = caches
    order: list[str] = []
    scheduler = BatchScheduler(engine, max_batch=2)
    try:
        long = [scheduler.submit(busy, AnswerRequest(q, max_new_tokens=12)) for q in QUESTIONS]
        short = scheduler.submit(quiet, AnswerRequest(QUESTIONS[0], max_new_tokens=3))
        for name, f in [("short", short), *((f"long{i}", f) for i, f in enumerate(long))]:
            f.add_done_callback(lambda _, name=name: order.append(name))
        short.result(timeout=300)
        for f in long:
            f.result(timeout=300)
    finally:
        scheduler.close()
    assert order.index("short") < 2  # at most the first running pair of long ones finish before it


def test_a_client_that_goes_away_stops_only_its_question(engine, caches, monkeypatch):
    monkeypatch.setattr(engine.adapter, "eos_token_ids", set())
    cache = caches[0]
    gone = threading.Event()
    read: list[int] = []

    def tokens(n: int) -> None:
        read.append(n)
        if sum(read) >= 4:
            gone.set()

    keep = AnswerRequest(QUESTIONS[1], max_new_tokens=30)
    want = _alone(engine, cache, keep)
    scheduler = BatchScheduler(engine, max_batch=4, sync_every=1, on_tokens=tokens)
    try:
        leaving = scheduler.submit(cache, AnswerRequest(QUESTIONS[0], max_new_tokens=10_000), cancelled=gone.is_set,
                                   label="clip")
        staying = scheduler.submit(cache, keep)
        with pytest.raises(ClientGone, match="'clip' left after"):
            leaving.result(timeout=300)
        assert staying.result(timeout=300).token_ids == want.token_ids
    finally:
        scheduler.close()
    assert scheduler.steps < 100


def test_a_failing_question_fails_alone(engine, caches, monkeypatch):
    """Regression (issue 18, point 2): a question whose prompt could not be built was popped from the queue and its
    future never set (its caller hung), and a failure failed every question of its video. Now the error goes to the
    questions it concerns only: the one whose prompt failed; those about a cache with an unusable cursor (a
    `CacheCorruptError` naming the field); never the other questions, of the same video or another."""
    good = caches[0]
    broken = copy.copy(good)
    broken.cursor = {}
    bad_start = copy.copy(good)
    bad_start.cursor = {**good.cursor, "video_start": "5"}
    prompt = engine.answer_prompt

    def answer_prompt(cache, question):
        if question == "boom":
            raise ValueError("question 'boom': no prompt")
        return prompt(cache, question)

    monkeypatch.setattr(engine, "answer_prompt", answer_prompt)
    keep = [AnswerRequest(q, max_new_tokens=6) for q in QUESTIONS[:3]]
    want = [_alone(engine, good, r).token_ids for r in keep]
    scheduler = BatchScheduler(engine, max_batch=4)
    try:
        boom = scheduler.submit(good, AnswerRequest("boom"))
        kept = [scheduler.submit(good, r) for r in keep]
        cursor_missing = [scheduler.submit(broken, AnswerRequest(q)) for q in QUESTIONS[:2]]
        cursor_wrong = scheduler.submit(bad_start, AnswerRequest(QUESTIONS[0]))
        with pytest.raises(ValueError, match="'boom'"):
            boom.result(timeout=60)
        for f in cursor_missing:
            with pytest.raises(CacheCorruptError, match="field 'video_start' is missing"):
                f.result(timeout=60)
        with pytest.raises(CacheCorruptError, match="field 'video_start' is '5', not an integer"):
            cursor_wrong.result(timeout=60)
        assert [f.result(timeout=60).token_ids for f in kept] == want
        # the scheduler thread goes on
        assert scheduler.submit(good, keep[0]).result(timeout=60).token_ids == want[0]
    finally:
        scheduler.close()


def test_service_answers_equal_with_batching_on_and_off(engine, make_service, tmp_path):
    root = str(tmp_path / "caches")
    prefill_to_store(engine, synthetic_frames(6, 56, 84, seed=6), f"{root}/clip", fps=2.0)
    on, off = make_service(root), make_service(root, batching=False)
    assert on.batcher.max_batch > 1 and off.batcher.max_batch == 1  # off: one question at a time
    jobs = [(q, 3 + i % 4) for i, q in enumerate(QUESTIONS * 2)]

    def answers(service):
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda j: service.ask(video_id="clip", question=j[0], max_new_tokens=j[1]), jobs))

    batched, sequential = answers(on), answers(off)
    assert [(r["answer"], r["token_ids"], r["finish_reason"]) for r in batched] == \
        [(r["answer"], r["token_ids"], r["finish_reason"]) for r in sequential]
    assert on.counters["generated_tokens"] == off.counters["generated_tokens"] == \
        sum(len(r["token_ids"]) for r in batched)
    assert on.batcher.steps < on.counters["generated_tokens"]


def test_bench_serving_measures_batching_off_and_on_side_by_side(tiny_checkpoints):
    """`jobs.bench_serving`'s concurrency rows for both modes in one run (in-process transport, tiny sizes)."""
    from pipelines.serving.bench import run_benchmark

    result = run_benchmark(tiny_checkpoints["qwen2_vl"], lengths=[4], concurrency=[1, 3], requests=3,
                           max_new_tokens=3, repeats=1, height=56, width=84, transport="inproc")
    rows = result["by_concurrency"]
    assert set(rows) == {"off", "on"}
    for mode in ("off", "on"):
        assert [r["concurrency"] for r in rows[mode]] == [1, 3]
        assert all(r["ok"] == 3 and r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows[mode])
    table = result["concurrency_table"].splitlines()
    assert len(table) == 4 and "on: tokens/s" in table[0] and table[3].startswith("| 3 |")
