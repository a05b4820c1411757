"""The InternVL and LLaVA-OneVision processors of transformers, run as released except for their video processor.

transformers' video processors need torchvision, which must never be installed here. Everything else of the
family's processor (`__call__`: the chat template's placeholder expansion, tokenisation, pixel packing) runs
unchanged; only its video processor is replaced by a stand-in that returns the adapter's own frame preprocessing
(resize, rescale, normalise from the checkpoint's config) in the layout the real one returns
(`pixel_values_videos` (B, T, 3, h, w)). Tests compare the adapters' token layout with what these give.
"""

from __future__ import annotations

import json
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


def family_processor(path: str | os.PathLike, preprocess: Any):
    """transformers' processor for the checkpoint at `path`, built from its processor_config.json (InternVL:
    `image_seq_length`; LLaVA-OneVision: `num_image_tokens`, `vision_feature_select_strategy`), its tokenizer, its
    image processor (PIL backend) and the video stand-in."""
    from transformers import (AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor)

    with open(os.path.join(path, "processor_config.json")) as f:
        settings = json.load(f)
    classes = {"InternVLProcessor": (InternVLProcessor, GotOcr2ImageProcessorPil, ("image_seq_length",)),
               "LlavaOnevisionProcessor": (LlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil,
                                           ("num_image_tokens", "vision_feature_select_strategy",
                                            "vision_aspect_ratio"))}
    name = settings.get("processor_class")
    if name not in classes:
        raise ValueError(f"{path}: processor_class {name!r} is not one of {', '.join(classes)}")
    processor_cls, image_cls, keys = classes[name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _processor_class(processor_cls)(
        image_processor=image_cls.from_pretrained(path), tokenizer=tokenizer,
        video_processor=VideoProcessorStandIn(preprocess), chat_template=tokenizer.chat_template,
        **{key: settings[key] for key in keys if key in settings})


def processor_inputs(processor: Any, frames: np.ndarray, question: str) -> dict[str, torch.Tensor]:
    """The processor's model inputs for one user turn [video, question] with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=text, videos=[frames], return_tensors="pt"))
