"""Who may ask the query service, through real HTTP on loopback: the Serve deployment of `build_app` on the
session's local Ray cluster, with a key file (scopes, list rights, limits, rotation), plus the auth classes alone."""

from __future__ import annotations

import json
import logging
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipelines.serving.auth import AccessControl, Authenticator, check_bind, is_loopback
from pipelines.serving.config import ServiceConfig
from pipelines.serving.errors import Forbidden, TooManyRequests, Unauthorized
from pipelines.serving.keys import KeyFileError, KeyStore, add_key, load_key_file, remove_key
from pipelines.serving.limits import KeyLimiter, Limits
from statekv.store import load_cache, prefill_to_store
from statekv.testing.videos import synthetic_frames
from tests.pipelines.serving_http import free_port, wait_ready

# every question asked in this module carries this marker, so the log test can look for it
MARK = "q-7Hn2Xk"
QUESTION = f"{MARK} what happens in the video?"
TOKENS = 4
LONG_QUESTION = "What happens?"  # its greedy answer on a--clip2 runs for ~2000 tokens (checked in the test)
LONG = 20000  # max_new_tokens of answers held open (the tiny model's greedy answer runs for hundreds of tokens)


# --- the classes alone ------------------------------------------------------------------------------------------

def test_key_file_errors_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(KeyFileError, match=f"key file {path}: not found"):
        load_key_file(str(path))
    cases = {"{": "not JSON", '{"keys": {}}': 'must be a JSON object {"keys"',
             '{"keys": [{"id": "a", "hash": "hunter2", "roots": ["*"], "prefixes": [""]}]}': "keys.0.: key 'a': hash: not a known hash",
             '{"keys": [{"id": "a.b"}]}': "keys.0.: a key id must be",
             '{"keys": [{"id": "a", "hash": "%s", "roots": ["*"], "prefixes": ["x/"]}]}': "no '/'"}
    good = add_key(str(tmp_path / "other.json"), "a", prefixes=[""])
    hashed = load_key_file(str(tmp_path / "other.json"))["a"].hash
    assert good.startswith("a.") and good not in (tmp_path / "other.json").read_text()
    for text, reason in cases.items():
        path.write_text(text.replace("%s", hashed))
        with pytest.raises(KeyFileError) as err:
            load_key_file(str(path))
        assert str(err.value).startswith(f"key file {path}: ") and "\n" not in str(err.value)
        assert reason.replace(".", "") in str(err.value).replace("[", "").replace("]", "").replace(".", ""), err.value
    with pytest.raises(KeyFileError, match="exists already"):
        add_key(str(tmp_path / "other.json"), "a", prefixes=[""])


def test_key_store_reloads_on_change_and_keeps_the_last_good_set(tmp_path, caplog):
    """Rotation: a new key works and a removed one stops at the next check; a broken file keeps the last good set
    and logs one line (per broken version), never opening the service."""
    path = str(tmp_path / "keys.json")
    old = add_key(path, "old", prefixes=[""])
    now = [0.0]
    store = KeyStore(path, check_every_s=1.0, clock=lambda: now[0])
    auth = Authenticator(store)
    assert auth.authenticate([f"Bearer {old}"]).id == "old"
    new = add_key(path, "new", prefixes=[""])
    with pytest.raises(Unauthorized):
        auth.authenticate([f"Bearer {new}"])  # not checked again yet (at most every second)
    now[0] = 1.0
    assert auth.authenticate([f"Bearer {new}"]).id == "new" and auth.authenticate([f"Bearer {old}"]).id == "old"
    remove_key(path, "old")
    now[0] = 2.0
    with pytest.raises(Unauthorized):
        auth.authenticate([f"Bearer {old}"])
    Path(path).write_text("{ broken")
    with caplog.at_level(logging.ERROR, logger="pipelines.serving.keys"):
        for t in (3.0, 4.0, 5.0):
            now[0] = t
            assert auth.authenticate([f"Bearer {new}"]).id == "new"
    lines = [r.getMessage() for r in caplog.records  # errors only: an earlier test may have set INFO on "pipelines"
             if r.name == "pipelines.serving.keys" and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].startswith(f"key file {path}: not JSON") and "keeping" in lines[0]
    Path(path).unlink()
    now[0] = 6.0
    assert auth.authenticate([f"Bearer {new}"]).id == "new"


