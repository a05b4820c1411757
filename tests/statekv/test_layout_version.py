"""The adapter's token layout is part of a cache's identity.

Qwen3-VL and Qwen3.5 caches built before statekv followed the trained layout (layout version 1: the template's
outer `<|vision_start|>`/`<|vision_end|>` kept around the per-frame blocks) sit on a sequence the model never saw:
they are refused on load (with the model that will use them), on ask and on resume, in one line that says to
re-index. A Qwen2-VL cache from before layouts were recorded (no layout keys in its manifest) is still valid: its
family's layout did not change.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from statekv import Engine, Full
from statekv.errors import CacheLayoutError
from statekv.models import ADAPTERS
from statekv.store import load_cache, prefill_to_store
from statekv.store import manifest as manifest_schema
from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames, write_video
from statekv.video import SamplingConfig

QUESTION = "What happens?"


def make_engine(path: str) -> Engine:
    return Engine.from_pretrained(path, policy=Full(), device="cpu", dtype=torch.float32,
                                  sampling=SamplingConfig(fps=2.0))


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, synthetic_frames(6, 64, 96, seed=1), fps=2.0)
    return str(path)


@pytest.fixture(scope="module")
def more(tmp_path_factory) -> str:
    """Footage that continues the stream (a resume appends it)."""
    path = tmp_path_factory.mktemp("video") / "more.mp4"
    write_video(path, synthetic_frames(4, 64, 96, seed=2), fps=2.0)
    return str(path)


def build(tmp_path, family: str, video: str) -> tuple[Engine, str]:
    engine = make_engine(str(save_tiny_checkpoint(tmp_path / family, family)))
    uri = str(tmp_path / "store" / f"{family}-clip")
    prefill_to_store(engine, video, uri)
    return engine, uri


def rewrite_manifest(uri: str, edit) -> None:
    """Edit a committed manifest as an older statekv would have written it, and seal it again (a valid cache)."""
    path = os.path.join(uri, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "wb") as f:
        f.write(manifest_schema.encode(manifest_schema.seal(manifest)))


def as_before_layouts_were_recorded(manifest: dict) -> None:
    manifest["model"].pop("layout_version")
    manifest["model"].pop("transformers_version")


def test_the_manifest_records_the_layout_and_the_transformers_version(tmp_path, video):
    engine, uri = build(tmp_path, "qwen3_vl", video)
    with open(os.path.join(uri, "manifest.json")) as f:
        model = json.load(f)["model"]
    assert model["layout_version"] == ADAPTERS["qwen3_vl"].layout_version == 2
    assert model["transformers_version"] == transformers.__version__
    cache = load_cache(uri, expect_model=engine.model_info())
    assert cache.model.layout_version == 2
    assert engine.ask(cache, QUESTION, max_new_tokens=2).token_ids


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_a_cache_on_the_old_qwen3_layout_is_refused_on_load_ask_and_resume(tmp_path, video, more, family):
    engine, uri = build(tmp_path, family, video)
    rewrite_manifest(uri, as_before_layouts_were_recorded)
    reason = (f"built on {family} token layout 1 \\(before layouts were recorded\\); this statekv builds layout 2, the "
              f"sequence the model was trained on: re-index the video")
    with pytest.raises(CacheLayoutError, match=reason) as err:
        load_cache(uri, expect_model=engine.model_info())
    assert "\n" not in str(err.value)
    stale = load_cache(uri)  # without a model to check against, the store reads it (inspect, ls)
    assert stale.model.layout_version == 1
    with pytest.raises(CacheLayoutError, match=reason):
        engine.ask(stale, QUESTION, max_new_tokens=2)
    with pytest.raises(CacheLayoutError, match=reason):
        prefill_to_store(engine, more, uri, resume=True)
    with pytest.raises(CacheLayoutError, match=reason):
        engine.prefill(more, resume_from=stale)
    rewrite_manifest(uri, lambda m: m["model"].update(layout_version=1, transformers_version="5.24.0"))
    with pytest.raises(CacheLayoutError, match=r"layout 1 \(transformers 5\.24\.0\)"):
        load_cache(uri, expect_model=engine.model_info())


def test_a_qwen2_vl_cache_from_before_layouts_were_recorded_still_loads_and_answers(tmp_path, video):
    engine, uri = build(tmp_path, "qwen2_vl", video)
    want = engine.ask(load_cache(uri), QUESTION, max_new_tokens=4).token_ids
    rewrite_manifest(uri, as_before_layouts_were_recorded)
    cache = load_cache(uri, expect_model=engine.model_info())
    assert cache.model.layout_version == ADAPTERS["qwen2_vl"].layout_version == 1
    assert cache.model.transformers_version == ""
    assert engine.ask(cache, QUESTION, max_new_tokens=4).token_ids == want
