"""Query-time retrieval through the engine: k >= all chunks is Full, only chosen chunks are read, evidence."""

from __future__ import annotations

import pytest
import torch

from statekv import Engine, Full
from statekv.eval import ReadMeter
from statekv.retrieval import TopK
from statekv.store import load_cache, prefill_to_store
from statekv.store.fs import resolve
from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
QUESTION = "What happens after the dog enters?"


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return Engine.from_pretrained(tiny_checkpoints["qwen2_5_vl"], policy=Full(), device="cpu",
                                  dtype=torch.float32, sampling=SMALL)


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(24, 56, 84, seed=5)  # 12 chunks of 2 frames


def logits_of(answer):
    return torch.stack(answer.scores)


def test_top_k_over_all_chunks_is_full_attention(engine, frames):
    cache = engine.prefill(frames, fps=2.0)
    full = engine.ask(cache, QUESTION, max_new_tokens=5, output_scores=True)
    for r in (TopK(k=cache.num_chunks), TopK(k=4, recent=cache.num_chunks), TopK(k=3, adaptive_budget=True,
                                                                                   recent=cache.num_chunks)):
        got = engine.ask(cache, QUESTION, max_new_tokens=5, output_scores=True, retrieval=r)
        torch.testing.assert_close(logits_of(got), logits_of(full), rtol=0, atol=1e-5)
        assert got.token_ids == full.token_ids
        assert [e.chunk for e in got.evidence] == list(range(cache.num_chunks))


def test_few_chunks_change_the_answer_and_are_cited_with_their_times(engine, frames):
    cache = engine.prefill(frames, fps=2.0)
    full = engine.ask(cache, QUESTION, max_new_tokens=3, output_scores=True)
    got = engine.ask(cache, QUESTION, max_new_tokens=3, output_scores=True, retrieval=TopK(k=2, recent=1))
    assert not torch.allclose(logits_of(got)[0], logits_of(full)[0], atol=1e-6)
    chunks = {e.chunk for e in got.evidence}
    assert cache.num_chunks - 1 in chunks and 2 <= len(chunks) <= 2 * engine.adapter.layout.num_layers + 1
    for e in got.evidence:
        c = cache.chunks[e.chunk]
        assert e.start_s == c.timestamps[0] and e.end_s == pytest.approx(c.timestamps[-1] + 1 / 2.0)
        assert 1 <= e.layers <= engine.adapter.layout.num_layers


def test_a_layer_read_holds_that_layer_only(engine, frames, tmp_path):
    """Regression: `LazyChunks.read_layer` read and decoded every layer's K/V of each chosen chunk (the store's
    per-layer view kept the whole cache's list of layers), so retrieval read and held layers x what it chose."""
    uri = str(tmp_path / "clip")
    prefill_to_store(engine, frames, uri, fps=2.0)
    cache = load_cache(uri)
    layers = engine.adapter.layout.num_layers
    for layer in range(layers):
        for chunk in cache.chunks.read_layer(layer, [1, 3]).values():
            assert [i for i in range(layers) if chunk.keys[i] is not None] == [layer]
            assert [i for i in range(layers) if chunk.values[i] is not None] == [layer]
    per_layer = cache.chunks.nbytes - sum(t.numel() * 4 for t in cache.chunks._summaries.values())
    assert per_layer == sum(load_cache(uri, lazy=False).chunks[i].nbytes for i in (1, 3))


@pytest.fixture(scope="module")
def wide_engine(tmp_path_factory):
    """head_dim 32 and 24 tokens per chunk: one layer of one chunk is 12 KiB, more than Parquet's 8 KiB gap below
    which neighbouring column chunks are read together, so what is read is what retrieval asked for."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", "qwen2_vl", hidden_size=128)
    return Engine.from_pretrained(path, policy=Full(), device="cpu", dtype=torch.float32,
                                  sampling=SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=112 * 168))


def test_a_stored_cache_reads_only_the_chosen_chunks(wide_engine, store_root):
    engine = wide_engine
    root, options = store_root
    uri = f"{root}/long"
    prefill_to_store(engine, synthetic_frames(96, 112, 168, seed=2), uri, fps=2.0, storage_options=options)
    fs, _ = resolve(uri, options)

    def answer(retrieval):
        meter = ReadMeter(fs)
        cache = load_cache(uri, filesystem=meter)
        ans = engine.ask(cache, QUESTION, max_new_tokens=2, output_scores=True, retrieval=retrieval)
        return ans, meter.bytes_read, cache

    full, full_bytes, _ = answer(None)
    same, _, _ = answer(TopK(k=48))
    torch.testing.assert_close(logits_of(same), logits_of(full), rtol=0, atol=1e-5)
    few, few_bytes, cache = answer(TopK(k=4))
    assert cache.chunks.loaded == []  # no chunk was read whole
    # 4 of 48 chunks per layer: k/N = 8 % of the chunk bytes, plus metadata (manifest, prefix, the summaries file,
    # footers); a whole-cache answer reads every chunk
    chunk_bytes = sum(f["bytes"] for f in cache.committed.manifest["files"] if f["kind"] == "chunks")
    metadata = sum(f["bytes"] for f in cache.committed.manifest["files"] if f["kind"] in ("prefix", "summaries"))
    assert few_bytes < 2 * metadata + 0.15 * chunk_bytes + 100_000, (few_bytes, full_bytes, chunk_bytes)
    assert few_bytes < 0.35 * full_bytes


def three_scenes() -> "np.ndarray":
    """8 + 10 + 8 frames of three static, visually distinct scenes: chunk boundaries 0-4, 4-9, 9-13."""
    import numpy as np

    scenes = [synthetic_frames(1, 56, 84, seed=s)[0] for s in (11, 12, 13)]
    scenes[1] = scenes[1][::-1].copy()  # a different layout too, not only other colours
    return np.stack([scenes[0]] * 8 + [scenes[1]] * 10 + [scenes[2]] * 8)


def test_segments_fall_at_the_scene_changes_and_segment_retrieval_takes_whole_scenes(tiny_checkpoints):
    from statekv.retrieval import SegmentRule, Segments

    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SMALL)
    engine.segment_rule = SegmentRule(threshold=0.99, min_size=2, max_size=64)
    cache = engine.prefill(three_scenes(), fps=2.0)
    assert cache.scenes == [(0, 4), (4, 9), (9, 13)]
    full = engine.ask(cache, QUESTION, max_new_tokens=3, output_scores=True)
    same = engine.ask(cache, QUESTION, max_new_tokens=3, output_scores=True, retrieval=Segments(k=13, recent=0))
    torch.testing.assert_close(logits_of(same), logits_of(full), rtol=0, atol=1e-5)
    got = engine.ask(cache, QUESTION, max_new_tokens=1, retrieval=Segments(k=5, recent=0))
    chosen = {e.chunk for e in got.evidence}
    for start, end in cache.scenes:  # every scene is taken whole or not at all, by every layer
        part = set(range(start, end)) & chosen
        assert not part or part == set(range(start, end))
