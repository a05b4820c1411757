"""Answering over a shared video KV: batched decoding of concurrent questions, the device LRU of answer contexts,
split-KV attention and read-backs (statekv/decoding.py, statekv/device_cache.py, statekv/ops/split_kv.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv import Engine, Full
from statekv.answering import Scheduler, Ticket
from statekv.decoding import AnswerRequest, BatchDecoder
from statekv.ops import attention_reference
from statekv.ops.split_kv import attention_lse, attention_lse_reference, merge_partials, shared_attention, \
    tail_attention
from statekv.retrieval import TopK
from statekv.testing.checkpoints import save_family_checkpoint
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

FPS = 2.0
QUESTIONS = ["What happens?", "Which colour is the square at the start of the clip?", "Why?",
             "Describe every object that moves, from left to right, and say when it moves.", "Who enters?"]
MAX_NEW = [7, 3, 9, 5, 6]
# tiny frames of each family (Qwen3.5 / InternVL sizes come from their checkpoints' preprocessor configs)
SAMPLING = {"qwen2_vl": SamplingConfig(fps=FPS, min_pixels=28 * 28, max_pixels=56 * 84)}


@pytest.fixture(scope="module", params=["qwen2_vl", "internvl", "qwen3_5"])
def engine_and_cache(request, tmp_path_factory):
    path = save_family_checkpoint(tmp_path_factory.mktemp("dec") / request.param, request.param)
    engine = Engine.from_pretrained(str(path), policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SAMPLING.get(request.param, SamplingConfig(fps=FPS)))
    frames = synthetic_frames(6, 56, 84, seed=4) if request.param == "qwen2_vl" else synthetic_frames(4, 70, 100)
    return engine, engine.prefill(frames, fps=FPS)


def _requests() -> list[AnswerRequest]:
    return [AnswerRequest(q, max_new_tokens=n) for q, n in zip(QUESTIONS, MAX_NEW)]


@torch.inference_mode()
def test_batched_answers_equal_answering_each_alone(engine_and_cache, monkeypatch):
    """N concurrent questions of different lengths and token limits, batched (3 at a time, so questions join
    while others decode), give each the greedy tokens of answering it alone; one forward per step for the batch."""
    engine, cache = engine_and_cache
    alone = [engine.ask(cache, r.question, max_new_tokens=r.max_new_tokens) for r in _requests()]
    calls = []
    decode = engine.adapter.decode
    monkeypatch.setattr(engine.adapter, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    batched = engine.ask_many(cache, _requests(), max_batch=3)
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.finish_reason for b in batched] == [a.finish_reason for a in alone]
    if engine.adapter.layout.linear_layers:  # hybrid: one question at a time (documented fallback)
        assert engine.decoder(cache).max_batch == 1
        assert len(calls) == sum(len(a.token_ids) for a in alone)
    else:
        assert len(calls) < sum(len(a.token_ids) for a in alone) // 2


@torch.inference_mode()
def test_each_question_stops_at_its_own_end_of_sequence(engine_and_cache):
    """A question that meets its end-of-sequence token mid-batch stops there (tokens decoded past it before the
    next read-back are dropped) while the others go on."""
    engine, cache = engine_and_cache
    first = engine.ask(cache, QUESTIONS[0], max_new_tokens=7)
    saved = engine.adapter.eos_token_ids
    engine.adapter.eos_token_ids = {first.token_ids[2]}
    try:
        alone = [engine.ask(cache, r.question, max_new_tokens=r.max_new_tokens) for r in _requests()]
        batched = engine.ask_many(cache, _requests(), sync_every=64)
    finally:
        engine.adapter.eos_token_ids = saved
    assert alone[0].finish_reason == "eos" and alone[0].token_ids == first.token_ids[:3]
    assert [(b.token_ids, b.finish_reason) for b in batched] == [(a.token_ids, a.finish_reason) for a in alone]


@torch.inference_mode()
def test_sampled_and_scored_questions_in_a_batch_equal_alone(engine_and_cache):
    engine, cache = engine_and_cache
    if engine.adapter.layout.linear_layers:
        pytest.skip("one question at a time on hybrid models: covered above")
    reqs = [AnswerRequest(QUESTIONS[0], 5, temperature=1.0, seed=3, output_scores=True),
            AnswerRequest(QUESTIONS[1], 4, output_scores=True)]
    alone = [engine.ask(cache, r.question, max_new_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed,
                        output_scores=True) for r in reqs]
    batched = engine.ask_many(cache, reqs)
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        assert len(b.scores) == len(b.token_ids)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.scores, b.scores))


@torch.inference_mode()
def test_greedy_answers_read_back_every_few_steps_not_per_token(engine_and_cache, monkeypatch):
    engine, cache = engine_and_cache
    reads = []
    original = BatchDecoder._read_back

    def counted(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(engine.adapter, "eos_token_ids", set())  # run to max_new_tokens
    monkeypatch.setattr(BatchDecoder, "_read_back", counted)
    answer = engine.ask_many(cache, [AnswerRequest(QUESTIONS[0], max_new_tokens=17)], sync_every=8)[0]
    assert len(answer.token_ids) == 17
    assert len(reads) == 3  # after the first token (its latency), after 8 steps, at the 17th token


# --- retrieval and streaming in the same batch -----------------------------------------------------------------

def _mixed_requests() -> list[AnswerRequest]:
    """Retrieval questions (a fixed budget, the latest chunk, an adaptive budget with its probe pass) among plain
    ones, each with its own token limit."""
    settings = [TopK(k=1), None, TopK(k=2, recent=1), TopK(k=2, adaptive_budget=True), None]
    return [AnswerRequest(q, max_new_tokens=n, retrieval=r) for q, n, r in zip(QUESTIONS, MAX_NEW, settings)]


@torch.inference_mode()
def test_batched_retrieval_equals_retrieval_alone(engine_and_cache):
    """Retrieval questions batched with each other and with plain questions (3 at a time, so they join while others
    decode) give each the greedy tokens, finish reason and evidence of asking it alone."""
    engine, cache = engine_and_cache
    requests = _mixed_requests()
    alone = [engine.ask(cache, r.question, max_new_tokens=r.max_new_tokens, retrieval=r.retrieval)
             for r in requests]
    assert all(0 < len(a.evidence) for r, a in zip(requests, alone) if r.retrieval is not None)
    assert any(len(a.evidence) < cache.num_chunks for a in alone if a.evidence is not None)  # chunks left out
    batched = engine.ask_many(cache, requests, max_batch=3)
    assert [(b.token_ids, b.text, b.finish_reason) for b in batched] == \
        [(a.token_ids, a.text, a.finish_reason) for a in alone]
    for a, b in zip(alone, batched):
        assert _evidence(b) == _evidence(a)


def _evidence(answer) -> list[tuple] | None:
    """An answer's evidence: chunks, time ranges and layers exactly; scores to float rounding (a packed step
    multiplies more rows at once, which may round the last bits of later layers' queries differently, as for the
    logits of plain batched questions above)."""
    if answer.evidence is None:
        return None
    return [(e.chunk, e.start_s, e.end_s, e.layers, pytest.approx(e.score, rel=1e-5, abs=1e-6))
            for e in answer.evidence]


def test_streaming_through_the_scheduler_equals_ask(engine_and_cache):
    """A streamed question in a batch with others gets one token event per step, as each token is read back (its
    batch mates sync with it), and its events equal `ask`: tokens, text, and (retrieval) evidence."""
    engine, cache = engine_and_cache
    requests = _mixed_requests()
    with torch.inference_mode():
        alone = [engine.ask(cache, r.question, max_new_tokens=r.max_new_tokens, retrieval=r.retrieval)
                 for r in requests]
    scheduler = Scheduler(engine, max_batch=4, sync_every=64)
    batches: dict[int, list[list]] = {i: [] for i in range(len(requests))}
    tickets = [scheduler.submit(cache, Ticket(r, stream=i % 2 == 0, on_events=batches[i].append))
               for i, r in enumerate(requests)]
    while scheduler.busy:
        scheduler.round()
    assert not torch.is_inference_mode_enabled()
    for i, (t, a) in enumerate(zip(tickets, alone)):
        assert t.error is None and t.answer.token_ids == a.token_ids and _evidence(t.answer) == _evidence(a)
        if t.stream:
            assert [len(b) for b in batches[i]] == [1] * len(a.token_ids)  # each token as it was read back
            assert [b[0].token_id for b in batches[i]] == a.token_ids
            assert "".join(b[0].text for b in batches[i]) == a.text
        else:
            assert batches[i] == []
    for r, a in zip(requests, alone):  # and `Engine.stream`, a scheduler of its own
        evidence = []
        events = list(engine.stream(cache, r.question, max_new_tokens=r.max_new_tokens, retrieval=r.retrieval,
                                    evidence=evidence))
        assert [e.token_id for e in events] == a.token_ids and "".join(e.text for e in events) == a.text
        assert evidence == (a.evidence or [])


def test_one_place_steps_the_model_for_answers(engine_and_cache, monkeypatch):
    """Every answer (plain, batched, streamed, retrieval, an adaptive budget's probe pass) is stepped by the decoder
    of statekv/decoding.py, which calls the model in one place; no other module passes an answer context."""
    import ast
    import inspect
    from pathlib import Path

    engine, cache = engine_and_cache
    callers = []
    decode = engine.adapter.decode

    def recorded(*args, **kwargs):
        callers.append(inspect.stack()[1].frame.f_globals["__name__"])
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.adapter, "decode", recorded)
    with torch.inference_mode():
        engine.ask_many(cache, _mixed_requests(), max_batch=3)
        engine.ask(cache, QUESTIONS[0], max_new_tokens=2, retrieval=TopK(k=1, adaptive_budget=True))
    list(engine.stream(cache, QUESTIONS[1], max_new_tokens=2, retrieval=TopK(k=1)))
    assert callers and set(callers) == {"statekv.decoding"}
    root = Path(__file__).resolve().parents[2]
    passing = []  # modules whose calls pass an answer context (statekv_batch=) to the model
    for path in [*(root / "statekv").rglob("*.py"), *(root / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "statekv_batch" for k in node.keywords):
                passing.append(path.relative_to(root).as_posix())
    assert passing == ["statekv/decoding.py"]


# --- the device LRU ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tiny_checkpoints):
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=Full(), device="cpu",
                                    sampling=SAMPLING["qwen2_vl"])
    caches = [engine.prefill(synthetic_frames(n, 56, 84, seed=n), fps=FPS) for n in (4, 6, 8)]
    return engine, caches


@torch.inference_mode()
def test_device_lru_never_exceeds_its_bound_and_evicts_least_recent_first(qwen):
    engine, caches = qwen
    sizes = [engine.device_video(c).nbytes for c in caches]
    bound = sizes[0] + sizes[1] + sizes[2] // 2  # room for the two smaller contexts, not all three
    asker = Engine(engine.adapter, policy=Full(), sampling=engine.sampling, device_cache_bytes=bound)
    lru = asker.device_caches
    kept = []
    for i in (0, 1, 0, 2, 1, 2, 2, 0):
        asker.ask(caches[i], QUESTIONS[0], max_new_tokens=2)
        kept = [i] + [k for k in kept if k != i]
        while sum(sizes[k] for k in kept) > bound:
            kept.pop()  # least recently used first
        stats = lru.stats()
        assert stats["bytes"] <= bound
        assert stats["bytes"] == sum(sizes[k] for k in kept) and stats["entries"] == len(kept)
    assert lru.stats()["evictions"] >= 3
    assert lru.stats()["hits"] >= 1
    # a context larger than the whole bound is used, not kept
    tiny = Engine(engine.adapter, policy=Full(), sampling=engine.sampling, device_cache_bytes=sizes[0] - 1)
    tiny.ask(caches[0], QUESTIONS[0], max_new_tokens=2)
    assert tiny.device_caches.stats()["bytes"] == 0


@torch.inference_mode()
def test_answers_identical_with_and_without_the_device_lru(qwen):
    """Kept contexts are reused (no rebuild on repeated questions) and change nothing: the same tokens and
    bit-identical scores as building the context per question; asking never changes the shared context."""
    engine, caches = qwen
    without = Engine(engine.adapter, policy=Full(), sampling=engine.sampling, device_cache_bytes=0)
    with_lru = Engine(engine.adapter, policy=Full(), sampling=engine.sampling)
    for q in QUESTIONS[:3]:
        a = without.ask(caches[1], q, max_new_tokens=5, output_scores=True)
        b = with_lru.ask(caches[1], q, max_new_tokens=5, output_scores=True)
        assert a.token_ids == b.token_ids
        assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    stats = with_lru.device_caches.stats()
    assert stats["misses"] == 1 and stats["hits"] == 2
    video = with_lru.device_video(caches[1])
    before = [t.clone() for t in video.keys + video.values]
    with_lru.ask_many(caches[1], QUESTIONS)
    assert all(torch.equal(x, y) for x, y in zip(before, video.keys + video.values))
    assert without.device_caches.stats()["entries"] == 0


def test_device_lru_forgets_a_cache_that_is_gone(qwen):
    import gc

    engine, _ = qwen
    asker = Engine(engine.adapter, policy=Full(), sampling=engine.sampling)
    cache = asker.prefill(synthetic_frames(4, 56, 84, seed=9), fps=FPS)
    asker.ask(cache, QUESTIONS[0], max_new_tokens=1)
    assert asker.device_caches.stats()["entries"] == 1
    del cache
    gc.collect()
    assert asker.device_caches.stats() | {"hits": 0, "misses": 0} == {
        "entries": 0, "bytes": 0, "capacity_bytes": asker.device_caches.capacity_bytes, "hits": 0, "misses": 0,
        "evictions": 0}


# --- split-KV attention ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len, mask", [(1, True), (5, True), (1, False)])  # no mask: the fused path
def test_shared_plus_tail_equals_attention_over_both(q_len, mask):
    """Attending to [shared | tail] in two parts merged by log-sum-exp equals one attention over the
    concatenation, for a batch whose rows share the first part (GQA: 4 query heads over 2 KV heads)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, T, D = 3, 4, 2, 11, 7, 8
    shared_k, shared_v = torch.randn(1, Hkv, S, D, generator=g), torch.randn(1, Hkv, S, D, generator=g)
    tail_k, tail_v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    query = torch.randn(B, H, q_len, D, generator=g)
    want, _ = attention_reference(query, torch.cat([shared_k.expand(B, -1, -1, -1), tail_k], 2),
                                  torch.cat([shared_v.expand(B, -1, -1, -1), tail_v], 2), scaling=D ** -0.5)
    out_s, lse_s = shared_attention(query, shared_k, shared_v, scaling=D ** -0.5)
    cols, rows = torch.arange(T), torch.arange(q_len)
    visible = (cols[None, :] <= (T - q_len + rows)[:, None]).expand(B, -1, -1)
    if not mask:  # one query per row sees the row's whole tail
        visible = None
    out_t, lse_t = tail_attention(query, tail_k, tail_v, visible, scaling=D ** -0.5)
    got = merge_partials(out_s, lse_s, out_t, lse_t, torch.float32).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_attention_with_lse_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (9, 30, 30))
    out, lse = attention_lse(q, k, v, scaling=0.25)
    ref_out, ref_lse = attention_lse_reference(q, k, v, scaling=0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    empty = attention_lse(q, k[:, :, :0], v[:, :, :0], scaling=0.25)
    assert torch.equal(empty[0], torch.zeros_like(q)) and bool(np.all(empty[1].numpy() == -np.inf))