def test_each_distinct_secret_is_hashed_once(tmp_path):
    path = str(tmp_path / "keys.json")
    secret = add_key(path, "k", prefixes=[""])
    auth = Authenticator(KeyStore(path))
    for _ in range(5):
        assert auth.authenticate([f"Bearer {secret}"]).id == "k"
        with pytest.raises(Unauthorized):
            auth.authenticate([f"Bearer {secret[:-1]}x"])
        with pytest.raises(Unauthorized):
            auth.authenticate(["Bearer nobody.abc"])  # an unknown id costs a hash too (timing), once
    assert auth.slow_checks == 3
    with pytest.raises(Unauthorized) as err:
        auth.authenticate([])
    assert err.value.headers["WWW-Authenticate"] == 'Bearer realm="statekv"'


def test_access_control_rules(tmp_path):
    path = str(tmp_path / "keys.json")
    secret = add_key(path, "k", prefixes=["a--"], roots=[str(tmp_path / "r1")])
    access = AccessControl(str(tmp_path / "r1"), keys=KeyStore(path), defaults=Limits(request_burst=1))
    entry = access.authenticate([f"Bearer {secret}"], "192.0.2.9")
    with pytest.raises(Forbidden, match="may not list"):
        access.authorize(entry, listing=True)
    caller = access.authorize(entry)
    assert caller.scope.allows("a--x") and not caller.scope.allows("b--x")
    with pytest.raises(TooManyRequests):
        access.authorize(entry)
    other = AccessControl(str(tmp_path / "r2"), keys=KeyStore(path))
    with pytest.raises(Forbidden, match="may not read this service's cache root"):
        other.authorize(other.authenticate([f"Bearer {secret}"], None))
    closed = AccessControl(str(tmp_path / "r1"))
    assert closed.authenticate([], "127.0.0.1") is None and closed.authenticate([], "::1") is None
    for host in ("192.0.2.9", None, "testclient", "::ffff:10.0.0.1"):
        with pytest.raises(Forbidden) as err:
            closed.authenticate([], host)
        assert err.value.code == "loopback_only"
    assert AccessControl("/r", no_auth=True).authenticate([], "192.0.2.9") is None
    assert is_loopback("127.0.0.2") and not is_loopback("0.0.0.0")


def test_check_bind():
    check_bind("127.0.0.1", keys_configured=False, no_auth=False)
    check_bind("0.0.0.0", keys_configured=True, no_auth=False)
    check_bind("0.0.0.0", keys_configured=False, no_auth=True)
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without API keys"):
        check_bind("0.0.0.0", keys_configured=False, no_auth=False)


def test_limiter_buckets():
    now = [0.0]
    limiter = KeyLimiter(clock=lambda: now[0])
    limits = Limits(requests_per_s=1, request_burst=2, tokens_per_s=10, token_burst=20, max_concurrent=1)
    a = limiter.admit("k", limits)
    with pytest.raises(TooManyRequests, match="in flight"):
        limiter.admit("k", limits)
    a.release(tokens=25)  # into debt: 20 - 25 = -5 tokens
    with pytest.raises(TooManyRequests, match="generated-token rate") as err:
        limiter.admit("k", limits)
    assert err.value.headers["Retry-After"] == "1"
    now[0] = 0.6  # +6 tokens, +0.6 requests
    limiter.admit("k", limits).release()
    with pytest.raises(TooManyRequests, match="request rate") as err:
        limiter.admit("k", limits)
    assert int(err.value.headers["Retry-After"]) >= 1
    limiter.admit("other", limits).release()  # another key is not affected


# --- the deployment over HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory, engine):
    """Two local roots: root1 with a--clip1, a--clip2, b--clip1; root2 with other."""
    base = tmp_path_factory.mktemp("auth")
    root1, root2 = str(base / "root1"), str(base / "root2")
    for i, vid in enumerate(["a--clip1", "a--clip2", "b--clip1"]):
        prefill_to_store(engine, synthetic_frames(4, 56, 84, seed=i), f"{root1}/{vid}", fps=2.0)
    prefill_to_store(engine, synthetic_frames(4, 56, 84, seed=9), f"{root2}/other", fps=2.0)
    return base, root1, root2


FAST = {"requests_per_s": 1000, "request_burst": 1000}  # keys whose tests send many requests


