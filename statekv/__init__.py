"""statekv: linear-time streaming prefill of long videos into reusable KV caches, and answering from them.

    engine = statekv.Engine.from_pretrained(path, policy=statekv.policies.StateKV(capacity=4096))
    cache = engine.prefill("video.mp4")
    answer = engine.ask(cache, "What happens after the dog enters?")

The names below are imported on first use (PEP 562), so that `import statekv.video_ids` or `statekv.errors`
(the command line's cheap checks, its `--help`) does not pay for importing torch and transformers.
"""

from __future__ import annotations

from statekv._lazy import lazy_attributes
from statekv._version import __version__

_EXPORTS = {  # public name -> the module that defines it
    "ChunkKV": "statekv.cache", "VideoKVCache": "statekv.cache", "AnswerRequest": "statekv.decoding",
    "Answer": "statekv.answering", "Engine": "statekv.engine", "TokenEvent": "statekv.answering",
    "EmptyVideoError": "statekv.errors", "ModelMismatchError": "statekv.errors", "StateKVError": "statekv.errors",
    "UnsupportedModelError": "statekv.errors", "VideoDecodeError": "statekv.errors", "VideoError": "statekv.errors",
    "VideoNotFoundError": "statekv.errors", "PrefillConfigMismatchError": "statekv.errors",
    "Full": "statekv.policies", "StateKV": "statekv.policies", "Window": "statekv.policies",
    "SamplingConfig": "statekv.video",
}

__all__ = [*sorted(_EXPORTS), "policies", "retrieval", "__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
