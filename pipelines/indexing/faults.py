"""Fault injection for indexing runs, through the actors' per-video hook (IndexConfig.video_hook).

    IndexConfig(..., video_hook="pipelines.indexing.faults:inject",
                video_hook_args={"faults": {"clip-7": "oom", "clip-9": "no_decoder"}})

Each kind reproduces, inside the real actor process and before the video is indexed, a failure seen on real runs:

- "oom": the accelerator's out-of-memory error (`torch.OutOfMemoryError`, a RuntimeError), as a long video
  raises it on a small GPU;
- "no_decoder": the decord module is made unimportable in this process for this video (`sys.modules["decord"] =
  None`, Python's own way of blocking an import), so the decoder raises the ImportError of a missing backend
  when the video is opened; the next video gets decord back;
- "error": a plain ValueError, standing for any unforeseen bug.

The run must turn each into that video's failed row and go on (tests/pipelines/test_indexing.py).
"""

from __future__ import annotations

import sys
from typing import Any

KINDS = ("oom", "no_decoder", "error")
_saved: dict[str, Any] = {}  # {"decord": its module (or None)} while decord is blocked for one video


def inject(row: dict[str, Any], *, faults: dict[str, str]) -> None:
    """Raise (or arm) the fault planned for `row`'s video id in `faults` ({video_id: kind}); nothing otherwise."""
    if "decord" in _saved:  # a previous video blocked decord: give it back
        module = _saved.pop("decord")
        if module is None:
            sys.modules.pop("decord", None)
        else:
            sys.modules["decord"] = module
    kind = faults.get(row["video_id"])
    if kind is None:
        return
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r} for {row['video_id']!r}; valid faults: {', '.join(KINDS)}")
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (injected for "
                                     f"{row['video_id']})")
    if kind == "no_decoder":
        _saved["decord"] = sys.modules.get("decord")
        sys.modules["decord"] = None  # type: ignore[assignment]  # `import decord` now raises ImportError
        return
    raise ValueError(f"injected bug for {row['video_id']}")