@pytest.fixture(scope="module")
def keys(roots):
    """(key file, {key id: secret})."""
    base, root1, _ = roots
    path = str(base / "keys.json")
    secrets = {
        "team-a": add_key(path, "team-a", prefixes=["a--"], can_list=True, limits=FAST),
        "team-b": add_key(path, "team-b", prefixes=["b--"]),  # no list rights
        "root2-only": add_key(path, "root2-only", prefixes=[""], roots=[str(roots[2])], can_list=True),
        "calm": add_key(path, "calm", prefixes=[""], can_list=True, limits=FAST),
        "bursty": add_key(path, "bursty", prefixes=[""], limits={"requests_per_s": 0.5, "request_burst": 3,
                                                                 "max_concurrent": 2}),
        "narrow": add_key(path, "narrow", prefixes=[""], limits={"max_concurrent": 1, "request_burst": 50,
                                                                 "requests_per_s": 50}),
        "wordy": add_key(path, "wordy", prefixes=[""], limits={"tokens_per_s": 0.5, "token_burst": TOKENS}),
        "rotating": add_key(path, "rotating", prefixes=[""]),
    }
    return path, secrets


@pytest.fixture(scope="module")
def s3_root(s3_server, engine):
    """A root on the loopback S3 server with a--clip1 and b--clip1 (a store where a lookup costs a request)."""
    import uuid

    _, options = s3_server
    root = f"s3://caches/auth-{uuid.uuid4().hex[:8]}"
    for i, vid in enumerate(["a--clip1", "b--clip1"]):
        prefill_to_store(engine, synthetic_frames(4, 56, 84, seed=i), f"{root}/{vid}", fps=2.0,
                         storage_options=options)
    return root


@pytest.fixture(scope="module")
def served(ray_cluster, roots, keys, tiny_checkpoints, s3_server, s3_root):
    """(httpx client, key secrets): the service with keys at / (local root) and at /s3 (a root on the loopback S3
    server), and the service without keys (loopback only) at /nokeys."""
    from ray import serve

    from pipelines.serving.app import build_app

    _, root1, _ = roots
    path, secrets = keys
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = dict(model=tiny_checkpoints["qwen2_vl"], caches_root=root1, device="cpu", lru_bytes=64 << 20,
                    max_new_tokens_limit=LONG, num_cpus=0.5, max_ongoing_requests=64)
    serve.run(build_app(ServiceConfig(**settings, api_keys_file=path)), name="auth", route_prefix="/",
              blocking=False)
    serve.run(build_app(ServiceConfig(**settings)), name="nokeys", route_prefix="/nokeys", blocking=False)
    endpoint, _ = s3_server
    s3 = {**settings, "caches_root": s3_root, "endpoint_url": endpoint, "region": "us-east-1",
          "storage_options": {"key": "testing", "secret": "testing"}}
    serve.run(build_app(ServiceConfig(**s3, api_keys_file=path)), name="auth-s3", route_prefix="/s3", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0)
    wait_ready(client, "/healthz")
    wait_ready(client, "/nokeys/healthz")
    wait_ready(client, "/s3/healthz")
    yield client, secrets
    client.close()
    serve.shutdown()


