"""The query service's logic, Ray-free: resolve a video safely under the root, load its cache once into a
byte-bounded LRU, answer (or stream) from it without prefilling, list and describe the stored caches.

The Serve deployment in `app.py` only parses HTTP input and delegates here; tests use this class directly too.
Errors a caller can act on are `ServiceError`s carrying the HTTP status, a short code and a message.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from statekv.cache import VideoKVCache
from statekv.engine import Engine
from statekv.errors import ModelMismatchError
from statekv.store import CacheCorruptError, CacheNotFoundError, list_caches, load_cache, read_manifest
from statekv.store.describe import describe_manifest

logger = logging.getLogger(__name__)

# one path segment, no traversal: starts with a letter or digit, then letters, digits, ".", "_", "-"
VIDEO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
DEFAULT_MAX_NEW_TOKENS = 64  # when a request gives none (capped by the service's limit)


# --- errors ------------------------------------------------------------------------------------------------------

class ServiceError(Exception):
    """An error answered to the client: HTTP `status`, a stable `code` and a message a user can act on."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "model_mismatch"


class PayloadTooLarge(ServiceError):
    status, code = 413, "question_too_long"


class Unprocessable(ServiceError):
    status, code = 422, "invalid_request"


class Unavailable(ServiceError):
    status, code = 503, "storage_unavailable"


def _storage_unreachable_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:  # no S3 support installed: only local roots
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(types)


_UNREACHABLE = _storage_unreachable_types()


# --- the byte-bounded LRU ----------------------------------------------------------------------------------------

class CacheLRU:
    """Loaded caches by video id, least recently used evicted first once their bytes exceed `capacity_bytes`.

    Thread-safe. Concurrent misses of one key share a single load (the others wait for it); a failed load is
    not remembered. An item larger than the whole capacity is returned but not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.loads = self.evictions = 0

    def get(self, key: str, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """(value, hit): the kept value, or `load()`'s (value, nbytes) run once however many ask at once."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0], True
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self.misses += 1
            else:
                self.hits += 1  # shares the load in flight
        if not owner:
            return pending.result(), True
        try:
            value, nbytes = load()
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            pending.set_exception(err)
            raise
        with self._lock:
            del self._loading[key]
            self.loads += 1
            if nbytes <= self.capacity_bytes:
                self._items[key] = (value, nbytes)
                self.bytes += nbytes
                while self.bytes > self.capacity_bytes:
                    _, (_, size) = self._items.popitem(last=False)
                    self.bytes -= size
                    self.evictions += 1
        pending.set_result(value)
        return value, False

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                    "hits": self.hits, "misses": self.misses, "loads": self.loads, "evictions": self.evictions}

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)


# --- the service -------------------------------------------------------------------------------------------------

