"""The cache settings of an indexing run reach every video's cache: policy, answer_from, write-time compression."""

from __future__ import annotations

import pytest

from pipelines.indexing import IndexActor, IndexConfig, list_inputs, probe_inputs
from pipelines.indexing.actor import _columns
from statekv.settings import PrefillSettings
from statekv.store import load_cache, read_manifest
from statekv.testing.videos import synthetic_frames, write_video

PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 84}


def _index_one(model: str, tmp_path, **settings) -> str:
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "a.mp4", synthetic_frames(8, seed=3), fps=4.0)
    config = IndexConfig(input=str(folder), output=str(tmp_path / "out"), model=model,
                         prefill=PrefillSettings(capacity=24, fps=4.0, **PIXELS, **settings))
    rows = probe_inputs(list_inputs(config.input), config)
    out = IndexActor(config)(_columns(rows, list(rows[0])))
    assert list(out["status"]) == ["ok"], list(out["error"])
    return str(tmp_path / "out" / "a")


def test_a_compressed_run_stores_the_kept_fraction(tiny_checkpoints, tmp_path):
    uri = _index_one(tiny_checkpoints["qwen2_vl"], tmp_path, compress_keep=0.5)
    assert read_manifest(uri)["prefill"]["compression"]["keep"] == 0.5
    cache = load_cache(uri)
    assert cache.num_chunks == 4
    assert all(c.stored_tokens(layer) * 2 == c.num_tokens for c in cache.chunks for layer in range(len(c.keys)))


def test_a_state_only_infinipot_run_stores_no_chunks(tiny_checkpoints, tmp_path):
    uri = _index_one(tiny_checkpoints["qwen2_vl"], tmp_path, policy="infinipot", answer_from="state")
    prefill = read_manifest(uri)["prefill"]
    assert (prefill["policy"]["name"], prefill["answer_from"]) == ("infinipot", "state")
    assert len(load_cache(uri).chunks) == 0


@pytest.mark.parametrize("settings, message", [
    ({"policy": "lru"}, "--policy: unknown policy 'lru'; valid: full, window, statekv, infinipot, infinipot-stream"),
    ({"answer_from": "all"}, "--answer-from: unknown value 'all'"),
    ({"answer_from": "state", "compress_keep": 0.5}, "--answer-from state stores none"),
])
def test_bad_settings_are_refused_before_the_run(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        IndexConfig(input="in/", output="out/", model="m", prefill=PrefillSettings(**settings))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):  # as it travels to actors
        IndexConfig(input="in/", output="out/", model="m", prefill={**PrefillSettings().__dict__, **settings})