def _h(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _ask(client, secret: str | None, video_id: str, max_new_tokens: int = TOKENS, *, prefix: str = "", **extra):
    return client.post(f"{prefix}/v1/ask", json={"video_id": video_id, "question": QUESTION, "max_new_tokens": max_new_tokens,
                                        **extra}, headers=_h(secret) if secret else {})


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and "Traceback" not in r.text
    return r.json()["error"]


def test_every_caller_gets_its_documented_status(served):
    client, s = served
    r = _ask(client, None, "a--clip1")
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == 'Bearer realm="statekv"'
    r = _ask(client, "team-a.wrongwrongwrong", "a--clip1")
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == 'Bearer realm="statekv", error="invalid_token"'
    for path in ("/v1/videos", "/v1/videos/a--clip1"):
        _error(client.get(path), 401, "unauthorized")
    assert _ask(client, s["team-a"], "a--clip1").status_code == 200
    assert client.get("/v1/videos/a--clip1", headers=_h(s["team-a"])).json()["video_id"] == "a--clip1"
    _error(_ask(client, s["root2-only"], "a--clip1"), 403, "forbidden")  # a key for another root
    _error(client.get("/v1/videos", headers=_h(s["root2-only"])), 403, "forbidden")
    _error(client.get("/v1/videos", headers=_h(s["team-b"])), 403, "forbidden")  # no list rights
    assert _ask(client, s["team-b"], "b--clip1").status_code == 200  # but it reads its videos
    page = client.get("/v1/videos", headers=_h(s["team-a"])).json()  # a scoped listing
    assert [v["video_id"] for v in page["videos"]] == ["a--clip1", "a--clip2"] and page["total"] == 2
    assert [v["video_id"] for v in client.get("/v1/videos", headers=_h(s["calm"])).json()["videos"]] == [
        "a--clip1", "a--clip2", "b--clip1"]
    health = client.get("/healthz")  # open, and says nothing about the corpus
    assert health.status_code == 200 and health.json()["caches_root"] is None
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["apiKey"][
            "description"]}
    assert {"401", "403", "429"} <= set(schema["paths"]["/v1/ask"]["post"]["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]
    # the service without keys answers loopback clients (this one) with no key at all
    assert client.post("/nokeys/v1/ask", json={"video_id": "a--clip1", "question": QUESTION,
                                               "max_new_tokens": TOKENS}).status_code == 200


@pytest.mark.parametrize("prefix", ["", "/s3"], ids=["local", "s3"])
def test_out_of_scope_is_indistinguishable_from_missing(served, prefix):
    """team-a asking about b--clip1 (exists, outside its prefixes) gets what it gets for b--clip9 / a--clip9 (no such
    cache): status, body (up to the id itself), headers, and time within noise; on a local root and on S3, where
    each store lookup is a request."""
    client, s = served
    key = s["team-a"]
    ids = {"outside": "b--clip1", "missing_outside": "b--clip9", "missing_inside": "a--clip9"}
    times: dict[str, list[float]] = {k: [] for k in ids}
    bodies: dict[str, set[str]] = {k: set() for k in ids}
    for _ in range(2):  # warm
        for vid in ids.values():
            _ask(client, key, vid, prefix=prefix)
    for i in range(25):
        for kind, vid in sorted(ids.items(), key=lambda kv: (hash((i, kv[0])))):  # interleaved, varied order
            for request in (lambda: _ask(client, key, vid, prefix=prefix),
                            lambda: client.get(f"{prefix}/v1/videos/{vid}", headers=_h(key))):
                start = time.perf_counter()
                r = request()
                times[kind].append(time.perf_counter() - start)
                assert r.status_code == 404
                headers = {k: v for k, v in r.headers.items() if k not in ("date", "x-request-id")}
                bodies[kind].add(r.text.replace(vid, "<id>") + json.dumps(sorted(headers.items())))
    assert bodies["outside"] == bodies["missing_outside"] == bodies["missing_inside"]
    assert len(bodies["outside"]) == 1  # ask and describe answer alike
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian latency of a 404 ({prefix or 'local'}), ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in medians.items()))
    base = statistics.median(times["missing_inside"] + times["missing_outside"])
    assert abs(medians["outside"] - base) < max(0.3 * base, 0.003), medians


def test_burst_over_the_limit_gets_429_and_other_keys_keep_their_latency(served):
    """bursty (3 at once, then 0.5/s, 2 in flight) fires 40 requests at once while calm asks one at a time; calm's
    latency during the burst is compared with its latency alone, in the same run."""
    client, s = served

    def calm_run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            r = _ask(client, s["calm"], "a--clip2")
            out.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
        return out

    calm_run(3)  # warm: the cache is loaded
    alone = calm_run(20)
    with ThreadPoolExecutor(41) as pool:
        calm = pool.submit(calm_run, 20)
        burst = list(pool.map(lambda _: _ask(client, s["bursty"], "a--clip1"), range(40)))
        during = calm.result()
    codes = [r.status_code for r in burst]
    assert set(codes) <= {200, 429} and 1 <= codes.count(200) <= 4 and codes.count(429) >= 36, codes
    for r in burst:
        if r.status_code == 429:
            _error(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) >= 1
    p50_alone, p50_during = statistics.median(alone), statistics.median(during)
    p90_alone, p90_during = sorted(alone)[17], sorted(during)[17]
    print(f"\ncalm key latency, ms: alone p50 {p50_alone * 1e3:.1f} p90 {p90_alone * 1e3:.1f}; during bursty's "
          f"40-request burst p50 {p50_during * 1e3:.1f} p90 {p90_during * 1e3:.1f}; bursty: {codes.count(200)} x 200, "
          f"{codes.count(429)} x 429")
    assert p50_during < 1.5 * p50_alone + 0.05, (alone, during)


