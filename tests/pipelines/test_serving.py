"""The query service: the plain `QueryService` class (no Ray), then the Serve deployment on the session's local
Ray cluster over real HTTP, with caches on the loopback S3 server."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pipelines.serving.config import ServiceConfig
from pipelines.serving.service import (BadRequest, CacheLRU, Conflict, NotFound, PayloadTooLarge, QueryService,
                                       Unprocessable)
from statekv.retrieval import Segments, TopK
from statekv.store import load_cache, prefill_to_store
from statekv.testing.videos import synthetic_frames
from tests.pipelines.serving_http import free_port, wait_ready

QUESTIONS = ["What happens?", "Which colour is the square?"]
TOKENS = 8
LIMIT = 20000  # the served app's max_new_tokens_limit: long enough that an abandoned answer would run for long


@pytest.fixture(scope="module")
def store(s3_server, tiny_checkpoints, engine, make_engine):
    """(root, storage options) on the loopback S3 server: clip_a, clip_b (qwen2_vl) and other_model (qwen2_5_vl)."""
    endpoint, options = s3_server
    root = f"s3://caches/serving-{uuid.uuid4().hex[:8]}"
    prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=0), f"{root}/clip_a", fps=2.0, storage_options=options)
    prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=1), f"{root}/clip_b", fps=2.0, storage_options=options)
    other = make_engine(tiny_checkpoints["qwen2_5_vl"])
    prefill_to_store(other, synthetic_frames(8, 56, 84, seed=2), f"{root}/other_model", fps=2.0,
                     storage_options=options)
    return root, options


@pytest.fixture(scope="module")
def expected(engine, store):
    """Sequential greedy answers of the engine itself on the stored caches: {(video, question): Answer}."""
    root, options = store
    out = {}
    for video in ("clip_a", "clip_b"):
        cache = load_cache(f"{root}/{video}", storage_options=options)
        for q in QUESTIONS:
            out[video, q] = engine.ask(cache, q, max_new_tokens=TOKENS)
    return out


def _config(tiny_checkpoints, root, endpoint, **overrides) -> ServiceConfig:
    settings = dict(model=tiny_checkpoints["qwen2_vl"], caches_root=root, endpoint_url=endpoint, region="us-east-1",
                    storage_options={"key": "testing", "secret": "testing"}, device="cpu", lru_bytes=64 << 20,
                    max_question_chars=200, max_question_tokens=64, max_new_tokens_limit=LIMIT, retry_after_s=7,
                    num_cpus=0.5)
    settings.update(overrides)
    return ServiceConfig(**settings)


# --- the plain class --------------------------------------------------------------------------------------------

def test_service_answers_from_store_without_prefill(engine, store, expected):
    root, options = store
    service = QueryService(engine, root, storage_options=options, lru_bytes=64 << 20)
    try:
        for video in ("clip_a", "clip_b"):
            for q in QUESTIONS:
                got = service.ask(video_id=video, question=q, max_new_tokens=TOKENS)
                assert got["answer"] == expected[video, q].text
                assert got["token_ids"] == expected[video, q].token_ids
        events = list(service.stream(cache_uri=f"{root}/clip_a", question=QUESTIONS[0], max_new_tokens=TOKENS))
        assert "".join(e["text"] for e in events[:-1]) == expected["clip_a", QUESTIONS[0]].text
        assert events[-1]["type"] == "done" and events[-1]["token_ids"] == expected["clip_a", QUESTIONS[0]].token_ids
        # answering never ran the vision tower or the video prefill, and each video was read from the store once
        assert service.counters == {"vision_tower_calls": 0, "prefill_calls": 0, "store_loads": 2,
                                    "generated_tokens": 5 * TOKENS, "in_flight": 0, "cancelled": 0}
        assert service.lru.stats()["loads"] == 2 and service.lru.stats()["hits"] == 3
    finally:
        engine.adapter.__dict__.pop("video_features", None)  # drop the counting wrappers on the shared engine
        engine.__dict__.pop("prefill", None)


def test_counters_see_a_prefill(engine, store):
    """Guards the proof above: the counters do count when the engine prefills."""
    root, options = store
    service = QueryService(engine, root, storage_options=options)
    try:
        engine.prefill(synthetic_frames(4, 56, 84), fps=2.0)
        assert service.counters["prefill_calls"] == 1 and service.counters["vision_tower_calls"] >= 1
    finally:
        engine.adapter.__dict__.pop("video_features", None)
        engine.__dict__.pop("prefill", None)


def test_concurrent_misses_load_once():
    """Two requests missing the same video at once must share one store read."""
    lru = CacheLRU(100)
    gate = threading.Event()
    calls = []

    def load():
        calls.append(1)
        gate.wait(5)
        return "cache", 10

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lru.get, "v", load) for _ in range(8)]
        gate.set()
        results = [f.result() for f in futures]
    assert len(calls) == 1 and all(value == "cache" for value, _ in results)
    assert sum(not hit for _, hit in results) == 1


def test_lru_bounded_in_bytes():
    lru = CacheLRU(25)
    for key in "abc":
        lru.get(key, lambda: (key, 10))
    assert lru.keys() == ["b", "c"] and lru.stats()["bytes"] == 20 and lru.stats()["evictions"] == 1
    lru.get("b", lambda: pytest.fail("b is kept"))
    lru.get("huge", lambda: ("huge", 26))  # served, not kept
    assert lru.keys() == ["c", "b"]


def test_lru_entries_that_grow_keep_the_bound():
    """`resize` (a lazily held cache that read more) evicts the least recently used others first, drops an entry
    grown past the whole capacity, and ignores an entry no longer held."""
    lru = CacheLRU(30)
    values = {key: lru.get(key, lambda: (object(), 10))[0] for key in "abc"}
    assert lru.resize("c", values["c"], 15) and lru.keys() == ["b", "c"] and lru.stats()["bytes"] == 25
    lru.get("b", lambda: pytest.fail("b is kept"))  # b is now the most recently used
    assert lru.resize("c", values["c"], 20) and lru.keys() == ["c", "b"] and lru.stats()["bytes"] == 30  # fits
    assert lru.resize("c", values["c"], 21) and lru.keys() == ["c"] and lru.stats()["bytes"] == 21
    assert lru.resize("c", values["c"], 31) and lru.keys() == [] and lru.stats()["bytes"] == 0
    assert not lru.resize("c", values["c"], 5) and lru.stats()["bytes"] == 0
    assert lru.stats()["evictions"] == 3


OUTSIDE = ["../clip_a", "..", "a/b", "/etc/passwd", "%2e%2e%2fclip_a", "clip_a/../../x", ".hidden", "clip a", ""]
OUTSIDE_URIS = ["s3://caches/elsewhere/clip_a", "s3://other-bucket/clip_a", "{root}/../clip_a", "{root}/%2e%2e/x",
                "{root}/clip_a/../../x", "{root}/a/b", "file:///etc/passwd", "/etc/passwd", "S3://caches/x",
                "http://169.254.169.254/latest/meta-data", "{root}", "{root}/..", "{root}/clip_a%2F..%2F..",
                "s3a://{bare}/clip_a", "{root}\\..\\x"]


def test_a_cold_question_reads_the_manifest_once_and_checks_the_model_once(engine, store, expected, monkeypatch,
                                                                         make_service):
    """Issue 19: a cold question HEADed the manifest, read it twice and checked the model's fingerprint three
    times. Now: one manifest read (its version comes with it), one model check (the store's, before any tensor is
    read), one cursor check; a warm question within `revalidate_s` reads no manifest and checks nothing again."""
    import statekv.store.manifest as manifest_module
    from statekv.cache import ModelInfo

    root, options = store
    calls = {"get": 0, "head": 0, "model": 0, "cursor": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(manifest_module, "read_versioned", counting("get", manifest_module.read_versioned))
    monkeypatch.setattr(manifest_module, "object_version", counting("head", manifest_module.object_version))
    monkeypatch.setattr(ModelInfo, "check_serves", counting("model", ModelInfo.check_serves))
    monkeypatch.setattr(engine.adapter, "cursor_problem", counting("cursor", engine.adapter.cursor_problem))
    service = make_service(root, storage_options=options, revalidate_s=3600.0)
    try:
        got = service.ask(video_id="clip_a", question=QUESTIONS[0], max_new_tokens=TOKENS)
        assert got["token_ids"] == expected["clip_a", QUESTIONS[0]].token_ids and got["cache"] == "miss"
        assert calls == {"get": 1, "head": 0, "model": 1, "cursor": 1}
        got = service.ask(video_id="clip_a", question=QUESTIONS[1], max_new_tokens=TOKENS)
        assert got["token_ids"] == expected["clip_a", QUESTIONS[1]].token_ids and got["cache"] == "hit"
        assert calls == {"get": 1, "head": 0, "model": 1, "cursor": 1}
    finally:
        service.batcher.close()


def test_outside_root_never_read(engine, store, monkeypatch):
    root, options = store
    from statekv.store.cache_store import CacheStore

    reads = []
    for name in ("manifest", "load", "version", "list", "summary_keys"):
        monkeypatch.setattr(CacheStore, name, lambda *a, _n=name, **k: reads.append((_n, a)))
    service = QueryService(engine, root, storage_options=options)
    try:
        for vid in OUTSIDE:
            with pytest.raises(Unprocessable):
                service.ask(video_id=vid, question="q")
            with pytest.raises(Unprocessable):
                service.describe(vid)
        for uri in OUTSIDE_URIS:
            with pytest.raises(BadRequest):
                service.ask(cache_uri=uri.format(root=root, bare=root[len("s3://"):]), question="q")
    finally:
        engine.adapter.__dict__.pop("video_features", None)
        engine.__dict__.pop("prefill", None)
    assert reads == []


def test_service_errors(engine, store):
    root, options = store
    service = QueryService(engine, root, storage_options=options, max_question_tokens=16)
    try:
        with pytest.raises(NotFound):
            service.ask(video_id="nope", question="q")
        with pytest.raises(PayloadTooLarge, match="at most 16 tokens"):
            service.ask(video_id="clip_a", question="\U0001F600" * 8)
        with pytest.raises(Conflict, match="qwen2_5_vl.*qwen2_vl"):
            service.ask(video_id="other_model", question="q")
    finally:
        engine.adapter.__dict__.pop("video_features", None)
        engine.__dict__.pop("prefill", None)


# --- the Serve deployment over HTTP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(ray_cluster, s3_server, store, tiny_checkpoints):
    """(httpx client, root): the service on a free port; a second app at /unreachable whose store refuses."""
    from ray import serve

    from pipelines.serving.app import build_app

    endpoint, _ = s3_server
    root, _ = store
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_config(tiny_checkpoints, root, endpoint)), name="query", route_prefix="/", blocking=False)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    serve.run(build_app(_config(tiny_checkpoints, root, dead, storage_options={
        "key": "testing", "secret": "testing", "config_kwargs": {"retries": {"max_attempts": 1}}})),
              name="unreachable", route_prefix="/unreachable", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0)
    wait_ready(client, "/healthz")
    wait_ready(client, "/unreachable/healthz")
    yield client, root
    client.close()
    serve.shutdown()


def _ask(client, **body):
    return client.post("/v1/ask", json={"max_new_tokens": TOKENS, **body})


def _sse_events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_http_answer_equals_engine(served, expected):
    client, root = served
    want = expected["clip_a", QUESTIONS[0]]
    r = _ask(client, video_id="clip_a", question=QUESTIONS[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == want.text and body["token_ids"] == want.token_ids
    assert body["video_id"] == "clip_a"
    assert body["tokens"] == {"prompt": len(want.prompt_ids), "context": body["tokens"]["context"],
                              "generated": len(want.token_ids)}
    assert set(body["timings"]) == {"load_s", "first_token_s", "total_s"}

    r = _ask(client, cache_uri=f"{root}/clip_a", question=QUESTIONS[0], stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r)
    assert "".join(e["text"] for e in events if e["type"] == "token") == want.text
    assert events[-1]["type"] == "done" and events[-1]["answer"] == want.text
    assert events[-1]["token_ids"] == want.token_ids


def test_http_concurrent_answers_match_sequential(served, expected):
    client, _ = served
    jobs = [(("clip_a", "clip_b")[i % 2], QUESTIONS[(i // 2) % 2]) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: _ask(client, video_id=job[0], question=job[1]), jobs))
    assert [r.status_code for r in responses] == [200] * 64
    for (video, q), r in zip(jobs, responses):
        assert r.json()["answer"] == expected[video, q].text
        assert r.json()["token_ids"] == expected[video, q].token_ids


def test_http_never_prefills_and_reads_each_video_once(served):
    from ray import serve

    client, _ = served
    for video in ("clip_a", "clip_b"):
        assert _ask(client, video_id=video, question=QUESTIONS[1]).status_code == 200
    stats = serve.get_app_handle("query").stats.remote().result()
    assert stats["counters"]["vision_tower_calls"] == 0 and stats["counters"]["prefill_calls"] == 0
    assert stats["counters"]["store_loads"] == 2 and stats["lru"]["entries"] == 2
    assert stats["device_cache"]["entries"] == 2  # each video's answer context built once, kept on the device
    assert stats["batching"]["steps"] > 0


def test_http_listing_and_inspect(served):
    client, root = served
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert [v["video_id"] for v in page["videos"]] == ["clip_a", "clip_b"]
    assert page["total"] == 3 and page["next_offset"] == 2
    rest = client.get("/v1/videos", params={"limit": 2, "offset": 2}).json()
    assert [(v["video_id"], v["compatible"]) for v in rest["videos"]] == [("other_model", False)]
    assert rest["next_offset"] is None
    info = client.get("/v1/videos/clip_a").json()
    assert info["tokens"]["video"] == 24 and info["tokens"]["chunks"] == 4 and info["compatible"] is True
    assert info["model"]["model_type"] == "qwen2_vl" and "24 video tokens in 4 chunks" in info["summary"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/v1/ask" in client.get("/openapi.json").json()["paths"]


def _assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in r.text
    if code is not None:
        assert error["code"] == code
    return error


def test_http_errors(served):
    client, root = served
    _assert_error(_ask(client, video_id="missing", question="q"), 404, "not_found")
    _assert_error(client.get("/v1/videos/missing"), 404, "not_found")
    for bad in ({"question": "q"}, {"video_id": "clip_a"}, {"video_id": "clip_a", "cache_uri": f"{root}/clip_a",
                                                            "question": "q"},
                {"video_id": "clip_a", "question": "q", "max_new_tokens": 0},
                {"video_id": "clip_a", "question": "q", "max_new_tokens": LIMIT + 1},
                {"video_id": "clip_a", "question": "q", "top_p": 0}, {"video_id": "clip_a", "question": "q", "x": 1},
                {"video_id": 3, "question": "q"}, [1, 2]):
        _assert_error(client.post("/v1/ask", json=bad), 422, "invalid_request")
    _assert_error(client.post("/v1/ask", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _assert_error(client.get("/v1/videos", params={"limit": 0}), 422)
    _assert_error(_ask(client, video_id="clip_a", question="x" * 201), 422, "invalid_request")
    _assert_error(_ask(client, video_id="clip_a", question="\U0001F600" * 50), 413, "question_too_long")
    err = _assert_error(_ask(client, video_id="other_model", question="q"), 409, "model_mismatch")
    assert "qwen2_5_vl" in err["message"] and "qwen2_vl" in err["message"].split("this service runs")[1]
    r = client.post("/unreachable/v1/ask", json={"video_id": "clip_a", "question": "q"})
    _assert_error(r, 503, "storage_unavailable")
    assert r.headers["retry-after"] == "7"
    _assert_error(client.get("/unreachable/v1/videos"), 503)
    # alive but not ready: Serve keeps the replica (a restart brings no network back), probes route around it
    health = client.get("/unreachable/healthz")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["storage"] == "storage_unavailable"
    _assert_error(client.get("/unreachable/readyz"), 503, "storage_unavailable")
    assert client.get("/readyz").json() == {"status": "ready"} and client.get("/healthz").json()["storage"] == "ok"


@pytest.mark.parametrize("video_id", [v for v in OUTSIDE if v])
def test_http_outside_root_refused(served, video_id):
    client, root = served
    _assert_error(_ask(client, video_id=video_id, question="q"), 422, "invalid_request")
    uri = OUTSIDE_URIS[OUTSIDE.index(video_id) % len(OUTSIDE_URIS)].format(root=root, bare=root[5:])
    _assert_error(_ask(client, cache_uri=uri, question="q"), 400, "outside_root")


def test_http_traversal_in_path_refused(served):
    client, _ = served
    for raw in ("/v1/videos/%2e%2e%2f%2e%2e%2fetc", "/v1/videos/..%2Fclip_a", "/v1/videos/a%2Fb"):
        r = client.send(client.build_request("GET", httpx.URL(client.base_url.join(raw), )))
        assert r.status_code in (404, 422), r.text
        assert "error" in r.json()


def _counters() -> dict:
    """The query app's counters (in_flight, generated_tokens, cancelled, ...)."""
    from ray import serve

    return serve.get_app_handle("query").stats.remote().result()["counters"]


