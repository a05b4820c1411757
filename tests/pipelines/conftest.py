"""Fixtures of the serving tests: the tiny Qwen2-VL engine they share, and services that unwrap their counters."""

from __future__ import annotations

import pytest

from statekv import Engine
from statekv.video import SamplingConfig

SAMPLING = SamplingConfig(min_pixels=28 * 28, max_pixels=56 * 84)


def _make_engine(path: str) -> Engine:
    return Engine.from_pretrained(path, device="cpu", sampling=SAMPLING)


@pytest.fixture(scope="session")
def make_engine():
    """Engine.from_pretrained(path) with the tiny frame sizes of these tests."""
    return _make_engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    return _make_engine(tiny_checkpoints["qwen2_vl"])


@pytest.fixture
def make_service(engine):
    """QueryService(engine, ...) factory; the call-counting wrappers it puts on the shared engine go afterwards."""
    from pipelines.serving.service import QueryService

    def make(root, **kwargs) -> QueryService:
        return QueryService(engine, root, **kwargs)

    yield make
    engine.adapter.__dict__.pop("video_features", None)
    engine.__dict__.pop("prefill", None)
