"""Qwen2.5-VL: temporal positions follow absolute time, `tokens_per_second` positions per second of video."""

from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration

from statekv.models.base import VideoLMAdapter


class Qwen2_5_VLAdapter(VideoLMAdapter):
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration

    def temporal_offset(self, t: int, second_per_grid_t: float) -> int:
        # same order of operations as the original rule: (t · seconds per patch · tokens per second), truncated
        return int(t * second_per_grid_t * self.config.vision_config.tokens_per_second)
