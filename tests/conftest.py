"""Shared fixtures: tiny random checkpoints written with save_pretrained, short synthetic videos."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """{family: path} of tiny random Qwen2-VL and Qwen2.5-VL checkpoints with a local tokenizer."""
    from statekv.testing.checkpoints import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: str(save_tiny_checkpoint(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(request, tiny_checkpoints) -> str:
    """Each tiny checkpoint in turn."""
    return tiny_checkpoints[request.param]
