"""Frame sampling: the qwen-vl-utils fps recipe, clamps, even counts, timestamps and empty videos."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from statekv.errors import EmptyVideoError, VideoError
from statekv.video import FrameSampling, SamplingConfig, sample_frames


def reference_nframes(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    """qwen-vl-utils `smart_nframes`, restated from its published source."""
    min_n = math.ceil(min_frames / 2) * 2
    max_n = math.floor(min(max_frames, total) / 2) * 2
    n = min(min(max(total / video_fps * fps, min_n), max_n), total)
    return math.floor(n / 2) * 2


@pytest.mark.parametrize(
    ("total", "video_fps", "expected"),
    [
        (300, 30.0, 20),  # 10 s at 2 fps
        (250, 25.0, 20),
        (37, 10.0, 6),  # 3.7 s -> 7.4 frames, floored to even
        (125, 25.0, 10),
        (30, 30.0, 4),  # 1 s -> 2 frames, clamped up to min_frames
        (30 * 3600, 30.0, 7200),  # an hour at 2 fps: no cap by default
        (4, 30.0, 4),
        (5, 30.0, 4),  # clamped to the video, then floored to even
    ],
)
def test_frame_counts(total: int, video_fps: float, expected: int) -> None:
    sampling = sample_frames(total, video_fps, SamplingConfig())
    assert sampling.num_frames == expected
    assert sampling.indices.dtype == np.int64
    np.testing.assert_array_equal(sampling.indices, np.linspace(0, total - 1, expected).round().astype(np.int64))


def test_matches_reference_recipe_on_a_grid() -> None:
    for fps, min_frames, max_frames in [(2.0, 4, 768), (1.0, 4, 16), (0.5, 8, 64), (4.0, 4, 7)]:
        config = SamplingConfig(fps=fps, min_frames=min_frames, max_frames=max_frames)
        for video_fps in (23.976, 25.0, 29.97, 30.0, 60.0):
            for total in (8, 9, 17, 100, 333, 1001, 12345):
                sampling = sample_frames(total, video_fps, config)
                expected = reference_nframes(total, video_fps, fps, min_frames, max_frames)
                assert sampling.num_frames == expected, (config, video_fps, total)
                assert sampling.num_frames % 2 == 0 and sampling.num_frames >= 2
                assert np.all(np.diff(sampling.indices) >= 0)
                assert sampling.indices[0] == 0 and sampling.indices[-1] == total - 1


def test_odd_max_frames_rounds_down_to_even() -> None:
    sampling = sample_frames(10_000, 30.0, SamplingConfig(min_frames=3, max_frames=7))
    assert sampling.num_frames == 6


@pytest.mark.parametrize(
    ("total", "expected"),
    [(1, [0, 0]), (2, [0, 1]), (3, [0, 1, 2, 2])],
)
def test_videos_shorter_than_min_frames_take_every_frame(total: int, expected: list[int]) -> None:
    """A video shorter than min_frames gives all its frames, the last repeated to make the count even."""
    sampling = sample_frames(total, 30.0, SamplingConfig())
    assert sampling.indices.tolist() == expected


def test_timestamps_and_rates() -> None:
    sampling = sample_frames(300, 30.0, SamplingConfig(fps=2.0))
    assert isinstance(sampling, FrameSampling)
    np.testing.assert_allclose(sampling.timestamps, sampling.indices / 30.0)
    assert sampling.timestamps.dtype == np.float64
    assert sampling.video_fps == 30.0 and sampling.total_frames == 300
    assert sampling.sampled_fps == pytest.approx(20 / 300 * 30.0)
    assert sampling.second_per_grid_t == pytest.approx(1.0)  # 2 frames at 2 fps


def test_result_is_read_only() -> None:
    sampling = sample_frames(300, 30.0, SamplingConfig())
    with pytest.raises(ValueError):
        sampling.indices[0] = 5


def test_no_frames_is_an_empty_video() -> None:
    with pytest.raises(EmptyVideoError, match="clip.mp4"):
        sample_frames(0, 30.0, SamplingConfig(), source="clip.mp4")


@pytest.mark.parametrize("video_fps", [0.0, -1.0, float("nan")])
def test_bad_frame_rate(video_fps: float) -> None:
    with pytest.raises(VideoError, match="frame rate"):
        sample_frames(100, video_fps, SamplingConfig())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fps": 0.0}, "fps"),
        ({"fps": float("inf")}, "fps"),
        ({"min_frames": 0}, "min_frames"),
        ({"max_frames": -4}, "max_frames"),
        ({"min_frames": 10, "max_frames": 8}, "min_frames"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"min_pixels": 1000, "max_pixels": 999}, "min_pixels"),
        ({"max_frames": 2.5}, "max_frames"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_max_frames_defaults_to_no_cap() -> None:
    """An hour asked at 2 fps is sampled at 2 fps (the old default silently gave 0.21 fps)."""
    sampling = sample_frames(30 * 3600, 30.0, SamplingConfig(fps=2.0))
    assert SamplingConfig().max_frames is None
    assert sampling.num_frames == 7200 and not sampling.capped
    assert sampling.requested_fps == sampling.sampled_fps == pytest.approx(2.0)


def test_max_frames_that_lowers_the_fps_warns_and_records_both(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="statekv.video.sampling"):
        sampling = sample_frames(30 * 600, 30.0, SamplingConfig(fps=2.0, max_frames=768), source="ten.mp4")
    assert sampling.num_frames == 768 and sampling.capped
    assert sampling.requested_fps == 2.0 and sampling.sampled_fps == pytest.approx(1.28)
    [record] = caplog.records
    assert "ten.mp4" in record.message and "max_frames=768" in record.message and "1.28 fps" in record.message


def test_max_frames_above_the_need_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sampling = sample_frames(300, 30.0, SamplingConfig(fps=2.0, max_frames=768))
    assert sampling.num_frames == 20 and not sampling.capped and not caplog.records
    assert sampling.sampled_fps == pytest.approx(2.0)


# Phone-style variable frame rate: 30 fps for 1 s, then one frame every 0.2 s for 4 s (average 12.2 fps).
VFR_TIMES = np.concatenate([np.arange(30) / 30.0, 1.0 + 0.2 * np.arange(21)])


def test_variable_frame_rate_is_sampled_uniformly_in_time() -> None:
    sampling = sample_frames(len(VFR_TIMES), len(VFR_TIMES) / 5.0, SamplingConfig(fps=2.0), frame_times=VFR_TIMES)
    assert sampling.num_frames == 10 and sampling.duration == pytest.approx(5.2)  # the last frame shows 0.2 s
    np.testing.assert_allclose(sampling.timestamps, VFR_TIMES[sampling.indices])  # stamped by presentation time
    uniform = np.linspace(0.0, VFR_TIMES[-1], 10)
    assert np.abs(sampling.timestamps - uniform).max() <= 0.1 + 1e-9  # the nearest frame to each uniform time
    assert sampling.timestamps[-1] == pytest.approx(5.0) and sampling.timestamps[0] == 0.0
    assert sampling.sampled_fps == pytest.approx(10 / 5.2) and sampling.requested_fps == 2.0
    by_index = sample_frames(len(VFR_TIMES), len(VFR_TIMES) / 5.0, SamplingConfig(fps=2.0))
    assert np.abs(VFR_TIMES[by_index.indices] - uniform).max() > 1.0  # what frame-index sampling gave


def test_frame_times_of_a_constant_rate_match_the_index_recipe() -> None:
    times = np.arange(301) / 30.0 + 7.0  # a stream that starts at 7 s: times are taken from its first frame
    with_times = sample_frames(301, 30.0, SamplingConfig(fps=2.0), frame_times=times)
    without = sample_frames(301, 30.0, SamplingConfig(fps=2.0))
    np.testing.assert_array_equal(with_times.indices, without.indices)
    np.testing.assert_allclose(with_times.timestamps, without.timestamps)


def test_bad_frame_times_are_a_video_error() -> None:
    with pytest.raises(VideoError, match="clip.mp4.*frame times"):
        sample_frames(3, 30.0, SamplingConfig(), frame_times=np.array([0.0, 0.2, 0.1]), source="clip.mp4")
