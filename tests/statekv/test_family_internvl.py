"""InternVL3 (HF-native, model_type "internvl") on a tiny random checkpoint (InternViT depth 2, pixel shuffle,
Qwen2 text stack; 16 tokens per 112² frame): the shared single-frame cases plus its per-frame text."""

from __future__ import annotations

import pytest

from tests.statekv.family_1d_cases import SingleFrameFamilyCases


class TestInternVL(SingleFrameFamilyCases):
    FAMILY = "internvl"

    def test_frame_text_and_preprocessing_come_from_the_checkpoint(self, adapter):
        before, after = adapter.frame_text(9)
        assert adapter.tokenizer.decode(before) == "\nFrame10: <img>"
        assert adapter.tokenizer.decode(after) == "</img>"
        assert adapter.after_video().shape[0] == 0
        assert adapter.pixels.image_mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet, from the config
        assert adapter.pixels.size == (112, 112)
