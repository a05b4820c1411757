"""A mixed load against a running query service, every response checked: what many users do at once.

    report = run_mixed_load("http://127.0.0.1:8000", plan, requests=1000, concurrency=32)

Each request is one of these kinds, drawn at random with the plan's shares:

- "plain": a greedy answer (batched by the service with the others about the same video);
- "stream": the same answer as server-sent events, read to the end;
- "retrieval": a greedy answer from the chunks the plan's retrieval setting picks;
- "disconnect": a stream the client abandons after its first token (the service must stop and free it);
- "hostile": a question about a cache the service must refuse with a documented status and code;
- "listing": `GET /v1/videos`, which must list every good video (bad neighbours listed as invalid or not at all).

A greedy answer is right when its token ids are one of those the plan accepts for its video and kind (two while a
video is re-prefilled during the run: the old answer or the new one, never a mix). The report counts outcomes per
kind and lists every failure: a wrong answer, an unexpected status or code, any 5xx, a transport error, a stream
that does not end with its `done` event. `during` runs once, on its own thread, after a quarter of the requests
(e.g. a re-prefill of one video). Plain threads and httpx: no Ray, no test framework.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("plain", "stream", "retrieval", "disconnect", "hostile", "listing")


@dataclass
class LoadPlan:
    """What to ask and what to accept."""

    question: str
    max_new_tokens: int
    # video id -> kind ("plain" or "retrieval") -> the token-id sequences accepted as its greedy answer
    answers: dict[str, dict[str, list[list[int]]]]
    # video id -> (HTTP status, error code) the service must answer for it
    hostile: dict[str, tuple[int, str]] = field(default_factory=dict)
    retrieval: dict[str, Any] = field(default_factory=lambda: {"top_k": 2, "recent": 1})
    shares: dict[str, float] = field(default_factory=lambda: {"plain": 0.3, "stream": 0.25, "retrieval": 0.15,
                                                              "disconnect": 0.1, "hostile": 0.15, "listing": 0.05})


@dataclass
class Outcome:
    kind: str
    video: str
    ok: bool
    status: int | None
    seconds: float
    problem: str = ""


def run_mixed_load(base_url: str, plan: LoadPlan, *, requests: int, concurrency: int, seed: int = 0,
                   during: Callable[[], None] | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Send `requests` requests of mixed kinds, `concurrency` at a time; the report (see the module docstring)."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if plan.shares.get(k, 0) > 0 and (k != "hostile" or plan.hostile)]
    jobs = [(kind, rng.choice(sorted(plan.hostile if kind == "hostile" else plan.answers)))
            for kind in rng.choices(kinds, weights=[plan.shares[k] for k in kinds], k=requests)]
    done = Counter()
    started = threading.Event()
    side: dict[str, Any] = {}

    def run_during() -> None:
        started.wait()
        t0 = time.perf_counter()
        during()
        side["during_s"] = time.perf_counter() - t0

    helper = threading.Thread(target=run_during, daemon=True) if during else None
    if helper:
        helper.start()
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        def one(job: tuple[str, str]) -> Outcome:
            outcome = _request(client, plan, *job)
            with lock:
                done["n"] += 1
                if done["n"] >= requests // 4:
                    started.set()
            return outcome

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(one, jobs))
        wall = time.perf_counter() - t0
    started.set()
    if helper:
        helper.join()
    return _report(outcomes, wall, concurrency, side)


def _request(client: httpx.Client, plan: LoadPlan, kind: str, video: str) -> Outcome:
    body: dict[str, Any] = {"video_id": video, "question": plan.question, "max_new_tokens": plan.max_new_tokens}
    if kind == "retrieval":
        body["retrieval"] = plan.retrieval
    if kind in ("stream", "disconnect"):
        body["stream"] = True
    t0 = time.perf_counter()
    status = None
    try:
        if kind == "listing":
            r = client.get("/v1/videos", params={"limit": 1000})
            status = r.status_code
            problem = _check_listing(r, set(plan.answers))
        elif kind in ("stream", "disconnect"):
            with client.stream("POST", "/v1/ask", json=body) as r:
                status = r.status_code
                problem = _check_stream(r, plan, video, abandon=kind == "disconnect")
        else:
            r = client.post("/v1/ask", json=body)
            status = r.status_code
            problem = (_check_refusal(r, *plan.hostile[video]) if kind == "hostile"
                       else _check_answer(r, plan.answers[video]["retrieval" if kind == "retrieval" else "plain"]))
    except httpx.HTTPError as err:
        problem = f"transport: {type(err).__name__}: {err}"
    return Outcome(kind, video, not problem, status, time.perf_counter() - t0, problem)


def _check_answer(r: httpx.Response, accepted: list[list[int]]) -> str:
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    ids = r.json().get("token_ids")
    return "" if ids in accepted else f"wrong answer {ids}"


def _check_listing(r: httpx.Response, good: set[str]) -> str:
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    missing = good - {v["video_id"] for v in r.json()["videos"]}
    return f"listing misses {sorted(missing)}" if missing else ""


def _check_refusal(r: httpx.Response, status: int, code: str) -> str:
    try:
        got = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        got = None
    return "" if (r.status_code, got) == (status, code) else f"status {r.status_code} code {got!r}, not {status} {code!r}"


def _check_stream(r: httpx.Response, plan: LoadPlan, video: str, *, abandon: bool) -> str:
    if r.status_code != 200:
        r.read()
        return f"status {r.status_code}: {r.text[:200]}"
    tokens: list[int] = []
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        event = json.loads(line[len("data: "):])
        if event["type"] == "token":
            tokens.append(event["token_id"])
            if abandon:
                return ""  # leaving the `with` closes the connection: the client is gone
        elif event["type"] == "done":
            if abandon:
                return ""
            accepted = plan.answers[video]["plain"]
            if event.get("token_ids") not in accepted or tokens != event.get("token_ids"):
                return f"wrong streamed answer {tokens} / {event.get('token_ids')}"
            return ""
        else:
            return f"stream ended with {event}"
    return "stream ended without a done event"


def _report(outcomes: list[Outcome], wall: float, concurrency: int, side: dict[str, Any]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        if mine:
            seconds = sorted(o.seconds for o in mine)
            by_kind[kind] = {"requests": len(mine), "failed": sum(not o.ok for o in mine),
                             "p50_s": round(seconds[len(seconds) // 2], 4), "max_s": round(seconds[-1], 4)}
    failures = [{"kind": o.kind, "video": o.video, "status": o.status, "problem": o.problem}
                for o in outcomes if not o.ok]
    return {"requests": len(outcomes), "concurrency": concurrency, "wall_s": round(wall, 2),
            "failed": len(failures),  # every 5xx but a hostile cache's documented refusal is a failure
            "unexpected_5xx": sum(1 for o in outcomes if not o.ok and (o.status or 0) >= 500),
            "statuses": dict(Counter(str(o.status) for o in outcomes)), "kinds": by_kind,
            "failures": failures[:50], **side}
