"""Qwen2-VL: temporal patches advance the temporal position by one."""

from __future__ import annotations

import torch
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from statekv.models.qwen_vl import QwenVLAdapter


class Qwen2VLAdapter(QwenVLAdapter):
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor

    def temporal_interval(self, second_per_grid_t: float) -> torch.Tensor:
        return torch.tensor(1.0)
