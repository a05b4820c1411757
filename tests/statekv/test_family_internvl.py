"""InternVL3 (HF-native, model_type "internvl"): token layout, vision, exactness and long-video RoPE on a tiny
random checkpoint (InternViT depth 2, pixel shuffle, Qwen2 text stack; 16 tokens per 112² frame)."""

from __future__ import annotations

import pytest
import torch

from statekv.testing import family_1d_checks as checks
from statekv.testing.checkpoints import save_family_checkpoint
from statekv.testing.videos import synthetic_frames, write_video

FAMILY = "internvl"
QUESTION = "What happens after the dog enters?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(save_family_checkpoint(tmp_path_factory.mktemp("ckpt") / FAMILY, FAMILY))


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return checks.load(checkpoint)


@pytest.mark.parametrize("num_frames", [1, 3, 11])
@torch.inference_mode()
def test_layout_is_the_processors(adapter, checkpoint, num_frames):
    """`Frame{i}: <img>…</img>` per frame, two-digit frame numbers included, equal InternVLProcessor's output."""
    frames = synthetic_frames(num_frames, 60, 90, seed=1)
    checks.check_layout_matches_processor(adapter, checkpoint, frames, QUESTION)
    checks.check_layout_matches_processor(adapter, checkpoint, frames, "\n  a question\nstarting with a newline ")


def test_frame_text_and_preprocessing_come_from_the_checkpoint(adapter):
    before, after = adapter.frame_text(9)
    tok = adapter.tokenizer
    assert tok.decode(before) == "\nFrame10: <img>" and tok.decode(after) == "</img>"
    assert adapter.pixels.image_mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet, from the config
    assert adapter.pixels.size == (112, 112)


@torch.inference_mode()
def test_vision_per_chunk_equals_whole_video(adapter):
    checks.check_vision_per_chunk(adapter, synthetic_frames(5, 60, 90, seed=2))


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
def test_full_equals_one_forward_of_the_plain_model(checkpoint, layout):
    frames = synthetic_frames(4, 60, 90, seed=4)
    report = checks.check_full_equals_transformers(checkpoint, frames, layout)
    assert report.context_tokens >= 4 * 16


def test_statekv_and_window_covering_the_video_equal_full(checkpoint):
    checks.check_capacity_covering_the_video_equals_full(checkpoint, synthetic_frames(4, 60, 90, seed=5), QUESTION)


def test_store_and_service_answer_like_the_in_memory_cache(checkpoint, tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, synthetic_frames(12, 64, 96, seed=7), fps=4.0)  # 3 s -> 6 frames at 2 fps
    checks.check_store_and_service(checkpoint, str(video), QUESTION, str(tmp_path / "caches"))


def test_dynamic_ntk_rope_past_max_position_embeddings(tmp_path):
    """A tiny config with max_position_embeddings 64 and a sequence of ~100 tokens: the documented rule."""
    path = save_family_checkpoint(tmp_path / "short", FAMILY, max_position_embeddings=64)
    got = checks.check_dynamic_ntk(path, synthetic_frames(4, 60, 90, seed=8), QUESTION)
    assert got["planned_length"] > got["max_positions"] and got["theta"] > 10000.0


def test_rope_option_is_recorded_with_the_cache(tmp_path):
    path = save_family_checkpoint(tmp_path / "short", FAMILY, max_position_embeddings=64)
    checks.check_rope_option_is_recorded(path, synthetic_frames(4, 60, 90, seed=9))
