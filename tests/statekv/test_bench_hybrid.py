"""The hybrid benchmark (statekv/benchmarks/hybrid.py) on a tiny config: what it reports holds its claims."""

from __future__ import annotations

import pytest

from statekv.benchmarks.hybrid import format_table, run_hybrid_benchmark

TINY = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vision_depth=1, vision_dim=32)


def test_hybrid_removes_most_of_fulls_growth_and_statekv_the_rest(tmp_path):
    r = run_hybrid_benchmark(num_frames=16, frame_size=(64, 96), capacity_chunks=2, model=TINY, workdir=tmp_path)
    runs = r["runs"]
    assert set(runs) == {"hybrid/full", "hybrid/statekv", "attention/full", "attention/statekv"}
    assert runs["hybrid/full"]["linear_layers"] == [0, 1, 2] and runs["attention/full"]["linear_layers"] == []
    growth = {name: run["flops"][-1] - run["flops"][1] for name, run in runs.items()}
    # one attention layer in four: the hybrid's per-chunk cost grows a quarter as fast as the pure-attention one's
    assert growth["hybrid/full"] == pytest.approx(growth["attention/full"] / 4, rel=0.1)
    for name in ("hybrid/statekv", "attention/statekv"):  # at capacity every chunk costs the same
        assert runs[name]["flops"][-1] == runs[name]["flops"][-2]
    assert all(len(run["seconds"]) == len(run["flops"]) == 8 for run in runs.values())
    assert "hybrid/statekv" in format_table(r)
