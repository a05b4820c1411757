"""Methods benchmark: the fidelity harness's table for every method at two budgets, and what retrieval saves on a
cold stored cache as videos grow.

Part 1 runs `statekv.eval.run_fidelity` for Full, Window, StateKV, ReKV (window prefill + top-k retrieval),
StreamKV (window prefill + scene retrieval), InfiniPot-V (as carried state and as the stored cache) at two budgets
each, on tiny random checkpoints of two families and synthetic videos. Part 2 stores caches of three lengths on a
loopback S3 server (moto) and answers one question from each, cold (a fresh lazy load per question), with and
without top-k retrieval: bytes read and time to the first token, side by side in one run.

Random weights say nothing about real accuracy: only the agreement with Full and the costs mean anything here.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statekv.benchmarks.store import loopback_s3
from statekv.engine import Engine
from statekv.eval import EvalItem, ReadMeter, parse_settings, run_fidelity
from statekv.policies import Full, Window
from statekv.retrieval import TopK
from statekv.store import load_cache, prefill_to_store
from statekv.store.fs import resolve
from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames, write_video
from statekv.video import SamplingConfig

QUESTIONS = ("What happens after the dog enters?", "Describe the video.", "What colour is the car?")


def method_settings(tokens_per_chunk: int, chunks: int) -> list[str]:
    """Every method at two budgets: a quarter and a half of the video's tokens (or chunks)."""
    total = tokens_per_chunk * chunks
    small, large = max(1, total // 4), max(1, total // 2)
    k_small, k_large = max(1, chunks // 4), max(1, chunks // 2)
    window = max(1, total // 4)
    return [f"window:{small}", f"window:{large}", f"statekv:{small}", f"statekv:{large}",
            f"rekv:{window}:{k_small}:1", f"rekv:{window}:{k_large}:1",
            f"streamkv:{window}:{k_small}:1", f"streamkv:{window}:{k_large}:1",
            f"infinipot:{small}", f"infinipot:{large}", f"infinipot-cache:{small}", f"infinipot-cache:{large}",
            "guided:0.25", "guided:0.5", f"streamkv-guided:0.6:{window}:{k_small}:1"]


def fidelity_tables(work: Path, *, families=("qwen2_vl", "qwen2_5_vl"), frames: int = 48,
                    max_new_tokens: int = 8, settings: list[str] | None = None) -> dict[str, Any]:
    """Part 1: the harness's summary per family (JSON rows + Markdown); `settings` (specs) replaces the default
    list of every method at two budgets (Full is always run: every figure is relative to it)."""
    sampling = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)  # 6 tokens per chunk
    videos = []
    for seed in (1, 2):
        path = work / f"video-{seed}.mp4"
        write_video(path, synthetic_frames(frames, 56, 84, seed=seed), fps=2.0)
        videos.append(str(path))
    items = [EvalItem(v, q) for v in videos for q in QUESTIONS]
    out: dict[str, Any] = {}
    for family in families:
        ckpt = save_tiny_checkpoint(work / f"ckpt-{family}", family)
        engine = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, sampling=sampling)
        specs = method_settings(6, frames // 2) if settings is None else settings
        report = run_fidelity(engine, items, parse_settings(specs), store_root=work / f"caches-{family}",
                              max_new_tokens=max_new_tokens)
        out[family] = {"summary": report.summary(), "markdown": report.to_markdown()}
        report.write(work / f"report-{family}")
    return out


def cold_retrieval(work: Path, *, lengths=(32, 128, 512), k: int = 8) -> list[dict[str, Any]]:
    """Part 2: bytes read and first-token time from a cold loopback-S3 cache, whole cache vs top-k retrieval."""
    ckpt = save_tiny_checkpoint(work / "ckpt-wide", "qwen2_vl", hidden_size=128)  # head_dim 32, 24 tokens a chunk
    engine = Engine.from_pretrained(ckpt, policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=112 * 168))
    engine.policy = Window(capacity=24 * 16)  # ReKV's prefill: a sliding window
    rows = []
    with loopback_s3() as options:
        for n in lengths:
            uri = f"s3://bench/methods/len-{n}"
            prefill_to_store(engine, synthetic_frames(2 * n, 112, 168, seed=n), uri, fps=2.0,
                             storage_options=options)
            fs, _ = resolve(uri, options)
            row: dict[str, Any] = {"chunks": n}
            for name, retrieval in (("whole", None), (f"top{k}", TopK(k=k, recent=1))):
                meter = ReadMeter(fs)
                start = time.perf_counter()
                cache = load_cache(uri, filesystem=meter)
                answer = engine.ask(cache, QUESTIONS[0], max_new_tokens=1, retrieval=retrieval)
                row[f"{name}_first_token_s"] = time.perf_counter() - start
                row[f"{name}_bytes_read"] = meter.bytes_read
                row[f"{name}_requests"] = meter.requests
                del answer
            row["bytes_ratio"] = row["whole_bytes_read"] / row[f"top{k}_bytes_read"]
            row["first_token_ratio"] = row["whole_first_token_s"] / row[f"top{k}_first_token_s"]
            rows.append(row)
    return rows


def run(out_dir: str | Path | None = None, *, lengths=(32, 128, 512), frames: int = 48,
        settings: list[str] | None = None, families=("qwen2_vl", "qwen2_5_vl")) -> dict[str, Any]:
    """Both parts; writes the harness reports under `out_dir` (a temporary folder by default). With `settings` only
    those (and Full) are compared, and an empty `lengths` skips the cold-S3 part."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="statekv-methods-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return {
            "machine": {"device": "cpu", "torch_threads": 1, "processor": platform.processor() or platform.machine(),
                        "numpy": np.__version__, "torch": torch.__version__},
            "fidelity": fidelity_tables(work, frames=frames, settings=settings, families=families),
            "cold_retrieval": cold_retrieval(work, lengths=lengths) if lengths else [],
        }
