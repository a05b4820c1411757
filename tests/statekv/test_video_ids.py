"""One video-id rule everywhere: `validate_video_id`, `is_valid_video_id` and `VIDEO_ID_PATTERN` agree."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statekv.video_ids import VIDEO_ID_PATTERN, is_valid_video_id, validate_video_id

IDS = st.text(alphabet="ab.-_ /%\\x0Z9é", max_size=130) | st.sampled_from(
    ["parts-1", "a.", "a" * 120, "a" * 121, "my video", "clip", ".hidden", "-x", "x--y-1234"])


@given(IDS)
def test_the_pattern_the_predicate_and_the_validator_are_one_rule(video_id):
    try:
        validate_video_id(video_id)
        valid = True
    except ValueError:
        valid = False
    assert is_valid_video_id(video_id) == valid
    assert (re.fullmatch(VIDEO_ID_PATTERN, video_id) is not None) == valid


@pytest.mark.parametrize("bad", ["my video", "parts-abc", "a.", "a" * 121, "", "../x"])
def test_unsafe_ids_are_refused(bad):
    assert not is_valid_video_id(bad)
