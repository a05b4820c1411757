"""The query service and a Qwen3-VL cache built on the old token layout (statekv < 0.3): refused with 409
`cache_outdated` and a message that says to re-index, listed as not compatible, while its neighbour (a cache built
now) answers. In process: the FastAPI app over a real `QueryService` running a tiny Qwen3-VL."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from pipelines.serving.app import create_api
from pipelines.serving.service import QueryService
from statekv import Engine, Full
from statekv.store import manifest as manifest_schema
from statekv.store import prefill_to_store
from statekv.testing.checkpoints import save_tiny_checkpoint
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig


@pytest.fixture(scope="module")
def qwen3_root(tmp_path_factory) -> tuple[Engine, str]:
    base = tmp_path_factory.mktemp("qwen3-serving")
    engine = Engine.from_pretrained(str(save_tiny_checkpoint(base / "qwen3_vl", "qwen3_vl")), policy=Full(),
                                    device="cpu", dtype=torch.float32, sampling=SamplingConfig(fps=2.0))
    root = base / "caches"
    for vid, seed in (("fresh", 0), ("stale", 1)):
        prefill_to_store(engine, synthetic_frames(6, 64, 96, seed=seed), f"{root}/{vid}", fps=2.0)
    path = root / "stale" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["model"]["layout_version"], manifest["model"]["transformers_version"]  # as statekv 0.2 wrote it
    path.write_bytes(manifest_schema.encode(manifest_schema.seal(manifest)))
    return engine, str(root)


def test_an_old_layout_cache_is_409_cache_outdated_and_its_neighbour_answers(qwen3_root):
    engine, root = qwen3_root
    from statekv.store import catalog

    catalog.rebuild(root)  # the manifest was rewritten by hand: the listing index learns it
    with TestClient(create_api(QueryService(engine, root))) as c:
        r = c.post("/v1/ask", json={"video_id": "stale", "question": "What happens?", "max_new_tokens": 2})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "cache_outdated"
        assert "'stale'" in error["message"] and "token layout 1" in error["message"]
        assert "re-index the video" in error["message"] and "\n" not in error["message"]
        fresh = c.post("/v1/ask", json={"video_id": "fresh", "question": "What happens?", "max_new_tokens": 2})
        assert fresh.status_code == 200, fresh.text
        listing = {v["video_id"]: v["compatible"] for v in c.get("/v1/videos").json()["videos"]}
        assert listing == {"fresh": True, "stale": False}
        assert c.get("/v1/videos/stale").json()["compatible"] is False
        assert c.get("/v1/videos/fresh").json()["compatible"] is True