class QueryService:
    """Answers questions over the committed caches under `caches_root` with one loaded model."""

    def __init__(self, model: str | os.PathLike | Engine, caches_root: str, *,
                 storage_options: dict[str, Any] | None = None, lru_bytes: int = 4 << 30,
                 max_question_chars: int = 4000, max_new_tokens_limit: int = 512, retry_after_s: int = 5,
                 device: str | None = None, dtype: str | None = None) -> None:
        if isinstance(model, Engine):
            self.engine = model
        else:
            import torch

            self.engine = Engine.from_pretrained(model, device=device,
                                                 dtype=getattr(torch, dtype) if dtype else None)
        self.model_info = self.engine.model_info()
        self.root = _normalise_root(caches_root)
        self.storage_options = storage_options
        self.max_question_chars = int(max_question_chars)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.retry_after_s = int(retry_after_s)
        self.lru = CacheLRU(lru_bytes)
        self._counter_lock = threading.Lock()
        self.counters = {"vision_tower_calls": 0, "prefill_calls": 0, "store_loads": 0}
        self._count_calls(self.engine.adapter, "video_features", "vision_tower_calls")
        self._count_calls(self.engine, "prefill", "prefill_calls")

    @classmethod
    def from_config(cls, config) -> "QueryService":
        """From a `ServiceConfig`."""
        return cls(config.model, config.caches_root, storage_options=config.storage(), lru_bytes=config.lru_bytes,
                   max_question_chars=config.max_question_chars, max_new_tokens_limit=config.max_new_tokens_limit,
                   retry_after_s=config.retry_after_s, device=config.device, dtype=config.dtype)

    def _count_calls(self, obj: Any, name: str, key: str) -> None:
        """Count calls of `obj.name` (the proof that answering never runs the vision tower or prefill)."""
        original = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._counter_lock:
                self.counters[key] += 1
            return original(*args, **kwargs)

        setattr(obj, name, counted)

    # --- resolving a request's video ------------------------------------------------------------------------

    def resolve(self, video_id: str | None = None, cache_uri: str | None = None) -> str:
        """The video id named by `video_id` or `cache_uri`; BadRequest for anything outside the root.

        Only ids of one safe path segment are accepted, and a `cache_uri` must be `<root>/<id>` spelled exactly
        (no encoding, no other scheme or bucket); the cache is then always read at `<root>/<id>` built here.
        """
        if (video_id is None) == (cache_uri is None):
            raise Unprocessable("give exactly one of video_id and cache_uri")
        if video_id is not None:
            return self.check_video_id(video_id)
        uri = cache_uri.rstrip("/")
        if any(c in uri for c in "%\\?#") or any(ord(c) < 32 for c in uri):
            raise BadRequest(f"cache_uri {cache_uri!r} is not a plain <root>/<video_id> URI", code="outside_root")
        for prefix in self._root_spellings():
            if uri.startswith(prefix + "/"):
                rest = uri[len(prefix) + 1:]
                if VIDEO_ID.fullmatch(rest):
                    return rest
        raise BadRequest(f"cache_uri {cache_uri!r} is outside this service's cache root {self.root!r}; "
                         f"ask for a cache under it (or pass video_id)", code="outside_root")

    def check_video_id(self, video_id: str) -> str:
        if not VIDEO_ID.fullmatch(video_id):
            raise BadRequest(f"video_id {video_id!r} is not a valid id (one path segment of letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit)", code="invalid_video_id")
        return video_id

    def _root_spellings(self) -> list[str]:
        if "://" in self.root:
            return [self.root]
        return [self.root, "file://" + self.root]

    def uri_of(self, video_id: str) -> str:
        return f"{self.root}/{video_id}"

    # --- loading ------------------------------------------------------------------------------------------------

    def _store_call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a store operation, turning store failures into ServiceErrors."""
        try:
            return fn()
        except CacheNotFoundError:
            raise NotFound(f"no committed cache for {what} under {self.root!r}; list them with GET /v1/videos "
                           "or index the video first (statekv prefill / statekv index)") from None
        except CacheCorruptError as err:
            raise ServiceError(f"{err}; re-prefill the video", code="cache_corrupt") from None
        except ModelMismatchError as err:
            raise Conflict(f"{err}; ask a service running the cache's model, or prefill the video again") from None
        except _UNREACHABLE as err:
            logger.warning("cache store unreachable (%s): %s", what, err)
            raise Unavailable(f"the cache store at {self.root!r} is unreachable; retry in {self.retry_after_s} s",
                              headers={"Retry-After": str(self.retry_after_s)}) from None
        except PermissionError as err:
            raise ServiceError(f"the cache store refused access to {what}: {err}", code="storage_denied") from None

    def _load(self, video_id: str) -> tuple[VideoKVCache, int]:
        uri = self.uri_of(video_id)
        manifest = self._store_call(f"video {video_id!r}", lambda: read_manifest(uri,
                                                                              storage_options=self.storage_options))
        self._check_model(video_id, manifest["model"])
        with self._counter_lock:
            self.counters["store_loads"] += 1
        cache = self._store_call(f"video {video_id!r}", lambda: load_cache(
            uri, lazy=False, storage_options=self.storage_options, expect_fingerprint=self.model_info.fingerprint))
        return cache, cache.nbytes

    def _check_model(self, video_id: str, cache_model: dict[str, Any]) -> None:
        mine = self.model_info
        if cache_model["fingerprint"] != mine.fingerprint:
            raise Conflict(
                f"the cache of video {video_id!r} was made with model {cache_model['name_or_path']!r} "
                f"({cache_model['model_type']}, fingerprint {cache_model['fingerprint']}), but this service runs "
                f"{mine.name_or_path!r} ({mine.model_type}, fingerprint {mine.fingerprint}); ask a service "
                f"running that model, or prefill the video again with this one")

    def get_cache(self, video_id: str) -> tuple[VideoKVCache, bool, float]:
        """(cache, LRU hit, seconds spent getting it)."""
        start = time.perf_counter()
        cache, hit = self.lru.get(video_id, lambda: self._load(video_id))
        return cache, hit, time.perf_counter() - start

    # --- answering ---------------------------------------------------------------------------------------------

    def _check_question(self, question: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
        if len(question) > self.max_question_chars:
            raise PayloadTooLarge(f"the question has {len(question)} characters; this service takes at most "
                                  f"{self.max_question_chars}")
        if not question.strip():
            raise Unprocessable("the question is empty")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise Unprocessable("the question is not valid Unicode text (lone surrogate)") from None
        if not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise Unprocessable(f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, "
                                f"got {max_new_tokens}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise Unprocessable("temperature must be >= 0 and top_p in (0, 1]")

    def _prepare(self, video_id, cache_uri, question, max_new_tokens, temperature, top_p):
        vid = self.resolve(video_id, cache_uri)
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit)
        self._check_question(question, max_new_tokens, temperature, top_p)
        cache, hit, load_s = self.get_cache(vid)
        return vid, cache, hit, load_s, max_new_tokens

    def ask(self, *, question: str, video_id: str | None = None, cache_uri: str | None = None,
            max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None) -> dict[str, Any]:
        """Answer `question` about a stored video; the response body of POST /v1/ask."""
        vid, cache, hit, load_s, max_new_tokens = self._prepare(video_id, cache_uri, question, max_new_tokens, temperature, top_p)
        answer = self.engine.ask(cache, question, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed)
        return self._result(vid, cache, hit, answer.text, answer.token_ids, len(answer.prompt_ids),
                            answer.finish_reason, load_s, answer.first_token_s, answer.total_s)

    def stream(self, *, question: str, video_id: str | None = None, cache_uri: str | None = None,
               max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[dict[str, Any]]:
        """Validate and load now (errors raise here), then return the events: one per token, a final "done"."""
        vid, cache, hit, load_s, max_new_tokens = self._prepare(video_id, cache_uri, question, max_new_tokens, temperature, top_p)
        prompt_len = len(self.engine.adapter.question_ids(question, cache.config.layout))
        eos = self.engine.adapter.eos_token_ids

        def events() -> Iterator[dict[str, Any]]:
            start = time.perf_counter()
            first = 0.0
            ids: list[int] = []
            text = ""
            finish = "length"
            for event in self.engine.stream(cache, question, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_p=top_p, seed=seed):
                if not ids:
                    first = time.perf_counter() - start
                ids.append(event.token_id)
                text += event.text
                if event.token_id in eos:
                    finish = "eos"
                yield {"type": "token", "text": event.text, "token_id": event.token_id}
            final = self._result(vid, cache, hit, text, ids, prompt_len, finish, load_s, first,
                                 time.perf_counter() - start)
            yield {"type": "done", **final}

        return events()

    def _result(self, vid: str, cache: VideoKVCache, hit: bool, text: str, ids: list[int], prompt_len: int,
                finish: str, load_s: float, first_s: float, total_s: float) -> dict[str, Any]:
        return {
            "answer": text, "video_id": vid, "finish_reason": finish, "token_ids": ids,
            "tokens": {"prompt": prompt_len, "context": cache.prefix_len + cache.num_video_tokens,
                       "generated": len(ids)},
            "timings": {"load_s": load_s, "first_token_s": first_s, "total_s": total_s},
            "cache": "hit" if hit else "miss",
        }

    # --- listing and describing --------------------------------------------------------------------------------

    def list_videos(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """One page of the committed caches under the root, sorted by video id."""
        if not (1 <= limit <= 1000 and offset >= 0):
            raise Unprocessable("limit must be in [1, 1000] and offset >= 0")
        entries = self._store_call("the cache root", lambda: list_caches(self.root,
                                                                         storage_options=self.storage_options))
        page = entries[offset:offset + limit]
        mine = self.model_info.fingerprint
        videos = [{"video_id": e.video_id, "uri": e.uri, "chunks": e.chunks, "tokens": e.tokens, "bytes": e.bytes,
                   "storage": e.storage, "created": e.created, "fingerprint": e.fingerprint,
                   "compatible": e.fingerprint == mine} for e in page]
        nxt = offset + len(page)
        return {"videos": videos, "total": len(entries), "limit": limit, "offset": offset,
                "next_offset": nxt if nxt < len(entries) else None}

    def describe(self, video_id: str) -> dict[str, Any]:
        """What `statekv inspect` shows for one cache, as JSON (plus its text and whether this model can use it)."""
        vid = self.check_video_id(video_id)
        uri = self.uri_of(vid)
        m = self._store_call(f"video {vid!r}", lambda: read_manifest(uri, storage_options=self.storage_options))
        return describe_manifest(uri, m, self.model_info.fingerprint)

    # --- health ------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        self.check_health()
        return {"status": "ok", "model": self.model_info.name_or_path, "model_type": self.model_info.model_type,
                "fingerprint": self.model_info.fingerprint, "caches_root": self.root, "lru": self.lru.stats(),
                "counters": dict(self.counters)}

    def check_health(self) -> None:
        """Raises if this replica cannot answer (Serve restarts it)."""
        if self.engine.adapter.model is None:
            raise RuntimeError("the model is not loaded")


def _normalise_root(root: str | os.PathLike) -> str:
    root = os.fspath(root).rstrip("/")
    if "://" in root:
        if root.startswith("file://"):
            return os.path.abspath(root[len("file://"):])
        return root
    return os.path.abspath(os.path.expanduser(root))


