"""Query-service benchmark: answering from a stored cache (cold from a loopback S3 server, warm from the LRU)
against prefilling the video again, at several video lengths; request latency percentiles under concurrency.

    results = run_benchmark(model, lengths=[16, 64, 256], concurrency=[1, 4, 16])

Time to first token (TTFT) counts everything before the first token: the cache load (cold), the LRU lookup
(warm; warm_revalidated adds the manifest HEAD that checks a kept cache for a re-prefill) or the whole prefill
(re-prefill). Decode tokens/s is (generated - 1) / (time after the first token). The concurrency rows are measured
with batching off and on (`batching=`) in the same run: tokens/s = answer tokens generated / wall time.
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

QUESTION = "What happens in the video?"


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def _decode_rate(generated: int, first_s: float, total_s: float) -> float:
    return (generated - 1) / (total_s - first_s) if generated > 1 and total_s > first_s else float("nan")


def _loopback_s3():
    """(server, StorageOptions, root) of a moto S3 server on 127.0.0.1 with a fresh bucket."""
    import logging

    import boto3
    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise

    from statekv.store import StorageOptions

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = StorageOptions(endpoint_url=endpoint, key="bench", secret="bench", region="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return server, options, f"s3://bench/serving-{uuid.uuid4().hex[:8]}"


def bench_lengths(engine, service_factory, root: str, options, lengths: list[int], height: int, width: int,
                  max_new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Per video length: TTFT and decode tokens/s for cold (S3), warm (LRU) and re-prefill."""
    from statekv.store import prefill_to_store
    from statekv.testing.videos import synthetic_frames

    rows = []
    for frames_n in lengths:
        frames = synthetic_frames(frames_n, height, width, seed=frames_n)
        vid = f"len{frames_n}"
        t0 = time.perf_counter()
        manifest = prefill_to_store(engine, frames, f"{root}/{vid}", fps=2.0, storage_options=options)
        store_s = time.perf_counter() - t0
        modes: dict[str, list[dict[str, float]]] = {"cold_s3": [], "warm_lru": [], "warm_revalidated": [],
                                                    "reprefill": []}
        for _ in range(repeats):
            service = service_factory()  # empty LRU: the first ask reads the cache from S3
            for mode in ("cold_s3", "warm_lru", "warm_revalidated"):
                # warm_revalidated: the kept cache's manifest is checked first (one HEAD), as after revalidate_s
                service.revalidate_s = 0.0 if mode == "warm_revalidated" else 3600.0
                r = service.ask(video_id=vid, question=QUESTION, max_new_tokens=max_new_tokens)
                t = r["timings"]
                modes[mode].append({"ttft_s": t["load_s"] + t["first_token_s"],
                                    "total_s": t["load_s"] + t["total_s"], "load_s": t["load_s"],
                                    "decode_tok_s": _decode_rate(r["tokens"]["generated"], t["first_token_s"],
                                                                 t["total_s"])})
            start = time.perf_counter()
            cache = engine.prefill(frames, fps=2.0)
            prefill_s = time.perf_counter() - start
            a = engine.ask(cache, QUESTION, max_new_tokens=max_new_tokens)
            modes["reprefill"].append({"ttft_s": prefill_s + a.first_token_s, "total_s": prefill_s + a.total_s,
                                       "load_s": prefill_s,
                                       "decode_tok_s": _decode_rate(len(a.token_ids), a.first_token_s, a.total_s)})
        row: dict[str, Any] = {"frames": frames_n, "chunks": manifest["totals"]["chunks"],
                               "video_tokens": manifest["totals"]["tokens"], "cache_bytes": manifest["totals"]["bytes"],
                               "prefill_and_store_s": store_s}
        for mode, samples in modes.items():
            row[mode] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        row["ttft_speedup_cold_vs_reprefill"] = row["reprefill"]["ttft_s"] / row["cold_s3"]["ttft_s"]
        row["ttft_speedup_warm_vs_reprefill"] = row["reprefill"]["ttft_s"] / row["warm_lru"]["ttft_s"]
        rows.append(row)
    return rows


def bench_concurrency(ask, video_ids: list[str], concurrency: list[int], requests: int,
                      max_new_tokens: int) -> list[dict[str, Any]]:
    """Client-side request latency percentiles and generated tokens/s of `ask(video_id, max_new_tokens) ->
    (status, generated tokens)` at each concurrency, warm caches."""
    for vid in video_ids:  # warm every replica's LRU path once
        ask(vid, max_new_tokens)
    rows = []
    for c in concurrency:
        def one(i: int) -> tuple[float, int, int]:
            start = time.perf_counter()
            status, generated = ask(video_ids[i % len(video_ids)], max_new_tokens)
            return time.perf_counter() - start, status, generated

        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
        latencies = [lat for lat, status, _ in results if status == 200]
        tokens = sum(n for _, status, n in results if status == 200)
        rows.append({"concurrency": c, "requests": requests, "ok": len(latencies),
                     "latency_s": _percentiles(latencies), "requests_per_s": requests / wall,
                     "tokens": tokens, "tokens_per_s": tokens / wall})
    return rows


