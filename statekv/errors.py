"""Exceptions raised by statekv: each names the input at fault and the reason, so a caller can act on it."""

from __future__ import annotations

from typing import Any


class StateKVError(Exception):
    """Base class of every error statekv raises on purpose."""


class VideoError(StateKVError, ValueError):
    """A video could not be used; `source` names it, `reason` says why."""

    def __init__(self, source: object, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"video {self.source!r}: {reason}")


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video does not exist at the given path or URL."""


class VideoDecodeError(VideoError):
    """The bytes are not a decodable video (corrupt, truncated, not a video, unsupported codec)."""


class EmptyVideoError(VideoError):
    """The video holds no frames: an empty file, a container without a video stream, or one that decodes to none."""


class UnsupportedModelError(StateKVError, ValueError):
    """No adapter handles this checkpoint's model type."""

    def __init__(self, model: object, model_type: str | None, supported: list[str]) -> None:
        self.model = str(model)
        self.model_type = model_type
        self.supported = supported
        super().__init__(
            f"model {self.model!r}: model_type {model_type!r} is not supported; "
            f"supported model types: {', '.join(supported)}"
        )


class ModelMismatchError(StateKVError, ValueError):
    """A cache was made by a different model (or prefill config) than the one asked to use it."""

    def __init__(self, what: str, cache_side: str, engine_side: str, *, cache_model: Any = None,
                 engine_model: Any = None) -> None:
        self.cache_side = cache_side
        self.engine_side = engine_side
        # for a model mismatch: the two `ModelInfo`s (a service words its own message from them, without paths)
        self.cache_model, self.engine_model = cache_model, engine_model
        super().__init__(f"{what} mismatch: the cache was made with {cache_side}, this engine has {engine_side}")


class CacheLayoutError(ModelMismatchError):
    """A cache was built by this model on another token layout of its family (the adapter's `layout_version`):
    its K/V sit on a sequence this statekv no longer builds, so answering or resuming it would be wrong. Re-index."""

    def __init__(self, video: str, model_type: str, cache_version: int, built_with: str, engine_version: int) -> None:
        self.video = video
        self.cache_side = f"layout {cache_version}"
        self.engine_side = f"layout {engine_version}"
        built = f" (transformers {built_with})" if built_with else " (before layouts were recorded)"
        StateKVError.__init__(
            self, f"cache of video {video!r}: built on {model_type} token layout {cache_version}{built}; this statekv "
            f"builds layout {engine_version}, the sequence the model was trained on: re-index the video (statekv "
            f"prefill --overwrite, or statekv index --overwrite)")


class PrefillConfigMismatchError(ModelMismatchError):
    """A cache is resumed with a different prefill config (policy, layout, sampling, ...); `field` names it."""

    def __init__(self, field: str, cache_side: object, engine_side: object) -> None:
        self.field = field
        super().__init__(f"prefill config field {field!r}", repr(cache_side), repr(engine_side))


class ModelNotFoundError(StateKVError, FileNotFoundError):
    """A checkpoint could not be found: no such local directory, or a hub id that is neither cached nor reachable."""

    def __init__(self, model: object, reason: str) -> None:
        self.model = str(model)
        self.reason = reason
        super().__init__(f"model {self.model!r}: {reason}")


class DeviceError(StateKVError, ValueError):
    """The requested device does not exist or this torch build cannot use it (e.g. cuda on a CPU-only torch)."""

    def __init__(self, device: object, reason: str) -> None:
        self.device = str(device)
        self.reason = reason
        super().__init__(f"device {self.device!r}: {reason}")
