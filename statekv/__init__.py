"""statekv: linear-time streaming prefill of long videos into reusable KV caches, and answering from them.

    engine = statekv.Engine.from_pretrained(path, policy=statekv.policies.StateKV(capacity=4096))
    cache = engine.prefill("video.mp4")
    answer = engine.ask(cache, "What happens after the dog enters?")
"""

from statekv import policies, retrieval
from statekv.cache import ChunkKV, VideoKVCache
from statekv.engine import Answer, Engine, TokenEvent
from statekv.errors import (
    EmptyVideoError,
    ModelMismatchError,
    PrefillConfigMismatchError,
    StateKVError,
    UnsupportedModelError,
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
)
from statekv.policies import Full, StateKV, Window
from statekv.video import SamplingConfig

__version__ = "0.2.0"

__all__ = [
    "Answer", "ChunkKV", "EmptyVideoError", "Engine", "Full", "ModelMismatchError", "PrefillConfigMismatchError",
    "SamplingConfig", "StateKV",
    "StateKVError", "TokenEvent", "UnsupportedModelError", "VideoDecodeError", "VideoError", "VideoKVCache",
    "VideoNotFoundError", "Window", "policies", "retrieval", "__version__",
]
