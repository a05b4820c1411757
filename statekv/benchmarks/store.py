"""Cache store benchmark: write/read throughput (local disk, loopback S3), bytes per chunk native vs int8, the
effect of int8 K/V on answers, and load-and-answer vs prefill-again-and-answer time. Returns a JSON-able dict."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from statekv.cache import VideoKVCache

logger = logging.getLogger(__name__)

QUESTIONS = ["What happens after the dog enters?", "Is there a cat?", "What colour is the car?",
             "How many people are there?", "Where does the video take place?", "What is on the table?"]


@contextmanager
def loopback_s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 with a bucket "bench"; yields storage options for it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    try:
        yield {"endpoint_url": endpoint, "key": "x", "secret": "x", "region": "us-east-1"}
    finally:
        server.stop()


def _distances(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """(KL(p || q), total variation) of the next-token distributions of two logit vectors."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum())
    tv = float(0.5 * (lp.exp() - lq.exp()).abs().sum())
    return kl, tv


def _bytes_by_kind(manifest: dict[str, Any]) -> dict[str, int]:
    """Stored bytes per file kind (prefix / chunks / state): where int8 saves and where it cannot."""
    out: dict[str, int] = {}
    for f in manifest["files"]:
        out[f["kind"]] = out.get(f["kind"], 0) + f["bytes"]
    return out


def _mb(n: int) -> float:
    return n / 1e6


