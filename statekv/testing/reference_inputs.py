"""The plain transformers model's inputs for a clip, as each family's own processor lays them out: input_ids with
the family's placeholder tokens, pixel values, grids, mm_token_type_ids ...

The reference side of every exactness check (`statekv.testing.reference`): statekv's streamed prefill is compared
with ONE forward of the plain model over these inputs, the model computing its own positions. It lives here, not
in the adapter contract, because answering and prefill never need it; one builder per family, chosen by the
adapter's class (most specific first).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from statekv.models.base import VideoLMAdapter
from statekv.models.internvl import InternVLAdapter
from statekv.models.llava_onevision import LlavaOnevisionAdapter
from statekv.models.qwen2_5_vl import Qwen2_5_VLAdapter
from statekv.models.qwen3_vl import Qwen3VLAdapter
from statekv.models.qwen_vl import QwenVLAdapter


def reference_inputs(adapter: VideoLMAdapter, frames: np.ndarray, question: str, layout: str,
                     frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
    """The plain model's inputs for `frames` (sampled at `sampled_fps`, resized to `frame_size`) and `question` in
    `layout`: the same sequence statekv streams."""
    for cls, build in _BUILDERS:
        if isinstance(adapter, cls):
            return build(adapter, frames, question, layout, tuple(frame_size), sampled_fps)
    raise NotImplementedError(f"no reference inputs for {type(adapter).__name__}")


def _qwen3_vl(a: Qwen3VLAdapter, frames: np.ndarray, question: str, layout: str, frame_size: tuple[int, int],
              sampled_fps: float) -> dict[str, Any]:
    """What transformers' own `Qwen3VLProcessor` gives (see statekv.testing.qwen3_vl_reference)."""
    from statekv.testing.qwen3_vl_reference import load_reference_processor, processor_inputs

    processor = load_reference_processor(a.name_or_path)
    return processor_inputs(processor, frames, list(range(len(frames))), sampled_fps, question, layout=layout,
                            frame_size=frame_size, template_kwargs=a.template_kwargs()).as_model_inputs()


def _qwen_vl(a: QwenVLAdapter, frames: np.ndarray, question: str, layout: str, frame_size: tuple[int, int],
             sampled_fps: float) -> dict[str, Any]:
    """As the installed processor lays a video out (`replace_video_token` for the video's grid, put into the
    template by `get_text_with_replacements`)."""
    pre = a._pixels(frames, frame_size)
    video = a.processor.replace_video_token({"video_grid_thw": torch.tensor([pre.grid_thw])}, 0)
    if layout == "prefix-first":
        before, after = a.split_template(question)
        ids = before + a.text_ids(video) + after
    else:
        ids = a.prefix_ids(layout).tolist() + a.text_ids(video) + a.question_ids(question, layout).tolist()
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": pre.pixel_values, "video_grid_thw": torch.tensor([pre.grid_thw]),
            "mm_token_type_ids": (input_ids == a.video_token_id).long() * 2}


def _qwen2_5_vl(a: Qwen2_5_VLAdapter, frames: np.ndarray, question: str, layout: str, frame_size: tuple[int, int],
                sampled_fps: float) -> dict[str, Any]:
    """Qwen2-VL's inputs plus `second_per_grid_ts` (Qwen2_5_VLProcessor: temporal_patch_size / fps)."""
    inputs = _qwen_vl(a, frames, question, layout, frame_size, sampled_fps)
    inputs["second_per_grid_ts"] = torch.tensor([a.vision.temporal_patch_size / sampled_fps], dtype=torch.float32)
    return inputs


def _internvl(a: InternVLAdapter, frames: np.ndarray, question: str, layout: str, frame_size: tuple[int, int],
              sampled_fps: float) -> dict[str, Any]:
    """As InternVLProcessor gives them: the video's frames become `pixel_values` (T, 3, h, w)."""
    input_ids = torch.tensor([a.sequence_ids(question, layout, len(frames))], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": a.preprocess(frames)}


def _llava_onevision(a: LlavaOnevisionAdapter, frames: np.ndarray, question: str, layout: str,
                     frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
    """As LlavaOnevisionProcessor gives them: `pixel_values_videos` (1, T, 3, h, w)."""
    input_ids = torch.tensor([a.sequence_ids(question, layout, len(frames))], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": a.preprocess(frames)[None]}


_BUILDERS = [(Qwen3VLAdapter, _qwen3_vl), (Qwen2_5_VLAdapter, _qwen2_5_vl), (QwenVLAdapter, _qwen_vl),
             (InternVLAdapter, _internvl), (LlavaOnevisionAdapter, _llava_onevision)]