def format_concurrency(rows_by_mode: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table: per concurrency, tokens/s and p50/p99 latency of each batching mode side by side."""
    modes = list(rows_by_mode)
    head = "| concurrency | " + " | ".join(f"{m}: tokens/s | {m}: p50 ms | {m}: p99 ms" for m in modes) + " |"
    lines = [head, "| ---: " * (1 + 3 * len(modes)) + "|"]
    for i, row in enumerate(rows_by_mode[modes[0]]):
        cells = [str(row["concurrency"])]
        for m in modes:
            r = rows_by_mode[m][i]
            cells += [f"{r['tokens_per_s']:.1f}", f"{1000 * r['latency_s']['p50']:.0f}",
                      f"{1000 * r['latency_s']['p99']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _serve_asker(config, port: int):
    """Start the deployment on a local Ray cluster; returns (ask function, shutdown)."""
    import httpx
    import ray
    from ray import serve

    from pipelines.serving.app import build_app

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="bench", route_prefix="/", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300.0,
                          limits=httpx.Limits(max_connections=64))
    deadline = time.monotonic() + 300
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark deployment did not become ready")
        time.sleep(0.2)

    def ask(vid: str, max_new_tokens: int) -> tuple[int, int]:
        r = client.post("/v1/ask", json={"video_id": vid, "question": QUESTION, "max_new_tokens": max_new_tokens})
        return r.status_code, r.json()["tokens"]["generated"] if r.status_code == 200 else 0

    def shutdown() -> None:
        client.close()
        serve.shutdown()
        ray.shutdown()

    return ask, shutdown


def run_benchmark(model: str, *, lengths: list[int], concurrency: list[int], requests: int = 48,
                  max_new_tokens: int = 16, repeats: int = 3, height: int = 112, width: int = 168,
                  transport: str = "serve", port: int | None = None,
                  batching: tuple[str, ...] = ("off", "on")) -> dict[str, Any]:
    """`batching`: the modes whose concurrency rows are measured in this run, one after the other ("off": the
    replica's scheduler answers one question at a time; "on": concurrent questions about a video are
    decoded together, pipelines/serving/batching.py)."""
    import socket

    import torch

    from pipelines.serving.config import ServiceConfig
    from pipelines.serving.service import QueryService
    from statekv import Engine
    from statekv.video import SamplingConfig

    sampling = SamplingConfig(min_pixels=28 * 28, max_pixels=height * width)
    engine = Engine.from_pretrained(model, device="cpu", sampling=sampling)
    server, options, root = _loopback_s3()
    try:
        storage = options.to_fsspec()

        def factory() -> QueryService:
            return QueryService(engine, root, storage_options=storage, lru_bytes=8 << 30,
                                max_new_tokens_limit=max(max_new_tokens, 64))

        length_rows = bench_lengths(engine, factory, root, options, lengths, height, width, max_new_tokens, repeats)
        videos = [f"len{n}" for n in lengths]
        conc_rows: dict[str, list[dict[str, Any]]] = {}
        for mode in batching:
            if mode not in ("off", "on"):
                raise ValueError(f"unknown batching mode {mode!r}; valid: off, on")
            if transport == "serve":
                mode_port = port
                if mode_port is None:
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", 0))
                        mode_port = sock.getsockname()[1]
                config = ServiceConfig(model=model, caches_root=root, endpoint_url=options.endpoint_url,
                                       region=options.region, storage_options={"key": "bench", "secret": "bench"},
                                       device="cpu", max_new_tokens_limit=max(max_new_tokens, 64),
                                       max_ongoing_requests=max(concurrency), num_cpus=1,
                                       batching=mode == "on", max_batch=max(concurrency))
                ask, shutdown = _serve_asker(config, mode_port)
                try:
                    conc_rows[mode] = bench_concurrency(ask, videos, concurrency, requests, max_new_tokens)
                finally:
                    shutdown()
            else:
                service = QueryService(engine, root, storage_options=storage, lru_bytes=8 << 30,
                                       max_new_tokens_limit=max(max_new_tokens, 64), batching=mode == "on",
                                       max_batch=max(concurrency))

                def ask(vid: str, n: int, service=service) -> tuple[int, int]:
                    r = service.ask(video_id=vid, question=QUESTION, max_new_tokens=n)
                    return 200, r["tokens"]["generated"]

                conc_rows[mode] = bench_concurrency(ask, videos, concurrency, requests, max_new_tokens)
    finally:
        server.stop()
    return {
        "benchmark": "serving", "model": model, "device": "cpu", "torch_threads": torch.get_num_threads(),
        "frame_size": [height, width], "max_new_tokens": max_new_tokens, "repeats": repeats,
        "question": QUESTION, "transport": transport, "by_length": length_rows, "by_concurrency": conc_rows,
        "concurrency_table": format_concurrency(conc_rows),
        "notes": "ttft = time before the first token, including the cache load (cold: from loopback S3; warm: "
                 "LRU lookup) or the whole prefill (reprefill); concurrency latencies are client-side over HTTP "
                 "(transport=serve) over all videos, warm LRU.",
    }
