"""The InternVL and LLaVA-OneVision processors of transformers, run as released except for their video processor.

transformers' video processors need torchvision, which must never be installed here. Everything else of the
family's processor (`__call__`: the chat template's placeholder expansion, tokenisation, pixel packing) runs
unchanged; only its video processor is replaced by a stand-in that returns the adapter's own frame preprocessing
(resize, rescale, normalise from the checkpoint's config) in the layout the real one returns
(`pixel_values_videos` (B, T, 3, h, w)). Tests compare the adapters' token layout with what these give.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


class VideoProcessorStandIn:
    """Called like a transformers video processor: a list of uint8 (T, H, W, 3) videos -> pixel_values_videos."""

    def __init__(self, preprocess: Any) -> None:
        self.preprocess = preprocess  # uint8 (T, H, W, 3) -> float32 (T, 3, h, w)

    def __call__(self, videos: Any, **kwargs: Any) -> dict[str, Any]:
        videos = [videos] if isinstance(videos, np.ndarray) and videos.ndim == 4 else list(videos)
        return {"pixel_values_videos": torch.stack([self.preprocess(np.asarray(v)) for v in videos])}


def _processor_class(base: type) -> type:
    class Processor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> type:
            if argument_name == "video_processor":  # the stand-in is not a registered video processor class
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    Processor.__name__ = base.__name__
    return Processor


def internvl_processor(path: str | os.PathLike, preprocess: Any, *, image_seq_length: int):
    """transformers' InternVLProcessor for the checkpoint at `path` (image processor: GotOcr2, PIL backend)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor

    tokenizer = AutoTokenizer.from_pretrained(path)
    return _processor_class(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil.from_pretrained(path), tokenizer=tokenizer,
        video_processor=VideoProcessorStandIn(preprocess), image_seq_length=image_seq_length,
        chat_template=tokenizer.chat_template)


def llava_onevision_processor(path: str | os.PathLike, preprocess: Any, *, num_image_tokens: int,
                              vision_feature_select_strategy: str):
    """transformers' LlavaOnevisionProcessor for the checkpoint at `path` (image processor: PIL backend)."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    tokenizer = AutoTokenizer.from_pretrained(path)
    return _processor_class(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(path), tokenizer=tokenizer,
        video_processor=VideoProcessorStandIn(preprocess), num_image_tokens=num_image_tokens,
        vision_feature_select_strategy=vision_feature_select_strategy, chat_template=tokenizer.chat_template)


def processor_inputs(processor: Any, frames: np.ndarray, question: str) -> dict[str, torch.Tensor]:
    """The processor's model inputs for one user turn [video, question] with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=text, videos=[frames], return_tensors="pt"))
