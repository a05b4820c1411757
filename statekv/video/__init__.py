"""Video input: choose frames, decode them from files/URLs/file objects, and turn them into Qwen-VL pixels."""

from statekv.video.preprocess import (
    IMAGE_MEAN,
    IMAGE_STD,
    PreprocessedFrames,
    VisionLayout,
    patchify,
    preprocess_frames,
    resize_frames,
    smart_resize,
)
from statekv.video.readers import BACKENDS, open_video
from statekv.video.sampling import FrameSampling, SamplingConfig, sample_frames, sample_source
from statekv.video.source import ClipSource, FramesSource, VideoSource, iter_frame_batches

__all__ = [
    "BACKENDS",
    "ClipSource",
    "FrameSampling",
    "FramesSource",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "PreprocessedFrames",
    "SamplingConfig",
    "VideoSource",
    "VisionLayout",
    "iter_frame_batches",
    "open_video",
    "patchify",
    "preprocess_frames",
    "resize_frames",
    "sample_frames",
    "sample_source",
    "smart_resize",
]
