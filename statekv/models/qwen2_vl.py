"""Qwen2-VL: temporal patches advance the temporal position by one."""

from __future__ import annotations

from transformers import Qwen2VLForConditionalGeneration

from statekv.models.base import VideoLMAdapter


class Qwen2VLAdapter(VideoLMAdapter):
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration

    def temporal_offset(self, t: int, second_per_grid_t: float) -> int:
        return t
