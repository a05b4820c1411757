"""LLaVA-OneVision on a tiny random checkpoint (SigLIP depth 2, 2x2 pooling, Qwen2 text stack; 16 tokens per 112²
frame and one image_newline after the video): the shared single-frame cases plus its image_newline."""

from __future__ import annotations

import pytest
import torch

from tests.statekv.family_1d_cases import SingleFrameFamilyCases


class TestLlavaOnevision(SingleFrameFamilyCases):
    FAMILY = "llava_onevision"

    def test_image_newline_follows_the_video_and_preprocessing_comes_from_the_checkpoint(self, adapter):
        assert adapter.frame_text(3) == ([], [])
        newline = adapter.after_video()
        assert newline.shape == (1, adapter.config.text_config.hidden_size)
        assert torch.equal(newline[0], adapter.model.model.image_newline)
        assert adapter.pixels.image_mean == pytest.approx((0.5, 0.5, 0.5))  # SigLIP, from the config
        assert adapter.pixels.size == (112, 112)
