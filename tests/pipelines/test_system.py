"""The query service as users run it: Ray Serve on loopback, a store with good caches and hostile neighbours side
by side, mixed plain / streaming / retrieval / batched requests at concurrency 16 with clients that disconnect,
listings, and a re-prefill of one video during the run (pipelines/serving/loadtest.py drives and checks it).

Asserted: 0 wrong answers, no 5xx but the documented refusal of a corrupt cache, every request answered or refused
with its documented code, good caches unaffected by bad ones, `in_flight` back to 0, the replica's memory bounded.
Scale it with STATEKV_SYSTEM_REQUESTS / STATEKV_SYSTEM_CONCURRENCY (the note's 1000 x 32 run);
STATEKV_SYSTEM_REPORT=path writes the report as JSON.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from pipelines.serving.config import ServiceConfig
from pipelines.serving.loadtest import LoadPlan, run_mixed_load
from statekv.retrieval import TopK
from statekv.store import load_cache, prefill_to_store
from statekv.store import manifest as manifest_schema
from statekv.testing.videos import synthetic_frames
from tests.pipelines.serving_http import free_port

pytestmark = pytest.mark.slow

QUESTION = "What happens?"
TOKENS = 6
REQUESTS = int(os.environ.get("STATEKV_SYSTEM_REQUESTS", "240"))
CONCURRENCY = int(os.environ.get("STATEKV_SYSTEM_CONCURRENCY", "16"))


def _reseal(path, edit) -> None:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_bytes(manifest_schema.encode(manifest_schema.seal(manifest)))


@pytest.fixture(scope="module")
def store(tmp_path_factory, engine, make_engine, tiny_checkpoints):
    """(root, plan, re-prefill): good caches clip_a, clip_b, live (re-prefilled during the run) and hostile
    neighbours: another model's cache, a cache with an unusable family cursor, one with a truncated chunk file,
    a manifest that is a folder, and a video id with no cache at all."""
    base = tmp_path_factory.mktemp("system")
    root = base / "caches"
    frames = {"clip_a": synthetic_frames(8, 56, 84, seed=0), "clip_b": synthetic_frames(8, 56, 84, seed=1),
              "live": synthetic_frames(8, 56, 84, seed=2)}
    newer = synthetic_frames(8, 56, 84, seed=3)  # what `live` is re-prefilled with during the run
    for vid, f in frames.items():
        prefill_to_store(engine, f, f"{root}/{vid}", fps=2.0)
    for vid in ("bad_cursor", "truncated"):
        prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=4), f"{root}/{vid}", fps=2.0)
    prefill_to_store(make_engine(tiny_checkpoints["qwen2_5_vl"]), synthetic_frames(8, 56, 84, seed=5),
                     f"{root}/other_model", fps=2.0)
    _reseal(root / "bad_cursor" / "manifest.json", lambda m: m["family"].update(cursor={}))
    chunk_file = next(p for p in (root / "truncated").rglob("*.parquet") if "chunks" in p.name)
    chunk_file.write_bytes(chunk_file.read_bytes()[: chunk_file.stat().st_size // 2])
    (root / "folder_manifest" / "manifest.json").mkdir(parents=True)

    retrieval = TopK(k=2, recent=1)
    answers: dict[str, dict[str, list[list[int]]]] = {}
    for vid in frames:
        cache = load_cache(f"{root}/{vid}")
        answers[vid] = {"plain": [engine.ask(cache, QUESTION, max_new_tokens=TOKENS).token_ids],
                        "retrieval": [engine.ask(cache, QUESTION, max_new_tokens=TOKENS,
                                                 retrieval=retrieval).token_ids]}
    scratch = f"{base}/scratch/live"  # the answers `live` gives once re-prefilled (prefill is deterministic)
    prefill_to_store(engine, newer, scratch, fps=2.0)
    cache = load_cache(scratch)
    answers["live"]["plain"].append(engine.ask(cache, QUESTION, max_new_tokens=TOKENS).token_ids)
    answers["live"]["retrieval"].append(engine.ask(cache, QUESTION, max_new_tokens=TOKENS,
                                                   retrieval=retrieval).token_ids)
    plan = LoadPlan(question=QUESTION, max_new_tokens=TOKENS, answers=answers,
                    hostile={"other_model": (409, "model_mismatch"), "bad_cursor": (500, "cache_corrupt"),
                             "truncated": (500, "cache_corrupt"), "never_indexed": (404, "not_found")},
                    retrieval={"top_k": 2, "recent": 1})

    def reprefill() -> None:
        prefill_to_store(engine, newer, f"{root}/live", fps=2.0, mode="overwrite")

    return str(root), plan, reprefill


@pytest.fixture(scope="module")
def served(ray_cluster, store, tiny_checkpoints):
    from ray import serve

    from pipelines.serving.app import build_app

    root, _, _ = store
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig(model=tiny_checkpoints["qwen2_vl"], caches_root=root, device="cpu", lru_bytes=64 << 20,
                           max_new_tokens_limit=64, max_ongoing_requests=max(64, 2 * CONCURRENCY), num_cpus=0.5,
                           revalidate_s=1.0)
    serve.run(build_app(config), name="system", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the service did not become ready")
        threading.Event().wait(0.2)
    yield url, serve.get_app_handle("system")
    serve.delete("system")


def _replica_rss_mb() -> float:
    """Resident memory of the app's replica process (Linux /proc; Ray names the process after the replica)."""
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"ServeReplica:system" not in (proc / "cmdline").read_bytes():
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
    raise LookupError("no replica process of the system app")


def test_mixed_load_with_hostile_neighbours_and_a_reprefill(served, store):
    url, handle = served
    _, plan, reprefill = store
    warm = run_mixed_load(url, plan, requests=40, concurrency=8, seed=1)  # every cache loaded once
    assert warm["failed"] == 0, warm["failures"]
    rss_before = _replica_rss_mb()
    report = run_mixed_load(url, plan, requests=REQUESTS, concurrency=CONCURRENCY, seed=0, during=reprefill)
    if os.environ.get("STATEKV_SYSTEM_REPORT"):
        with open(os.environ["STATEKV_SYSTEM_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert report["failed"] == 0 and report["unexpected_5xx"] == 0, json.dumps(report["failures"][:10], indent=1)
    assert {"plain", "stream", "retrieval", "disconnect", "hostile", "listing"} <= set(report["kinds"])
    deadline = time.monotonic() + 30
    while (counters := handle.stats.remote().result()["counters"])["in_flight"] != 0:
        assert time.monotonic() < deadline, f"in_flight stays at {counters['in_flight']}"
        threading.Event().wait(0.1)
    # the re-prefilled video now answers with its new content only
    threading.Event().wait(1.5)  # > revalidate_s
    r = httpx.post(f"{url}/v1/ask", json={"video_id": "live", "question": QUESTION, "max_new_tokens": TOKENS},
                   timeout=60)
    assert r.status_code == 200 and r.json()["token_ids"] == plan.answers["live"]["plain"][1]
    listing = httpx.get(f"{url}/v1/videos", params={"limit": 1000}, timeout=60).json()
    assert {"clip_a", "clip_b", "live"} <= {v["video_id"] for v in listing["videos"]}
    assert _replica_rss_mb() - rss_before < 400, "the replica's memory grew with the requests"
