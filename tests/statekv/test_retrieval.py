"""Retrieval selection rules (ReKV top-k, StreamKV segments, layer-adaptive budgets), without a model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statekv.retrieval import (Segments, TopK, adaptive_budgets, chunk_scores, concentration, fold_query,
                               make_retrieval, select_top)


def offline_segments(features: torch.Tensor, *, threshold: float = 0.99, min_size: int = 4,
                     max_size: int = 64) -> list[tuple[int, int]]:
    """The reference for `SegmentTracker`: StreamKV's scene segmentation over all chunks' mean visual features
    (C, d) at once: [start, end) chunk ranges; a segment closes where the cosine similarity of consecutive chunks
    drops below `threshold` (once it has `min_size` chunks) or when it reaches `max_size` chunks."""
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    num = features.shape[0]
    if num == 0:
        return []
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    sims = (f[1:] * f[:-1]).sum(dim=-1).tolist()  # sims[i]: chunk i vs chunk i + 1
    out, start = [], 0
    for i in range(1, num):
        size = i - start
        if size >= max_size or (size >= min_size and sims[i - 1] < threshold):
            out.append((start, i))
            start = i
    out.append((start, num))
    return out


def test_scores_are_the_mean_query_dot_each_chunk_summary_per_kv_group():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(4, 3, 8, generator=g)  # 4 query heads, 3 question tokens
    summaries = torch.randn(5, 2, 8, generator=g)  # 5 chunks, 2 KV heads
    scores = chunk_scores(fold_query(query, 2), summaries)
    q = query.mean(dim=1)  # (4, 8)
    expected = torch.stack([sum(q[h] @ summaries[c, h // 2] for h in range(4)) for c in range(5)])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_top_k_keeps_the_best_chunks_and_the_recent_ones_in_temporal_order():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0, 0.3, 0.4])
    assert select_top(scores, 2, 0) == [1, 5]
    assert select_top(scores, 2, 2) == [1, 5, 6, 7]  # recent chunks do not use up k
    assert select_top(scores, 3, 3) == [1, 2, 3, 5, 6, 7]  # 5 is recent, so 2 is the third best
    assert select_top(scores, 100, 1) == list(range(8))
    # reversing the scores must change the choice: the rule reads them
    assert select_top(-scores, 2, 0) == [0, 4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.integers(1, 200), st.integers(1, 40))
def test_adaptive_budgets_sum_to_the_total_and_respect_the_cap(conc, total, cap):
    budgets = adaptive_budgets(conc, total, cap=cap)
    assert sum(budgets) == min(total, cap * len(conc))
    assert all(0 <= b <= cap for b in budgets)


def test_adaptive_budgets_give_concentrated_layers_more():
    flat, peaked = torch.zeros(16), torch.zeros(16)
    peaked[3] = 20.0
    assert concentration(flat) == pytest.approx(0.0, abs=1e-9)
    assert concentration(peaked) > 0.9
    budgets = TopK(k=4, adaptive_budget=True).budgets([flat, peaked, flat])
    assert sum(budgets) == 12 and budgets[1] > budgets[0] == budgets[2]


def test_segments_fall_where_consecutive_features_change():
    g = torch.Generator().manual_seed(1)
    scenes = [torch.randn(16, generator=g) for _ in range(3)]
    feats = torch.stack([scenes[0]] * 5 + [scenes[1]] * 6 + [scenes[2]] * 4) + 1e-3 * torch.randn(15, 16, generator=g)
    assert offline_segments(feats, threshold=0.99, min_size=2, max_size=64) == [(0, 5), (5, 11), (11, 15)]
    # max_size splits a long scene; min_size keeps a short change inside its segment
    assert offline_segments(feats, threshold=0.99, min_size=2, max_size=3)[:2] == [(0, 3), (3, 5)]
    assert offline_segments(feats, threshold=0.99, min_size=6, max_size=64) == [(0, 11), (11, 15)]


def test_segment_retrieval_takes_whole_scenes():
    scores = torch.tensor([0.0, 0.0, 9.0, 8.0, 1.0, 1.0, 1.0, 0.5])
    segments = [(0, 2), (2, 4), (4, 7), (7, 8)]
    assert Segments(k=2, recent=0).select([scores], segments) == [[2, 3]]
    assert Segments(k=5, recent=1).select([scores], segments) == [[2, 3, 4, 5, 6, 7]]
    # a best scene larger than k: its k best chunks
    assert Segments(k=1, recent=0).select([scores], segments) == [[2]]


def test_retrieval_settings_round_trip_and_validate():
    for r in (TopK(k=8, recent=2), TopK(k=3, adaptive_budget=True), TopK(k=2, query="question"),
              Segments(k=16, recent=4)):
        assert make_retrieval(r.settings()) == r
    assert make_retrieval({"name": "topk", "k": 2}).query == "prompt"  # settings recorded before the option
    with pytest.raises(ValueError, match="top_k"):
        TopK(k=0)
    with pytest.raises(ValueError, match="query must be one of prompt, question, got 'bare'"):
        TopK(k=2, query="bare")
    with pytest.raises(ValueError, match="unknown retrieval"):
        make_retrieval({"name": "nope"})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 5), st.integers(0, 6))
def test_online_segmentation_equals_the_batch_rule(scene_of_chunk, min_size, extra):
    from statekv.retrieval import SegmentRule, SegmentTracker

    basis = torch.eye(4, 8)
    feats = basis[torch.tensor(scene_of_chunk)]
    rule = SegmentRule(threshold=0.99, min_size=min_size, max_size=min_size + extra)
    tracker = SegmentTracker(rule)
    for f in feats:
        tracker.add(f)
    assert tracker.segments == offline_segments(feats, threshold=0.99, min_size=min_size,
                                                  max_size=min_size + extra)


def test_retrieval_setting_names_what_users_give():
    """One rule for the service's `retrieval` object and `statekv ask`'s flags: the kind's own `recent` default."""
    from statekv.retrieval import Segments, TopK, retrieval_setting

    assert retrieval_setting() is None
    assert retrieval_setting(top_k=4) == TopK(k=4, recent=0)
    assert retrieval_setting(top_k=4, recent=2, adaptive=True) == TopK(k=4, recent=2, adaptive_budget=True)
    assert retrieval_setting(segments=4) == Segments(k=4, recent=8)
    assert retrieval_setting(segments=4, recent=0) == Segments(k=4, recent=0)
    assert retrieval_setting(top_k=4, query="question") == TopK(k=4, query="question")
    for bad, message in (({"top_k": 1, "segments": 1}, "not both"), ({"recent": 1}, "need top_k or segments"),
                         ({"adaptive": True}, "need top_k or segments"), ({"segments": 2, "adaptive": True},
                                                                         "adaptive goes with top_k"),
                         ({"query": "question"}, "need top_k or segments"),
                         ({"segments": 2, "query": "question"}, "query goes with top_k"),
                         ({"top_k": 0}, "top_k must be a positive integer")):
        with pytest.raises(ValueError, match=message):
            retrieval_setting(**bad)


def test_chunk_spans_tile_the_video_with_uneven_frames():
    """Regression (VFR clip): chunk 3 ended at 4.02 s while chunk 4 started at 4.00 s, and the last chunk ended at
    34.30 s on a 33.84 s clip. Ranges run from a chunk's first frame to the next chunk's, the last to the duration."""
    from statekv.retrieval import chunk_span

    times = [0.0, 0.5, 1.1, 1.5, 2.0, 2.52, 3.0, 4.0]  # uneven: frames dropped around 3-4 s
    spans = [chunk_span((lo, lo + 2), times, 4.3, 0.5) for lo in range(0, 8, 2)]
    assert spans == [(0.0, 1.1), (1.1, 2.0), (2.0, 3.0), (3.0, 4.3)]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert chunk_span((6, 8), times, 0.0, 0.5) == (3.0, 4.5)  # no recorded duration: one sampled interval after
