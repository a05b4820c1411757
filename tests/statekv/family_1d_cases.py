"""The test cases InternVL3 and LLaVA-OneVision share: a family's test file subclasses `SingleFrameFamilyCases` as
`Test<Family>` and sets `FAMILY` (the checks themselves are in statekv/testing/family_1d_checks.py). Not collected
itself (no test_ prefix); imported by name, as pytest puts this folder on sys.path."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from pipelines.serving.service import QueryService
from statekv.testing import family_1d_checks as checks
from statekv.testing.checkpoints import save_family_checkpoint
from statekv.testing.videos import synthetic_frames, write_video

QUESTION = "What happens after the dog enters?"
ODD_QUESTION = "\n  a question\nstarting with a newline "


class SingleFrameFamilyCases:
    FAMILY: ClassVar[str]

    @pytest.fixture(scope="class")
    def checkpoint(self, tmp_path_factory) -> str:
        return str(save_family_checkpoint(tmp_path_factory.mktemp("ckpt") / self.FAMILY, self.FAMILY))

    @pytest.fixture(scope="class")
    def short_checkpoint(self, tmp_path_factory) -> str:
        """max_position_embeddings 64: the test sequences (~100 tokens) run past it."""
        path = tmp_path_factory.mktemp("short") / self.FAMILY
        return str(save_family_checkpoint(path, self.FAMILY, max_position_embeddings=64))

    @pytest.fixture(scope="class")
    def adapter(self, checkpoint):
        return checks.load(checkpoint)

    @pytest.mark.parametrize("num_frames", [1, 3, 11])
    @torch.inference_mode()
    def test_layout_is_the_processors(self, adapter, checkpoint, num_frames):
        """Token for token and pixel for pixel the family's transformers processor (two-digit frames included)."""
        frames = synthetic_frames(num_frames, 60, 90, seed=1)
        checks.check_layout_matches_processor(adapter, checkpoint, frames, QUESTION)
        checks.check_layout_matches_processor(adapter, checkpoint, frames, ODD_QUESTION)

    @torch.inference_mode()
    def test_vision_per_chunk_equals_whole_video(self, adapter):
        checks.check_vision_per_chunk(adapter, synthetic_frames(5, 60, 90, seed=2))

    @pytest.mark.parametrize("layout, chunks_per_step", [("prefix-first", 1), ("video-first", 1), ("prefix-first", 3)])
    def test_full_equals_one_forward_of_the_plain_model(self, checkpoint, layout, chunks_per_step):
        """5 frames; with 3 chunks per step the last step holds 2."""
        frames = synthetic_frames(5, 60, 90, seed=4)
        report = checks.check_full_equals_transformers(checkpoint, frames, layout, chunks_per_step)
        assert report.context_tokens >= 5 * 16

    def test_statekv_and_window_covering_the_video_equal_full(self, checkpoint):
        checks.check_capacity_covering_the_video_equals_full(checkpoint, synthetic_frames(4, 60, 90, seed=5),
                                                             QUESTION)

    def test_store_and_service_answer_like_the_in_memory_cache(self, checkpoint, tmp_path):
        video = tmp_path / "clip.mp4"
        write_video(video, synthetic_frames(12, 64, 96, seed=7), fps=4.0)  # 3 s -> 6 frames at 2 fps
        root = str(tmp_path / "caches")
        engine, expected = checks.check_store(checkpoint, str(video), QUESTION, root)
        service = QueryService(engine, root)
        answer = service.ask(video_id="clip", question=QUESTION, max_new_tokens=5)
        assert answer["token_ids"] == expected.token_ids and answer["answer"] == expected.text
        assert service.counters["vision_tower_calls"] == 0 and service.counters["prefill_calls"] == 0

    def test_dynamic_ntk_rope_past_max_position_embeddings(self, short_checkpoint):
        got = checks.check_dynamic_ntk(short_checkpoint, synthetic_frames(4, 60, 90, seed=8), QUESTION)
        assert got["planned_length"] > got["max_positions"] and got["theta"] > 10000.0

    def test_a_checkpoints_own_dynamic_rope_is_followed(self, tmp_path):
        path = save_family_checkpoint(tmp_path / "dynamic", self.FAMILY, max_position_embeddings=64, rope_factor=2.0)
        checks.check_checkpoint_dynamic_rope(path, synthetic_frames(3, 60, 90, seed=10), QUESTION)

    def test_rope_option_is_recorded_with_the_cache(self, short_checkpoint):
        checks.check_rope_option_is_recorded(short_checkpoint, synthetic_frames(4, 60, 90, seed=9))
