"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): ReKV's and StreamKV's family.

A chunk is one frame: SigLIP on the 384² frame, the projector, then 2x2 bilinear pooling give ceil(p/2)² tokens
(p = image_size / patch_size; 196 for 384 / 14). `LlavaOnevisionProcessor` expands the template's single `<video>`
into T·ceil(p/2)² + 1 `<video>` tokens: the model fills them with every frame's pooled features and then ONE
`image_newline` embedding after the last frame (`get_video_features`). A chunk's tokens are its frame's features
(no per-frame text); the image_newline belongs to what follows the video, so a resumed stream stays exact: it is
placed at answer time, at the position after the last frame, before the rest of the user turn.
Positions are the sequence's 1-D arange (see single_frame.py).

The whole-video tokens (what the plain model is checked against) are the installed processor's own
(`LlavaOnevisionProcessor.replace_video_token`, put into the template by its `get_text_with_replacements`); the
adapter checks at load that the processor gives one frame `ceil(p/2)² + 1` tokens, as the chunks assume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from statekv.models.processor_text import text_only
from statekv.models.single_frame import SingleFrameAdapter


class LlavaOnevisionAdapter(SingleFrameAdapter):
    model_type = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    default_size = 384

    def __init__(self, model: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.video_token_id = self.config.video_token_id
        vision = self.config.vision_config
        if tuple(self.pixels.size) != (vision.image_size, vision.image_size):
            raise ValueError(f"model {self.name_or_path!r}: preprocessor size {self.pixels.size} is not the vision "
                             f"tower's image_size {vision.image_size} (the 2x2 pooling assumes it)")
        self._k = math.ceil(vision.image_size // vision.patch_size / 2) ** 2
        self.processor = text_only(LlavaOnevisionProcessor, tokenizer,
                                   num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                                   vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        one = self.text_ids(self.video_text(1))
        if one != [self.video_token_id] * (self._k + 1):
            raise ValueError(f"model {self.name_or_path!r}: the installed transformers' LlavaOnevisionProcessor gives "
                             f"one frame {len(one)} tokens, this adapter {self._k} + 1 (image_newline); statekv does "
                             "not support this transformers")

    @property
    def vision_tokens_per_frame(self) -> int:
        return self._k

    def frame_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_video_features(pixel_values_videos=pixels.to(self.device, self.dtype)[None],
                                                  return_dict=True)
        feats = out.pooler_output[0, :-1]  # (T·k, hidden): drop the image_newline get_video_features appends
        return feats.reshape(pixels.shape[0], self._k, -1).to(self.dtype)

    def frame_text(self, index: int) -> tuple[list[int], list[int]]:
        return [], []

    def after_video(self) -> torch.Tensor:
        return self.model.model.image_newline.to(self.device, self.dtype).view(1, -1)

    # --- the plain model's inputs ------------------------------------------------------------------------

