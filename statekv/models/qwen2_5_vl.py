"""Qwen2.5-VL: temporal positions follow absolute time, `tokens_per_second` positions per second of video."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from statekv.models.qwen_vl import QwenVLAdapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor

    def temporal_interval(self, second_per_grid_t: float) -> torch.Tensor:
        # as get_rope_index: tokens_per_second (int) * second_per_grid_ts (the processor's float32 tensor)
        return self.config.vision_config.tokens_per_second * torch.tensor(second_per_grid_t, dtype=torch.float32)

