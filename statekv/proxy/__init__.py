"""The proxy model: a tiny Qwen2-VL trained here (jobs/train_proxy.py) on a synthetic task whose answers sit in
known frames (statekv/proxy/task.py), shipped with the package so that accuracy — not only agreement with `Full`
— can be measured without a hub, a data set or a GPU; `evaluate` (statekv/proxy/evaluate.py) measures it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "weights" / "qwen2_vl"  # the shipped checkpoint (save_pretrained)
TRAINING_RECORD = "training.json"  # in WEIGHTS: script, seed, steps, wall time, machine, held-out accuracy


def checkpoint_path() -> Path:
    """The shipped proxy checkpoint's directory (loads with `Engine.from_pretrained`)."""
    if not (WEIGHTS / "config.json").exists():
        raise FileNotFoundError(f"the proxy weights are missing from {WEIGHTS}: this install lacks the package "
                                "data; retrain them with `python -m jobs.train_proxy`")
    return WEIGHTS


def training_record(path: Path | None = None) -> dict[str, Any]:
    """How the checkpoint at `path` (default: the shipped one) was trained, and its held-out accuracy."""
    with open((path or checkpoint_path()) / TRAINING_RECORD) as f:
        return json.load(f)
