"""Indexing over a root that holds a corrupt cache (issue 14 point 8): the probe must not abort the run."""

from __future__ import annotations

from pipelines.indexing import IndexConfig, list_inputs
from pipelines.indexing.probe import probe_row


def test_the_probe_sends_a_video_with_a_corrupt_cache_to_be_prefilled_again(tmp_path):
    """Regression: one corrupt manifest made `statekv index` abort with a Ray traceback and no report."""
    (tmp_path / "in").mkdir()
    for name in ("good", "bad"):
        (tmp_path / "in" / f"{name}.mp4").write_bytes(b"not decoded by the probe")
    (tmp_path / "out" / "good").mkdir(parents=True)
    (tmp_path / "out" / "bad").mkdir(parents=True)
    (tmp_path / "out" / "bad" / "manifest.json").write_text('{"format": "statekv-cache"')  # truncated
    config = IndexConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="unused")
    rows = list_inputs(config.input)
    out = [probe_row(row, config) for row in rows]
    assert {r["video_id"]: r["status"] for r in out} == {"bad": "", "good": ""}  # both still to do
