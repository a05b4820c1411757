"""statekv: linear-time streaming prefill of long videos into reusable KV caches, and answering from them.

    engine = statekv.Engine.from_pretrained(path, policy=statekv.policies.StateKV(capacity=4096))
    cache = engine.prefill("video.mp4")
    answer = engine.ask(cache, "What happens after the dog enters?")

The names below are imported on first use (PEP 562), so that `import statekv.video_ids` or `statekv.errors`
(the command line's cheap checks, its `--help`) does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:  # a submodule used as an attribute (`statekv.policies.StateKV`), as when __init__ imported them all
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
