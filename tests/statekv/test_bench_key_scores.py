"""The key-score kernel benchmark on small shapes: rows, ratios, and the peaked inputs really being peaked."""

from __future__ import annotations

from statekv.benchmarks.key_scores import KeyScoreShapes, format_table, run


def test_rows_ratios_and_spread():
    shapes = KeyScoreShapes(heads=4, kv_heads=2, head_dim=16, prefix=4, capacity=16, chunk=8)
    report = run(shapes, spreads=(1.0, 8.0), repeats=1, inner=1)
    rows = report["rows"]
    assert [(r["case"], r["q"], r["kv"], r["spread"]) for r in rows] == [
        ("prefix", 4, 4, 1.0), ("prefix", 4, 4, 8.0), ("chunk", 8, 28, 1.0), ("chunk", 8, 28, 8.0)]
    for r in rows:
        assert set(r["ms"]) == {"sdpa", "key_scores"} and all(ms > 0 for ms in r["ms"].values())
        assert r["ratio_to_sdpa"]["sdpa"] == 1.0
    # flat inputs leave no probability below tiny; peaked ones do (the case the fused path exists for)
    assert rows[2]["below_tiny_fraction"] == 0.0 < rows[3]["below_tiny_fraction"]
    assert set(report["load_average"]) == {"before", "after"}
    assert "key_scores" in format_table(report)
