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

    def test_the_whole_video_text_is_the_installed_processors(self, adapter):
        """`video_text` (the reference sequence) is `InternVLProcessor.replace_video_token`'s, not a copy."""
        from transformers import InternVLProcessor

        assert isinstance(adapter.processor, InternVLProcessor)
        text = adapter.video_text(2)
        k = adapter.vision_tokens_per_frame
        assert text == "\n".join(f"Frame{i}: <img>{'<IMG_CONTEXT>' * k}</img>" for i in (1, 2))

    def test_a_frame_layout_the_processor_does_not_build_refuses_to_load(self, adapter, monkeypatch):
        """The adapter's own per-frame text is checked against the installed processor when it loads: a layout that
        differs (here one space more) refuses, in one line, instead of giving answers on a foreign sequence."""
        cls = type(adapter)
        real = cls.frame_text
        monkeypatch.setattr(cls, "frame_text", lambda self, i: (self.text_ids(" ") + real(self, i)[0], real(self, i)[1]))
        with pytest.raises(ValueError, match="InternVLProcessor lays frames out as .*statekv does not support") as err:
            cls(adapter.model, adapter.tokenizer, name_or_path=adapter.name_or_path, preprocessor=adapter.preprocessor)
        assert "\n" not in str(err.value).replace("\\n", "")
