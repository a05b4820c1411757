"""Accuracy floors: the regression guard of the proxy evaluation (`statekv eval --proxy --floors`).

A floors file records, for one set of proxy weights (by digest), the held-out set it was measured on (lengths,
videos per length, question types), each setting's measured accuracy, and its floor (the accuracy less a margin of
about one question, so that float-level differences between machines do not fail it). A run against the file
evaluates exactly that set and fails for every setting below its floor — `Full` included: a drop there is statekv
answering differently from the model it serves. Retrained weights need their floors recorded again (the digest says
so), with `--record-floors`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from statekv.proxy import WEIGHTS

FLOORS = WEIGHTS / "floors.json"  # the shipped weights' floors, shipped with them
WEIGHTS_FILE = "model.safetensors"


def weights_digest(model_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) of the checkpoint's weights file: which weights a floors file belongs to."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_floors(path: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """The floors file at `path`, checked to belong to the weights in `model_dir` (ValueError naming both)."""
    try:
        floors = json.loads(Path(path).read_text())
        keys = {"weights", "lengths", "videos_per_length", "types", "floors"}
        if not isinstance(floors, dict) or not keys <= set(floors):
            raise ValueError(f"needs the keys {sorted(keys)}")
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"floors file {str(path)!r}: {err}") from None
    mine = weights_digest(model_dir)
    if floors["weights"] != mine:
        raise ValueError(f"floors file {str(path)!r} was recorded for weights {floors['weights']}, not these "
                         f"({mine}, {model_dir}): record them again with --record-floors")
    return floors


def make_floors(summary: list[dict[str, Any]], *, model_dir: str | Path, lengths: list[int],
                videos_per_length: int, types: list[str], margin: float, command: str) -> dict[str, Any]:
    """A floors record from a run's `FidelityReport.summary()`: each setting's accuracy less `margin`."""
    measured = {row["setting"]: round(row["accuracy"], 4) for row in summary}
    return {"weights": weights_digest(model_dir), "lengths": list(lengths), "videos_per_length": videos_per_length,
            "types": list(types), "margin": margin, "command": command, "measured": measured,
            "floors": {name: round(max(0.0, acc - margin), 4) for name, acc in measured.items()}}


def below_floors(summary: list[dict[str, Any]], floors: dict[str, Any]) -> list[str]:
    """One line per setting of `floors` whose accuracy in `summary` is below its floor (or that did not run)."""
    got = {row["setting"]: row["accuracy"] for row in summary}
    out = []
    for name, floor in floors["floors"].items():
        if name not in got:
            out.append(f"{name}: not evaluated (the floors file lists it)")
        elif got[name] < floor:
            out.append(f"{name}: accuracy {got[name]:.3f} is below its floor {floor:.3f} "
                       f"(recorded {floors.get('measured', {}).get(name, float('nan')):.3f})")
    return out
