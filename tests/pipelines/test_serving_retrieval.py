"""Retrieval through the query service, in process (FastAPI app of `create_api` over a real `QueryService`, through
Starlette's TestClient, no Ray): the `retrieval` request object and its strict schema, `evidence` with the chunks'
time ranges, answers equal to `Engine.ask(..., retrieval=...)`, a cache that answers from its state refused with
409, and an LRU that holds what retrieval read (summary keys, per-layer chunk K/V), not whole videos.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pipelines.serving.app import create_api
from pipelines.serving.lazy import held_nbytes
from pipelines.serving.schema import MAX_RETRIEVAL_CHUNKS
from pipelines.serving.service import RETRIEVAL_KEY
from statekv import Engine
from statekv.retrieval import Segments, TopK
from statekv.store import load_cache, prefill_to_store
from statekv.testing.videos import synthetic_frames

QUESTION = "What happens after the dog enters?"
TOKENS = 4
CHUNKS = 24  # of long_a and long_b: 2 frames each
SETTINGS = [({"top_k": 2, "recent": 1}, TopK(k=2, recent=1)),
            ({"top_k": 3, "adaptive": True}, TopK(k=3, adaptive_budget=True)),
            ({"top_k": 2, "query": "question"}, TopK(k=2, query="question")),
            ({"segments": 4, "recent": 1}, Segments(k=4, recent=1)),
            ({"segments": 5}, Segments(k=5))]


@pytest.fixture(scope="module")
def root(tmp_path_factory, engine, tiny_checkpoints):
    """A local root: long_a, long_b (24 chunks each) and state_only (answer_from='state', same model)."""
    base = tmp_path_factory.mktemp("serving-retrieval") / "caches"
    prefill_to_store(engine, synthetic_frames(2 * CHUNKS, 56, 84, seed=5), f"{base}/long_a", fps=2.0)
    prefill_to_store(engine, synthetic_frames(2 * CHUNKS, 56, 84, seed=6), f"{base}/long_b", fps=2.0)
    state = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu", sampling=engine.sampling,
                                   answer_from="state")
    prefill_to_store(state, synthetic_frames(8, 56, 84, seed=7), f"{base}/state_only", fps=2.0)
    return base


@pytest.fixture
def client(make_service, root):
    service = make_service(str(root), max_new_tokens_limit=16)
    with TestClient(create_api(service)) as c:
        yield c, service


def _ask(c, **body):
    return c.post("/v1/ask", json={"video_id": "long_a", "question": QUESTION, "max_new_tokens": TOKENS, **body})


def _events(response) -> list[dict]:
    return [json.loads(part[len("data: "):]) for part in response.text.split("\n\n") if part.startswith("data: ")]


def _error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]["message"]


@pytest.mark.parametrize("body, setting", SETTINGS, ids=[json.dumps(b) for b, _ in SETTINGS])
def test_retrieval_answers_equal_the_engines(client, engine, root, body, setting):
    """Same token ids and the same evidence (chunks, times, scores, layers) over HTTP as from the engine on the
    stored cache; the evidence's time ranges are the chunks' source timestamps."""
    c, _ = client
    cache = load_cache(f"{root}/long_a")
    want = engine.ask(cache, QUESTION, max_new_tokens=TOKENS, retrieval=setting)
    assert 0 < len(want.evidence) < cache.num_chunks  # retrieval left chunks out
    r = _ask(c, retrieval=body)
    assert r.status_code == 200, r.text
    got = r.json()
    done = _events(_ask(c, retrieval=body, stream=True))[-1]
    assert done["type"] == "done"
    for answer in (got, done):
        assert answer["token_ids"] == want.token_ids and answer["answer"] == want.text
        assert answer["evidence"] == [{"chunk": e.chunk, "start_s": e.start_s, "end_s": e.end_s, "score": e.score,
                                       "layers": e.layers} for e in want.evidence]
        chunks = [e["chunk"] for e in answer["evidence"]]
        assert answer["tokens"]["context"] == cache.prefix_len + sum(cache.chunk_tokens[i] for i in chunks)
    frame_s = 1 / cache.video.sampled_fps
    for e in got["evidence"]:
        times = cache.committed.manifest["video"]["timestamps"][slice(*cache.chunks[e["chunk"]].frame_range)]
        assert (e["start_s"], e["end_s"]) == (times[0], pytest.approx(times[-1] + frame_s))


def test_without_retrieval_there_is_no_evidence(client, engine, root):
    c, _ = client
    want = engine.ask(load_cache(f"{root}/long_a"), QUESTION, max_new_tokens=TOKENS)
    for extra in ({}, {"retrieval": None}):
        body = _ask(c, **extra).json()
        assert body["evidence"] is None and body["token_ids"] == want.token_ids
    assert _events(_ask(c, stream=True))[-1]["evidence"] is None


BAD = [({"top_k": "3"}, "retrieval.top_k"), ({"top_k": 1.5}, "retrieval.top_k"), ({"top_k": True}, "retrieval.top_k"),
       ({"top_k": 0}, "retrieval.top_k"), ({"top_k": MAX_RETRIEVAL_CHUNKS + 1}, "retrieval.top_k"),
       ({"segments": -1}, "retrieval.segments"), ({"top_k": 2, "recent": -1}, "retrieval.recent"),
       ({"top_k": 2, "recent": None}, "retrieval.recent"), ({"top_k": 2, "adaptive": "yes"}, "retrieval.adaptive"),
       ({"top_k": 2, "k": 3}, "retrieval.k"), ({"segments": 2, "adaptive": True}, "adaptive: only with top_k"),
       ({"top_k": 2, "query": "bare"}, "retrieval.query"), ({"segments": 2, "query": "question"}, "query: only with top_k"),
       ({"top_k": 2, "segments": 2}, "exactly one of top_k and segments"), ({}, "exactly one of top_k and segments"),
       ({"recent": 2}, "exactly one of top_k and segments"), ("top_k", "retrieval"), ([64], "retrieval"),
       (64, "retrieval")]


@pytest.mark.parametrize("bad, named", BAD, ids=[json.dumps(b) for b, _ in BAD])
def test_retrieval_is_strictly_validated(client, bad, named):
    c, _ = client
    for stream in (False, True):
        message = _error(_ask(c, retrieval=bad, stream=stream), 422, "invalid_request")
        assert named in message, message
        assert message.startswith("retrieval")


def test_retrieval_is_in_the_schema(client):
    c, _ = client
    schema = c.get("/openapi.json").json()
    parts = schema["components"]["schemas"]
    ask = parts["AskRequest"]["properties"]["retrieval"]
    assert {"$ref": "#/components/schemas/RetrievalRequest"} in ask["anyOf"] and "evidence" in ask["description"]
    r = parts["RetrievalRequest"]
    assert r["additionalProperties"] is False and set(r["properties"]) == {"top_k", "segments", "recent", "adaptive",
                                                                             "query"}
    assert r["oneOf"] == [{"required": ["top_k"]}, {"required": ["segments"], "not": {"anyOf": [
        {"required": ["adaptive"]}, {"required": ["query"]}]}}]
    assert r["properties"]["query"]["enum"] == ["prompt", "question"]
    for name in ("top_k", "segments"):
        assert (r["properties"][name]["minimum"], r["properties"][name]["maximum"]) == (1, MAX_RETRIEVAL_CHUNKS)
    assert r["properties"]["recent"]["minimum"] == 0
    evidence = parts["AskResponse"]["properties"]["evidence"]
    assert {"type": "null"} in evidence["anyOf"] and "null without" in evidence["description"]
    assert set(parts["Evidence"]["properties"]) == {"chunk", "start_s", "end_s", "score", "layers"}
    responses = schema["paths"]["/v1/ask"]["post"]["responses"]
    assert "retrieval_unsupported" in responses["409"]["description"]


def test_retrieval_from_a_state_cache_is_a_409_naming_why(client):
    c, _ = client
    for body in ({"top_k": 4}, {"segments": 4}):
        for stream in (False, True):
            message = _error(_ask(c, video_id="state_only", retrieval=body, stream=stream), 409,
                             "retrieval_unsupported")
            assert "'state_only'" in message and "answer_from='state'" in message and "without retrieval" in message
    assert _ask(c, video_id="state_only").status_code == 200  # it answers, from its state


def test_the_lru_holds_what_retrieval_read(make_service, root):
    """Retrieval requests keep the manifest, prefix, summary keys and the per-layer chunk K/V they read, in an entry
    of their own whose bytes grow as chunks are read; a full answer keeps the whole cache in another entry."""
    service = make_service(str(root))
    whole = load_cache(f"{root}/long_a", lazy=False).nbytes
    key = RETRIEVAL_KEY.format("long_a")
    sizes = []
    for k, question in ((1, QUESTION), (1, QUESTION), (3, "Which colour is the square?"), (CHUNKS, QUESTION)):
        got = service.ask(video_id="long_a", question=question, max_new_tokens=2, retrieval={"top_k": k})
        held = service.lru.peek(key).cache
        assert held.chunks.loaded == []  # no chunk was read whole: only the layers' K/V that were chosen
        assert service.lru.stats()["bytes"] == held_nbytes(held)
        sizes.append(held_nbytes(held))
        assert got["cache"] == ("miss" if len(sizes) == 1 else "hit")
    assert sizes[0] == sizes[1] < sizes[2] <= sizes[3]  # the same question reads nothing new
    # 3 of 24 chunks per layer, the summary keys and the prefix (which weighs much in a tiny model)
    assert sizes[2] < 0.35 * whole, (sizes, whole)
    assert service.counters["store_loads"] == 1
    service.ask(video_id="long_a", question=QUESTION, max_new_tokens=2)
    assert service.lru.keys() == [key, "long_a"]
    assert service.lru.stats()["bytes"] == sizes[3] + whole


def test_the_lru_bound_holds_as_retrieval_entries_grow(make_service, root):
    """A retrieval entry charged for each read: once the held bytes pass the capacity the least recently used
    entries are evicted, during the question, and the bound always holds."""
    probe = make_service(str(root))
    probe.ask(video_id="long_a", question=QUESTION, max_new_tokens=1, retrieval={"top_k": 2})
    one = probe.lru.stats()["bytes"]
    service = make_service(str(root), lru_bytes=int(one * 1.5))
    for video in ("long_a", "long_b", "long_a"):
        got = service.ask(video_id=video, question=QUESTION, max_new_tokens=1, retrieval={"top_k": 2})
        assert got["cache"] == "miss"
        assert service.lru.keys() == [RETRIEVAL_KEY.format(video)]
        assert service.lru.stats()["bytes"] == one <= service.lru.capacity_bytes
    assert service.lru.stats()["evictions"] == 2
    # an entry that grows past the whole capacity is dropped (its question still gets its answer)
    got = service.ask(video_id="long_a", question=QUESTION, max_new_tokens=1, retrieval={"top_k": CHUNKS})
    assert got["cache"] == "hit" and len(got["evidence"]) == CHUNKS
    assert service.lru.keys() == [] and service.lru.stats()["bytes"] == 0


def test_a_recommitted_cache_is_not_served_stale_with_retrieval(make_service, engine, tmp_path):
    """A retrieval entry is revalidated like a whole cache; one kept past a re-prefill whose old files are gone
    answers 503 cache_changed (retry at once) and is dropped, and the retry reads the new commit."""
    from pipelines.serving.service import Unavailable

    root = tmp_path / "caches"
    uri = f"{root}/clip"

    def commit(seed: int) -> None:  # old files deleted at once (no grace period for readers of the old commit)
        prefill_to_store(engine, synthetic_frames(2 * CHUNKS, 56, 84, seed=seed), uri, fps=2.0,
                         writer_kwargs={"sweep_grace_s": 0})

    def ask(service, k: int) -> dict:
        return service.ask(video_id="clip", question=QUESTION, max_new_tokens=2, retrieval={"top_k": k})

    commit(0)
    fresh, kept = make_service(str(root), revalidate_s=0), make_service(str(root), revalidate_s=3600)
    for service in (fresh, kept):
        ask(service, 1)
    commit(9)
    want = engine.ask(load_cache(uri), QUESTION, max_new_tokens=2, retrieval=TopK(k=2))
    got = ask(fresh, 2)
    assert got["cache"] == "miss" and fresh.lru.stats()["invalidations"] == 1
    assert got["token_ids"] == want.token_ids and [e["chunk"] for e in got["evidence"]] == [e.chunk for e in want.evidence]
    with pytest.raises(Unavailable) as caught:
        ask(kept, CHUNKS)  # chunks it has not read yet: their old files are gone
    assert caught.value.code == "cache_changed" and caught.value.headers == {"Retry-After": "0"}
    assert kept.lru.keys() == []
    again = ask(kept, 2)
    assert again["cache"] == "miss" and again["token_ids"] == want.token_ids


def test_retrieval_and_streamed_questions_are_batched_and_equal_alone(make_service, engine, root):
    """Concurrent retrieval questions about one video, asked and streamed, go through the batch scheduler together
    (retrieval and streaming no longer bypass it) and each equals `Engine.ask` alone: tokens, text and evidence
    (scores to float rounding: a packed step may round later layers' queries differently). A stream gives one
    token event per token, then "done"; the counters add up and nothing is left in flight."""
    from concurrent.futures import ThreadPoolExecutor

    service = make_service(str(root), max_new_tokens_limit=16)
    cache = load_cache(f"{root}/long_a")
    jobs = [(body, setting, stream) for body, setting in SETTINGS for stream in (False, True)]
    want = [engine.ask(cache, QUESTION, max_new_tokens=TOKENS, retrieval=setting) for _, setting, _ in jobs]

    def run(job):
        body, _, stream = job
        fields = dict(video_id="long_a", question=QUESTION, max_new_tokens=TOKENS, retrieval=body)
        if not stream:
            return service.ask(**fields)
        events = list(service.stream(**fields))
        assert [e["type"] for e in events] == ["token"] * (len(events) - 1) + ["done"], events[-1]
        assert [e["token_id"] for e in events[:-1]] == events[-1]["token_ids"]
        assert "".join(e["text"] for e in events[:-1]) == events[-1]["answer"]
        return events[-1]

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for g, w in zip(got, want):
        assert (g["token_ids"], g["answer"], g["finish_reason"]) == (w.token_ids, w.text, w.finish_reason)
        assert [(e["chunk"], e["start_s"], e["end_s"], e["layers"]) for e in g["evidence"]] == \
            [(e.chunk, e.start_s, e.end_s, e.layers) for e in w.evidence]
        assert [e["score"] for e in g["evidence"]] == pytest.approx([e.score for e in w.evidence], rel=1e-5)
    assert service.batcher.max_seen_batch > 1
    assert service.counters["generated_tokens"] == sum(len(g["token_ids"]) for g in got)
    assert service.counters["in_flight"] == 0 and service.counters["cancelled"] == 0