def run(checkpoint: str | None = None, *, num_chunks: int = 200, frame_hw: tuple[int, int] = (56, 84),
        large_chunks: int = 24, s3: bool = True, max_new_tokens: int = 8, workdir: str | None = None,
        ) -> dict[str, Any]:
    """Run every measurement; `checkpoint` None builds the tiny random Qwen2-VL (no download)."""
    from statekv import Engine, StateKV
    from statekv.store import load_cache, prefill_to_store
    from statekv.testing.videos import synthetic_frames
    from statekv.video import SamplingConfig

    work = workdir or tempfile.mkdtemp(prefix="bench_store_")
    if checkpoint is None:
        from statekv.testing.checkpoints import save_tiny_checkpoint

        checkpoint = str(save_tiny_checkpoint(f"{work}/tiny", "qwen2_vl"))
    h, w = frame_hw
    engine = Engine.from_pretrained(checkpoint, policy=StateKV(capacity=256), device="cpu", dtype=torch.float32,
                                    sampling=SamplingConfig(min_pixels=28 * 28, max_pixels=h * w))
    frames = synthetic_frames(2 * num_chunks, h, w, seed=0)
    result: dict[str, Any] = {"checkpoint": checkpoint, "num_chunks": num_chunks, "frame_hw": [h, w]}

    # baseline: prefill in memory (and answer)
    t0 = time.perf_counter()
    cache = engine.prefill(frames, fps=2.0)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.ask(cache, QUESTIONS[0], max_new_tokens=max_new_tokens)
    answer_s = time.perf_counter() - t0
    result["prefill_s"] = prefill_s

    roots = {"local": (f"{work}/caches", None)}
    s3_ctx = loopback_s3() if s3 else None
    try:
        if s3_ctx is not None:
            opts = s3_ctx.__enter__()
            roots["s3_loopback"] = (f"s3://bench/{uuid.uuid4().hex}", opts)
        result["throughput"] = {}
        for name, (root, opts) in roots.items():
            row: dict[str, Any] = {}
            for storage in ("native", "int8"):
                uri = f"{root}/video-{storage}"
                m, write_s, read_s = _timed_round_trip(cache, uri, storage == "int8", opts)
                n = m["totals"]["bytes"]
                row[storage] = {"bytes": n, "bytes_per_chunk": n / num_chunks, "write_s": write_s,
                                "read_s": read_s, "write_MBps": _mb(n) / write_s, "read_MBps": _mb(n) / read_s,
                                "bytes_by_kind": _bytes_by_kind(m)}
                t0 = time.perf_counter()
                part = load_cache(uri, chunks=range(10), storage_options=opts)
                list(part.chunks)
                row[storage]["read_10_chunks_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            prefill_to_store(engine, frames, f"{root}/video-streamed", storage_options=opts, fps=2.0)
            row["prefill_to_store_s"] = time.perf_counter() - t0
            result["throughput"][name] = row

        # headline: load the stored cache and answer vs prefill again and answer (local disk)
        root, opts = roots["local"]
        t0 = time.perf_counter()
        stored = load_cache(f"{root}/video-native", lazy=False, storage_options=opts)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.ask(stored, QUESTIONS[0], max_new_tokens=max_new_tokens)
        stored_answer_s = time.perf_counter() - t0
        result["load_vs_prefill"] = {
            "load_s": load_s, "answer_from_loaded_s": stored_answer_s, "prefill_s": prefill_s,
            "answer_after_prefill_s": answer_s,
            "speedup": (prefill_s + answer_s) / (load_s + stored_answer_s),
        }

        # int8 effect on answers
        q8 = load_cache(f"{root}/video-int8", lazy=False, storage_options=opts)
        kls, tvs, agree, first_same = [], [], [], []
        for q in QUESTIONS:
            a = engine.ask(stored, q, max_new_tokens=max_new_tokens, output_scores=True)
            b = engine.ask(q8, q, max_new_tokens=max_new_tokens, output_scores=True)
            kl, tv = _distances(a.scores[0], b.scores[0])
            kls.append(kl)
            tvs.append(tv)
            same = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
            agree.append(same / max(len(a.token_ids), 1))
            first_same.append(a.token_ids == b.token_ids)
        result["int8_effect"] = {
            "questions": len(QUESTIONS), "first_token_kl_mean": sum(kls) / len(kls), "first_token_kl_max": max(kls),
            "first_token_tv_mean": sum(tvs) / len(tvs), "greedy_token_agreement": sum(agree) / len(agree),
            "identical_answers": sum(first_same),
        }

        # a 7B-like layout (28 layers, 4 KV heads, head dim 128, 64 tokens/chunk, bf16) for realistic MB/s
        if large_chunks > 0:
            from statekv.cache import ChunkKV, ModelInfo, PrefillConfig, VideoInfo, VideoKVCache
            from statekv.policies import LayerState

            L, H, D, N = 28, 4, 128, 64
            g = torch.Generator().manual_seed(0)
            r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
            fr = list(range(2 * large_chunks))
            video = VideoInfo("<frames>", 2.0, len(fr), 2.0, (224, 448), fr, [i / 2 for i in fr])
            shared_k = [r(H, N, D) for _ in range(L)]  # reuse tensors: the store does not care
            chunks = [ChunkKV(i, (2 * i, 2 * i + 2), fr[2 * i:2 * i + 2], video.timestamps[2 * i:2 * i + 2],
                              torch.full((3, N), 20 + i, dtype=torch.long), shared_k, shared_k)
                      for i in range(large_chunks)]
            config = PrefillConfig(policy={"name": "full"}, chunks_per_step=1, layout="prefix-first", sampling={},
                                   adapter={}, attention_backend="auto")
            big = VideoKVCache(ModelInfo("7b-like", "qwen2_vl", "x", L, H, D), config, torch.bfloat16,
                               video, torch.arange(20), [r(H, 20, D) for _ in range(L)], [r(H, 20, D) for _ in range(L)],
                               chunks, [LayerState(r(H, 256, D), r(H, 256, D),  # a capacity-256 carried state
                                                   torch.zeros(H, 256, dtype=torch.long))] * L,
                               large_chunks, [N] * large_chunks, {})
            result["large_layout"] = {"layout": {"layers": L, "kv_heads": H, "head_dim": D, "tokens_per_chunk": N,
                                                 "dtype": "bfloat16", "chunks": large_chunks}}
            for name, (root, opts) in roots.items():
                row = {}
                for storage in ("native", "int8"):
                    uri = f"{root}/large-{storage}"
                    m, write_s, read_s = _timed_round_trip(big, uri, storage == "int8", opts)
                    n = m["totals"]["bytes"]
                    row[storage] = {"bytes_per_chunk": n / large_chunks, "write_MBps": _mb(n) / write_s,
                                    "read_MBps": _mb(n) / read_s, "bytes_by_kind": _bytes_by_kind(m)}
                result["large_layout"][name] = row
    finally:
        if s3_ctx is not None:
            s3_ctx.__exit__(None, None, None)
    return result


def catalog_listing(num_caches: int = 500, *, s3: bool = True, workdir: str | None = None) -> dict[str, Any]:
    """Listing cost of a root of `num_caches` caches: every manifest read (scan) vs the catalog. Counts S3
    requests (GET/LIST/HEAD) and times both; the caches are copies of one tiny cache (same objects per cache)."""
    from statekv.store import catalog, list_caches, save_cache
    from statekv.store import manifest as schema
    from statekv.store.fs import resolve

    work = workdir or tempfile.mkdtemp(prefix="bench_catalog_")
    out: dict[str, Any] = {"caches": num_caches}
    s3_ctx = loopback_s3() if s3 else None
    try:
        roots = {"local": (f"{work}/catalog", None)}
        if s3_ctx is not None:
            roots["s3_loopback"] = (f"s3://bench/catalog-{uuid.uuid4().hex}", s3_ctx.__enter__())
        for name, (root, opts) in roots.items():
            template = save_cache(_tiny_cache(), f"{root}/template", storage_options=opts)
            fs, path = resolve(root, opts)
            blobs = {f["path"]: fs.cat_file(f"{path}/template/{f['path']}") for f in template["files"]}
            for i in range(num_caches):
                vid = f"v{i:06d}"
                for rel, data in blobs.items():
                    if fs.__class__.__name__ == "LocalFileSystem":
                        fs.makedirs(f"{path}/{vid}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
                    fs.pipe_file(f"{path}/{vid}/{rel}", data)
                fs.pipe_file(f"{path}/{vid}/manifest.json", schema.encode(schema.seal({**template, "video_id": vid})))
            fs.rm(f"{path}/template", recursive=True)
            fs.rm(f"{path}/_catalog", recursive=True)  # the copies were not committed: no catalog yet
            row: dict[str, Any] = {}
            for label, kwargs in (("scan", {"use_catalog": False}), ("catalog_first", {}), ("catalog", {})):
                fs, _ = resolve(root, opts)
                counter = _count_requests(fs)
                t0 = time.perf_counter()
                listing = list_caches(root, filesystem=fs, **kwargs)
                row[label] = {"seconds": time.perf_counter() - t0, "s3_requests": counter(),
                              "listed": len(listing)}
            save_cache(_tiny_cache(), f"{root}/v-new", storage_options=opts)  # one commit since the snapshot
            fs, _ = resolve(root, opts)
            counter = _count_requests(fs)
            t0 = time.perf_counter()
            listing = list_caches(root, filesystem=fs)
            row["catalog_after_a_commit"] = {"seconds": time.perf_counter() - t0, "s3_requests": counter(),
                                             "listed": len(listing)}
            out[name] = row
        out["compact_after"] = catalog.COMPACT_AFTER
    finally:
        if s3_ctx is not None:
            s3_ctx.__exit__(None, None, None)
    return out


def _count_requests(fs: Any):
    """Count the S3 API calls `fs` makes through s3fs from now on (None for local filesystems): returns a getter.
    Conditional PUTs (catalog compaction) go through the raw client and are not counted."""
    calls = [0]
    inner = getattr(fs, "_call_s3", None)
    if inner is not None:
        async def counted(*args, **kwargs):
            calls[0] += 1
            return await inner(*args, **kwargs)

        fs._call_s3 = counted  # this instance only: the benchmark's own filesystem
    return lambda: calls[0] if inner is not None else None


def _tiny_cache() -> "VideoKVCache":
    from statekv.cache import ChunkKV, ModelInfo, PrefillConfig, VideoInfo, VideoKVCache
    from statekv.policies import LayerState

    video = VideoInfo("<frames>", 2.0, 2, 2.0, (28, 28), [0, 1], [0.0, 0.5])
    z = torch.zeros(1, 1, 8)
    chunk = ChunkKV(0, (0, 2), [0, 1], [0.0, 0.5], torch.full((3, 1), 2, dtype=torch.long), [z], [z])
    config = PrefillConfig(policy={"name": "full"}, chunks_per_step=1, layout="prefix-first", sampling={},
                           adapter={}, attention_backend="auto")
    return VideoKVCache(ModelInfo("tiny", "qwen2_vl", "x", 1, 1, 8), config, torch.float32, video,
                        torch.arange(2), [torch.zeros(1, 2, 8)], [torch.zeros(1, 2, 8)], [chunk],
                        [LayerState(z, z, torch.zeros(1, 1, dtype=torch.long))], 1, [1], {})


def _timed_round_trip(cache: "VideoKVCache", uri: str, int8: bool, opts: Any) -> tuple[dict[str, Any], float, float]:
    """Save `cache` to `uri`, load it back eagerly: (manifest, write seconds, read seconds)."""
    from statekv.store import load_cache, save_cache

    t0 = time.perf_counter()
    manifest = save_cache(cache, uri, int8=int8, storage_options=opts)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_cache(uri, lazy=False, storage_options=opts)
    return manifest, write_s, time.perf_counter() - t0