def test_concurrency_cap_holds_streams_and_token_budget(served, roots, engine):
    client, s = served
    _, root1, _ = roots
    natural = len(engine.ask(load_cache(f"{root1}/a--clip2"), LONG_QUESTION, max_new_tokens=LONG).token_ids)
    assert natural > 1000  # the stream below outlasts the requests made while it runs
    with client.stream("POST", "/v1/ask", headers=_h(s["narrow"]),
                       json={"video_id": "a--clip2", "question": LONG_QUESTION, "max_new_tokens": LONG,
                             "stream": True}) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()  # kept: a dropped iterator closes the response (the client would leave)
        next(chunks)  # the first token is out: the stream holds the key's one slot
        err = _error(_ask(client, s["narrow"], "a--clip1"), 429, "rate_limited")
        assert "in flight" in err["message"]
        assert _ask(client, s["calm"], "a--clip1").status_code == 200  # another key is not held up
    deadline = time.monotonic() + 30  # the client left: the stream ends and frees the slot
    while (r := _ask(client, s["narrow"], "a--clip1")).status_code == 429:
        assert time.monotonic() < deadline, r.text
        threading.Event().wait(0.1)
    assert r.status_code == 200
    # generated tokens: TOKENS at once, then 0.5 per second
    assert _ask(client, s["wordy"], "a--clip1").json()["tokens"]["generated"] == TOKENS
    err = _error(_ask(client, s["wordy"], "a--clip1"), 429, "rate_limited")
    assert "generated-token" in err["message"]


def test_rotation_and_revocation_without_restart(served, keys):
    client, s = served
    path, _ = keys
    new = add_key(path, "rotating-2", prefixes=[""])
    deadline = time.monotonic() + 10
    while _ask(client, new, "a--clip1").status_code != 200:  # the new key works within seconds
        assert time.monotonic() < deadline
        threading.Event().wait(0.2)
    assert _ask(client, s["rotating"], "a--clip1").status_code == 200  # both valid during the rotation
    remove_key(path, "rotating")
    start = time.monotonic()
    while (r := _ask(client, s["rotating"], "a--clip1")).status_code == 200:
        assert time.monotonic() - start < 5, "a revoked key still works after 5 s"
        threading.Event().wait(0.1)
    _error(r, 401, "unauthorized")
    assert _ask(client, new, "a--clip1").status_code == 200
    original = Path(path).read_text()
    Path(path).write_text('{"keys": "broken"')  # a broken file keeps the last good set
    try:
        threading.Event().wait(2.5)
        assert _ask(client, new, "a--clip1").status_code == 200
        _error(_ask(client, s["rotating"], "a--clip1"), 401, "unauthorized")
        _error(_ask(client, None, "a--clip1"), 401, "unauthorized")
    finally:
        Path(path).write_text(original)


FUZZ_SEED = 23