def _wait_for(condition, what: str, timeout: float = 300.0) -> dict:
    """Poll the counters until `condition(counters)` holds (no fixed sleeps); the counters then."""
    import time

    deadline = time.monotonic() + timeout
    while not condition(now := _counters()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {now}")
        threading.Event().wait(0.05)
    return now


def _send_raw(port: int, body: dict) -> socket.socket:
    """POST /v1/ask on a raw socket (so the test decides when the client leaves)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_http_abandoned_request_stops_computing(served, engine, store):
    """A client that gives up on a long non-streaming answer: the replica stops decoding it (Serve cancels the
    request when the connection closes), far before max_new_tokens."""
    client, _ = served
    root, options = store
    # what the request would cost to its end: the greedy answer runs to its end-of-sequence token
    natural = len(engine.ask(load_cache(f"{root}/clip_a", storage_options=options), QUESTIONS[0],
                             max_new_tokens=LIMIT).token_ids)
    assert natural > 500
    before = _wait_for(lambda c: c["in_flight"] == 0, "idle replica")
    sock = _send_raw(client.base_url.port, {"video_id": "clip_a", "question": QUESTIONS[0], "max_new_tokens": LIMIT})
    _wait_for(lambda c: c["in_flight"] == 1 and c["generated_tokens"] > before["generated_tokens"], "decoding")
    sock.close()  # the client gives up
    after = _wait_for(lambda c: c["in_flight"] == 0, "the abandoned answer to stop")
    assert after["cancelled"] == before["cancelled"] + 1  # stopped by the cancel, not by its own end
    assert after["generated_tokens"] - before["generated_tokens"] < natural // 2


def test_http_abandoned_stream_stops_at_once(served):
    """Regression (issue 18, point 10): a streaming client that left kept its answer's generator (and `in_flight`)
    alive until garbage collection, and Serve's cancelled receive channel (TaskCancelledError) was logged as an
    unexpected error. Now the stream's work stops with the response: `in_flight` is back to 0 and the tokens stop."""
    client, _ = served
    _wait_for(lambda c: c["in_flight"] == 0, "idle replica", timeout=60)
    sock = _send_raw(client.base_url.port, {"video_id": "clip_a", "question": QUESTIONS[0], "max_new_tokens": LIMIT,
                                            "stream": True})
    received = b""
    while b"data: " not in received:  # the first token event
        received += sock.recv(65536)
    _wait_for(lambda c: c["in_flight"] == 1, "streaming", timeout=60)
    sock.close()  # the client gives up
    after = _wait_for(lambda c: c["in_flight"] == 0, "the abandoned stream to stop", timeout=30)
    assert after["generated_tokens"] == _counters()["generated_tokens"]  # no more tokens are made


def test_http_retrieval_answers_equal_the_engines(served, engine, store):
    """Over real HTTP (Serve, caches on S3): the same token ids and evidence as `Engine.ask(..., retrieval=...)` on
    the stored cache, for concurrent requests too (one lazily held cache shared by them)."""
    from ray import serve

    client, _ = served
    root, options = store
    settings = [({"top_k": 2, "recent": 1}, TopK(k=2, recent=1)), ({"segments": 2, "recent": 0}, Segments(k=2, recent=0))]
    want = {}
    for video in ("clip_a", "clip_b"):
        cache = load_cache(f"{root}/{video}", storage_options=options)
        for i, (_, setting) in enumerate(settings):
            answer = engine.ask(cache, QUESTIONS[0], max_new_tokens=TOKENS, retrieval=setting)
            want[video, i] = (answer.token_ids, [(e.chunk, e.start_s, e.end_s, e.score, e.layers)
                                                 for e in answer.evidence])
    jobs = [(("clip_a", "clip_b")[i % 2], (i // 2) % 2) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: _ask(client, video_id=job[0], question=QUESTIONS[0],
                                                   retrieval=settings[job[1]][0]), jobs))
    for job, r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        got = (body["token_ids"], [(e["chunk"], e["start_s"], e["end_s"], e["score"], e["layers"])
                                   for e in body["evidence"]])
        assert got == want[job]
    events = _sse_events(_ask(client, video_id="clip_a", question=QUESTIONS[0], retrieval=settings[0][0],
                              stream=True))
    assert events[-1]["type"] == "done" and events[-1]["token_ids"] == want["clip_a", 0][0]
    assert [e["chunk"] for e in events[-1]["evidence"]] == [c for c, *_ in want["clip_a", 0][1]]
    lru = serve.get_app_handle("query").stats.remote().result()["lru"]
    assert lru["bytes"] <= lru["capacity_bytes"]


# --- configuration and entry points -----------------------------------------------------------------------------

def test_serve_config_files_build_the_app():
    """infra/serve/config.yaml is a valid Serve config whose args build the app; the RayService embeds the same."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serving.app import app_builder

    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "infra/serve/config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "pipelines.serving.app:app_builder"
    ServiceConfig.from_dict(app["args"])
    assert app_builder(app["args"]) is not None
    rayservice = yaml.safe_load((repo / "infra/kuberay/rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"] == app["args"]


def test_statekv_serve_arguments():
    from jobs import serve as serve_job
    from jobs.cli import build_parser

    args = build_parser().parse_args(["serve", "--caches", "s3://b/caches", "--model", "m", "--port", "9000",
                                      "--num-gpus", "1", "--lru-bytes", "1000", "--endpoint-url", "http://s3:9000",
                                      "--max-question-tokens", "300", "--revalidate-s", "0"])
    config = serve_job.config_from_args(args)
    assert (config.caches_root, config.model, config.num_gpus, config.lru_bytes) == ("s3://b/caches", "m", 1.0, 1000)
    assert (config.max_question_tokens, config.revalidate_s) == (300, 0.0)
    assert config.storage() == {"client_kwargs": {"endpoint_url": "http://s3:9000"}}
    with pytest.raises(ValueError, match="unknown query-service settings"):
        ServiceConfig.from_dict({"model": "m", "caches_root": "r", "lru": 1})
