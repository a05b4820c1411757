"""Checks shared by the InternVL3 and LLaVA-OneVision family tests (one frame per chunk, 1-D RoPE).

Each takes a loaded adapter (and its checkpoint directory) and raises AssertionError with what differs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from statekv.testing.hf_processors import family_processor, processor_inputs


def check_layout_matches_processor(adapter: Any, path: str | os.PathLike, frames: np.ndarray, question: str) -> None:
    """The adapter's sequence (reference_inputs, and prefix + chunk tokens + answer prompt) is token for token and
    pixel for pixel what the family's own transformers processor gives for the same frames and question."""
    expected = processor_inputs(family_processor(path, adapter.preprocess), frames, question)
    got = adapter.reference_inputs(frames, question, "prefix-first", adapter.pixels.size, 1.0)
    assert got["input_ids"].tolist() == expected["input_ids"].tolist(), "input_ids differ from the processor's"
    pixels = "pixel_values" if "pixel_values" in got else "pixel_values_videos"
    assert torch.equal(got[pixels], expected[pixels]), f"{pixels} differ from the processor's"
    # the same sequence assembled the way the engine does it: prefix, each frame's chunk tokens, answer prompt
    ids = expected["input_ids"][0].tolist()
    streamed = adapter.prefix_ids("prefix-first").tolist()
    placeholder = adapter.image_token_id if hasattr(adapter, "image_token_id") else adapter.video_token_id
    for i in range(len(frames)):
        before, after = adapter.frame_text(i)
        streamed += before + [placeholder] * adapter.vision_tokens_per_frame + after
    streamed += [placeholder] * len(adapter.after_video())
    streamed += adapter.question_ids(question, "prefix-first").tolist()
    assert streamed == ids, "prefix + chunk tokens + answer prompt differ from the processor's sequence"


def check_vision_per_chunk(adapter: Any, frames: np.ndarray) -> None:
    """Vision features frame by frame equal those of the whole video at once."""
    whole = adapter.video_features(frames, adapter.pixels.size)
    parts = torch.cat([adapter.video_features(frames[i:i + 1], adapter.pixels.size) for i in range(len(frames))])
    assert whole.shape == (len(frames) * adapter.vision_tokens_per_frame, whole.shape[-1])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)


def load(path: str | os.PathLike, **adapter_options: Any) -> Any:
    """The checkpoint behind its adapter, loaded as the engine loads it (CPU, float32)."""
    from statekv.models import load_adapter

    return load_adapter(path, device="cpu", dtype=torch.float32, adapter_options=adapter_options or None)