def _raw_get(port: int, path: str, headers: list[bytes]) -> int | str:
    """GET `path` on a raw socket with these Authorization values as sent (no client-side checks); the status, or
    "closed" if the server closed the connection without a response."""
    import socket

    head = b"".join(b"Authorization: " + v + b"\r\n" for v in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + head +
                     b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return "closed"
    status = int(data.split(b" ", 2)[1])
    if status == 401:
        assert b'"code":"unauthorized"' in data and b"www-authenticate: Bearer" in data.lower().replace(
            b"www-authenticate: bearer", b"www-authenticate: Bearer")
    return status


def test_fuzzed_authorization_headers_never_give_500(served):
    client, s = served
    port = client.base_url.port
    rng = random.Random(FUZZ_SEED)
    valid = s["calm"].encode()
    cases: list[list[bytes]] = [
        [b"Basic dGVzdDp0ZXN0"], [b"Bearer"], [b"Bearer "], [b"Token " + valid], [b"Bearer a.b.c"], [b"Bearer calm."],
        [b"Bearer .x"], [b"Bearer " + valid + b"x"], [b"Bearer  " + valid[:-1]], [b"Bearer\t" + valid[:-1]],
        ["Bearer calm.\u00e9\u00e8".encode("latin-1")], ["Bearer \u20ac\u4e2d\u6587".encode("utf-8")],
        [b"Bearer " + b"\xff" * 64], [b"Bearer " + b"a" * 300], [b"Bearer calm." + b"a" * 5000],
        [b"Bearer " + valid] * 2, [b"Bearer x"] * 100, [b""], [b"Bearer " + valid[:-1] + b"\x00"],
    ]
    for _ in range(120):
        n = rng.choice([1, 1, 1, 2, 30])
        cases.append([bytes(rng.choice(range(32, 256)) for _ in range(rng.choice([1, 8, 64, 600]))) for _ in range(n)])
    statuses = [_raw_get(port, "/v1/videos/a--clip1", headers) for headers in cases]
    statuses.append(_raw_get(port, "/v1/videos/a--clip1", [b"Bearer " + b"a" * 200_000]))  # past the server's limit
    assert set(statuses) <= {400, 401, 431, "closed"}, statuses  # never a 500, never in
    for headers, status in zip(cases, statuses):  # the HTTP parser may refuse other bytes (400): the app sees these
        if all(32 <= b < 127 or b == 9 for v in headers for b in v) and sum(map(len, headers)) < 10_000:
            assert status == 401, (headers[0][:80], status)
    print("\nfuzzed Authorization headers: " + ", ".join(f"{statuses.count(k)} x {k}" for k in sorted(
        set(statuses), key=str)))
    assert _raw_get(port, "/v1/videos/a--clip1", [b"bearer " + valid]) == 200  # the scheme is caseless


def test_statekv_ask_against_the_service_takes_the_key_from_the_environment(served, monkeypatch, capsys):
    """`statekv ask --service URL VIDEO_ID QUESTION`: the key from $STATEKV_API_KEY, the service's answer printed
    as `ask` prints a local one; the service's refusals are one line (exit 1)."""
    from jobs.cli import main as cli_main

    client, s = served
    url = str(client.base_url)
    want = _ask(client, s["team-a"], "a--clip1").json()
    argv = ["ask", "--service", url, "a--clip1", QUESTION, "--max-new-tokens", str(TOKENS)]
    monkeypatch.delenv("STATEKV_API_KEY", raising=False)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("statekv ask: error: the service refused the question: 401 unauthorized: ")
    assert "set STATEKV_API_KEY" in err and "\n" not in err
    monkeypatch.setenv("STATEKV_API_KEY", s["team-a"])
    assert cli_main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want["token_ids"] and got["video_id"] == "a--clip1"
    assert cli_main(argv) == 0 and capsys.readouterr().out == want["answer"] + "\n"
    assert cli_main([*argv, "--stream"]) == 0 and capsys.readouterr().out == want["answer"] + "\n"
    assert cli_main(["ask", "--service", url, "b--clip1", QUESTION]) == 1  # outside team-a's prefixes
    assert "404 not_found: no committed cache for video 'b--clip1'" in capsys.readouterr().err


def test_audit_lines_and_no_secret_or_question_in_the_logs(served, keys):
    """Last in this module: every log the cluster wrote during the run (replicas, proxy, controller, this
    process) holds no secret and no question text; the audit lines are there, one per request, with their fields."""
    import ray

    client, s = served
    _ask(client, s["team-a"], "a--clip1")  # audit lines to find
    client.get("/v1/videos", headers=_h(s["team-b"]))  # 403
    client.get("/v1/videos")  # 401
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 30
    audit = []
    while not any(a.get("key_id") == "team-a" and a.get("status") == 200 for a in audit):
        assert time.monotonic() < deadline, "no audit line of team-a in the Ray logs"
        threading.Event().wait(0.5)
        audit = [json.loads(line) for f in logs.rglob("*") if f.is_file()
                 for line in f.read_text(errors="replace").splitlines() if line.startswith('{"event": "request"')]
    line = next(a for a in audit if a["key_id"] == "team-a" and a["path"] == "/v1/ask" and a["status"] == 200)
    assert set(line) == {"event", "method", "path", "key_id", "video_id", "tokens", "status", "latency_s"}
    assert line["video_id"] == "a--clip1" and line["tokens"] == TOKENS and line["latency_s"] > 0
    assert any(a["status"] == 401 and a["key_id"] is None for a in audit)
    assert any(a["status"] == 403 and a["key_id"] == "team-b" and a["path"] == "/v1/videos" for a in audit)
    text = "\n".join(f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file())
    secret_parts = [secret.split(".", 1)[1] for secret in s.values()]
    assert MARK in QUESTION and not any(p in text for p in secret_parts) and MARK not in text
    assert LONG_QUESTION not in text
