"""`PrefillSettings`, the one definition of a prefill's settings: flags generated from it, the engine built from
it, and a cache's record read back into it exactly (what a resume continues with)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from statekv import Engine
from statekv.settings import PrefillSettings

PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 84}


@pytest.fixture(scope="module")
def model(tiny_checkpoints) -> str:
    return tiny_checkpoints["qwen2_vl"]


@pytest.mark.parametrize("settings", [
    PrefillSettings(**PIXELS),
    PrefillSettings(policy="full", capacity=None, fps=1.0, layout="video-first", chunks_per_step=2, **PIXELS),
    PrefillSettings(policy="window", capacity=16, max_frames=64, **PIXELS),
    PrefillSettings(policy="statekv", capacity=32, policy_options={"decay": 0.5}, compress_keep=0.25,
                    guidance_prompt="Who is there?", **PIXELS),
    PrefillSettings(policy="infinipot", capacity=40, policy_options={"recent": 0.5, "tar": 0.25},
                    answer_from="state", min_frames=2, **PIXELS),
    PrefillSettings(policy="infinipot", capacity=64, policy_options={"target": 0.5}, **PIXELS),
    PrefillSettings(policy="infinipot-stream", capacity=40, policy_options={"recent": 0.5}, **PIXELS),
], ids=["defaults", "full-video-first", "window", "statekv-decay-compressed", "infinipot-state", "infinipot-target",
        "infinipot-stream"])
def test_the_engine_records_its_settings_and_the_record_reads_back(model, settings):
    """Engine.from_settings(s) records a config whose reading is s again, and an engine built from that reading
    records the same config: a resume continues with exactly the settings the cache was made with."""
    engine = Engine.from_settings(model, settings, device="cpu")
    record = engine.prefill_config().to_dict()
    read = PrefillSettings.from_record(record, vision_batch_frames=settings.vision_batch_frames)
    unset = dict(adapter_options={}, policy_options={})  # a record spells out every option, defaults included
    assert dataclasses.replace(read, **unset) == dataclasses.replace(settings, **unset)
    assert read.policy_settings.items() >= settings.policy_settings.items()
    assert read.adapter_options == engine.adapter.options()
    assert Engine.from_settings(model, read, device="cpu").prefill_config().to_dict() == record
    assert engine.vision_batch_frames == settings.vision_batch_frames
    assert engine.policy.settings().items() >= {"name": settings.policy, **settings.policy_settings}.items()


def test_the_flags_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    PrefillSettings.add_cli_args(parser)
    help_text = " ".join(parser.format_help().split())
    for flag in ("--policy", "--capacity", "--fps", "--max-frames", "--min-pixels", "--chunks-per-step", "--layout",
                 "--answer-from", "--compress-keep", "--guidance-prompt", "--vision-batch-frames",
                 "--attention-backend"):
        assert flag in help_text
    assert "--policy-options" not in help_text and "--adapter-options" not in help_text  # read from a record only
    assert "(default: 4096)" in help_text and "(default: statekv)" in help_text
    args = parser.parse_args(["--capacity", "64", "--layout", "video-first", "--compress-keep", "0.5"])
    assert PrefillSettings.given_flags(args) == {"capacity": 64, "layout": "video-first", "compress_keep": 0.5}
    assert PrefillSettings.from_cli_args(args) == PrefillSettings(capacity=64, layout="video-first",
                                                                  compress_keep=0.5)
    assert PrefillSettings.from_cli_args(parser.parse_args([])) == PrefillSettings()


@pytest.mark.parametrize("values, message", [
    ({"policy": "lru"}, "--policy: unknown policy 'lru'"),
    ({"capacity": 0}, "--capacity must be a positive integer"),
    ({"capacity": None}, "--capacity must be a positive integer"),
    ({"fps": float("nan")}, "--fps must be a positive number"),
    ({"layout": "sideways"}, "--layout: unknown layout"),
    ({"guidance_prompt": "why?"}, "--guidance-prompt needs --compress-keep"),
    ({"compress_keep": 1.5}, r"--compress-keep must be a fraction in \(0, 1\]"),
    ({"compress_keep": 0.5, "answer_from": "state"}, "--answer-from state stores none"),
    ({"vision_batch_frames": 0}, "--vision-batch-frames must be a positive integer"),
])
def test_bad_settings_name_their_flag(values, message):
    with pytest.raises(ValueError, match=message):
        PrefillSettings(**values)


def test_a_resume_refuses_a_recorded_setting_given_otherwise_and_takes_an_unrecorded_one():
    recorded = PrefillSettings(capacity=256, fps=1.0)
    assert recorded.resumed_with({"capacity": 256, "vision_batch_frames": 4}, "c") == \
        dataclasses.replace(recorded, vision_batch_frames=4)
    with pytest.raises(ValueError, match=r"c: --capacity 512 differs from the cache's --capacity 256"):
        recorded.resumed_with({"capacity": 512}, "c")
    full = PrefillSettings(policy="full", capacity=None)
    with pytest.raises(ValueError, match=r"--capacity 8 differs from the cache's --capacity \(not set\)"):
        full.resumed_with({"capacity": 8}, "c")
