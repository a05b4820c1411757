"""The query service's logic, Ray-free: resolve a video safely under the root, load its cache once into a
byte-bounded LRU, answer (or stream) from it without prefilling, list and describe the stored caches.

The Serve deployment in `app.py` only speaks HTTP and delegates here; tests use this class directly too.
Requests are validated by the same pydantic model that the OpenAPI schema is generated from (schema.py).

Retrieval: a request with `retrieval` answers from the chunks chosen for its question (`Engine.ask(...,
retrieval=...)`) and returns them as `evidence` with their time ranges. Its cache is held lazily, in an LRU entry
of its own (key `<video_id>#retrieval`, beside the whole-cache entry `<video_id>` of requests without retrieval):
the manifest, prefix K/V and linear layers' states when loaded, then the summary keys and the per-layer chunk
K/V its questions have read, with the entry's bytes growing as they are read (lazy.py). The two entries are
separate so that each path keeps its own guarantee: a whole cache is read in one request per file and answers
from every chunk; a retrieval entry never reads a chunk it is not asked for, and an answer does not depend on
which other requests came first. A video asked both ways is held twice; the byte bound counts both.

Scopes: `ask`, `stream`, `describe` and `list_videos` take an API key's `Scope` (auth.py): a listing shows only
the videos it may read, and a video outside it is answered as one that does not exist, after the same store lookups
(`_as_missing`), so that neither the answer nor its time tells whether it exists.

Loading: a cold question reads the cache's manifest once and checks the model once (`CacheStore.load` with the
service's model: a cache of another model is refused before any tensor is read), then the engine checks the
cache's cursor and prefix once (`Engine.check_cache`); the manifest's version comes with that read.

Freshness: a cache kept in the LRU is revalidated against its manifest's version (ETag on S3, the MD5 of the
manifest locally: one HEAD on S3) at most every `revalidate_s` seconds, so a cache re-prefilled under the same id is
served stale for at most that long: a request that arrives `revalidate_s` or more after the commit is answered from
it (requests already answering keep the copy they started with; a store that cannot be reached leaves the kept copy
answering); `revalidate_s=0` checks on every request.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from pipelines.serving.batching import BatchScheduler
from pipelines.serving.keys import Scope, normalise_root
from pipelines.serving.errors import (BadRequest, ClientGone, Conflict, NotFound, PayloadTooLarge, ServiceError,
                                      Unavailable, Unprocessable, credential_cause, network_cause, public_location,
                                      public_name, public_text)
from pipelines.serving.lazy import HeldChunks, held_nbytes
from pipelines.serving.lru import CacheLRU
from pipelines.serving.readiness import StorageProbe
from pipelines.serving.schema import ask_request_model, validation_message
from statekv.cache import ModelInfo, VideoKVCache
from statekv.decoding import AnswerRequest
from statekv.device_cache import DEFAULT_DEVICE_CACHE_BYTES
from statekv.engine import Engine
from statekv.errors import CacheLayoutError, ModelMismatchError
from statekv.retrieval import Retrieval, Segments
from statekv.store import describe as store_describe
from statekv.store.cache_store import CacheStore
from statekv.store.errors import CacheChangedError, CacheCorruptError, CacheNotFoundError
from statekv.store.fs import is_local
from statekv.video_ids import is_valid_video_id, validate_video_id

__all__ = ["BadRequest", "CacheLRU", "ClientGone", "Conflict", "NotFound", "PayloadTooLarge", "QueryService",
           "ServiceError", "Unavailable", "Unprocessable", "describe_manifest"]

logger = logging.getLogger(__name__)

RETRIEVAL_KEY = "{}#retrieval"  # the LRU key of a lazily held cache ('#' never appears in a video id)
# where a video outside a key's scope is looked up instead (an id ending in '.' is never committed): the request
# costs the store lookups a missing video costs and gets the same answer, so ids cannot be probed by status or time
ABSENT_ID = "absent."



@dataclass
class _Loaded:
    """An LRU entry: the cache (its `committed.version` is the manifest version it was read under)."""

    cache: VideoKVCache
    checked_at: float  # monotonic time its version was asked for: the cache is known current as of then

    @property
    def version(self) -> str:
        return self.cache.committed.version


class QueryService:
    """Answers questions over the committed caches under `caches_root` with one loaded model."""

    def __init__(self, model: str | os.PathLike | Engine, caches_root: str, *,
                 storage_options: dict[str, Any] | None = None, lru_bytes: int = 4 << 30,
                 max_question_chars: int = 4000, max_question_tokens: int = 1024, max_new_tokens_limit: int = 512,
                 retry_after_s: int = 5, revalidate_s: float = 1.0, device: str | None = None,
                 dtype: str | None = None, batching: bool = True, max_batch: int = 32,
                 device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES) -> None:
        if isinstance(model, Engine):
            self.engine = model
        else:
            import torch

            self.engine = Engine.from_pretrained(model, device=device, dtype=getattr(torch, dtype) if dtype else None,
                                                 device_cache_bytes=device_cache_bytes)
        self.model_info = self.engine.model_info()
        self.root = _normalise_root(caches_root)
        self.storage_options = storage_options
        self.max_question_tokens = int(max_question_tokens)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.retry_after_s = int(retry_after_s)
        self.revalidate_s = float(revalidate_s)
        self.ask_model = ask_request_model(max_new_tokens_limit=self.max_new_tokens_limit,
                                           max_question_chars=int(max_question_chars),
                                           max_question_tokens=self.max_question_tokens)
        self.lru = CacheLRU(lru_bytes)
        self._store_lock = threading.Lock()
        self._store: CacheStore | None = None
        self._counter_lock = threading.Lock()
        self.counters = {"vision_tower_calls": 0, "prefill_calls": 0, "store_loads": 0, "generated_tokens": 0,
                         "in_flight": 0, "cancelled": 0}
        self._count_calls(self.engine.adapter, "video_features", "vision_tower_calls")
        self._count_calls(self.engine, "prefill", "prefill_calls")
        # every question goes through the batch scheduler (batching.py); batching=False: one question at a time
        self.batcher = BatchScheduler(self.engine, max_batch=max_batch if batching else 1,
                                      on_tokens=lambda n: self._count("generated_tokens", n))
        self.storage = StorageProbe(self.check_storage)  # readiness: /readyz, /healthz's "degraded"

    @classmethod
    def from_config(cls, config) -> "QueryService":
        """From a `ServiceConfig`."""
        return cls(config.model, config.caches_root, storage_options=config.storage(), lru_bytes=config.lru_bytes,
                   max_question_chars=config.max_question_chars, max_question_tokens=config.max_question_tokens,
                   max_new_tokens_limit=config.max_new_tokens_limit, retry_after_s=config.retry_after_s,
                   revalidate_s=config.revalidate_s, device=config.device, dtype=config.dtype,
                   batching=config.batching, max_batch=config.max_batch,
                   device_cache_bytes=config.device_cache_bytes)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    def _count_calls(self, obj: Any, name: str, key: str) -> None:
        """Count calls of `obj.name` (the proof that answering never runs the vision tower or prefill)."""
        original = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count(key)
            return original(*args, **kwargs)

        setattr(obj, name, counted)

    @property
    def public_root(self) -> str | None:
        """The root as clients may see it: a remote URI, or None for a local directory (a host path)."""
        return None if self._local_root else self.root

    @property
    def _local_root(self) -> bool:
        return "://" not in self.root

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
                if is_valid_video_id(rest):
                    return rest
        where = f" {self.public_root!r}" if self.public_root else ""
        raise BadRequest(f"cache_uri {public_text(cache_uri)!r} is outside this service's cache root{where}; "
                         "ask for a cache under it (or pass video_id)", code="outside_root")

    def check_video_id(self, video_id: str) -> str:
        """`video_id` if it is a valid id (statekv.video_ids' rule, the schema's pattern), else Unprocessable why."""
        try:
            return validate_video_id(video_id)
        except ValueError as err:
            raise Unprocessable(f"video_id: {public_text(str(err))}") from None

    def _root_spellings(self) -> list[str]:
        if not self._local_root:
            return [self.root]
        return [self.root, "file://" + self.root]

    def public_uri(self, video_id: str) -> str | None:
        return None if self._local_root else f"{self.root}/{video_id}"

    # --- the store ----------------------------------------------------------------------------------------------

    def store(self) -> CacheStore:
        """The cache root's `CacheStore`, made once per service: every read reuses its client."""
        with self._store_lock:
            if self._store is None:
                self._store = self._store_call("the cache root", lambda: CacheStore(
                    self.root, storage_options=self.storage_options))
            return self._store

    def _unavailable(self, what: str, err: BaseException) -> Unavailable:
        logger.warning("cache store unreachable (%s): %r", what, err)
        return Unavailable(f"the cache store is unreachable or dropped the connection while reading {what}; "
                           f"retry in {self.retry_after_s} s", headers={"Retry-After": str(self.retry_after_s)})

    def _store_call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a store operation (or an answer on a stored cache), turning failures of the store or of the cache
        into ServiceErrors with path-free messages."""
        try:
            return fn()
        except CacheNotFoundError:
            raise _missing(what) from None
        except CacheCorruptError as err:
            if network_cause(err) is not None:  # a dropped connection mid-read is not a damaged cache
                raise self._unavailable(what, err) from None
            logger.error("corrupt cache (%s): %s", what, err)
            raise ServiceError(f"the stored cache of {what} is corrupt at {public_text(err.part)}: "
                               f"{public_text(err.reason)}; re-prefill the video", code="cache_corrupt") from None
        except CacheChangedError:
            raise Unavailable(f"the cache of {what} was committed again while it was read; retry",
                              code="cache_changed", headers={"Retry-After": "0"}) from None
        except CacheLayoutError as err:
            raise Conflict(public_text(str(err)), code="cache_outdated") from None
        except ModelMismatchError as err:
            raise _model_conflict(what, err) from None
        except PermissionError as err:
            logger.error("cache store refused access (%s): %s", what, err)
            raise ServiceError(f"the cache store refused access to {what}; the server log has the details",
                               code="storage_denied") from None
        except Exception as err:  # noqa: BLE001 - only connection and credential failures are re-raised as 503
            if network_cause(err) is not None:
                raise self._unavailable(what, err) from None
            missing = credential_cause(err)
            if missing is not None:
                raise self._no_credentials(what, missing) from None
            raise

    def _no_credentials(self, what: str, err: BaseException) -> Unavailable:
        logger.error("no credentials for the cache store (%s): %s: %s", what, type(err).__name__, err)
        return Unavailable(f"the cache store cannot be read for {what}: this replica has no usable credentials "
                           f"({type(err).__name__}); the operator must give the service the store's credentials",
                           headers={"Retry-After": str(self.retry_after_s)})

    def manifest_version(self, video_id: str) -> str | None:
        """The version of the committed manifest of `video_id` (one HEAD on S3); None if there is none. It changes
        with every commit (S3: the ETag; locally: the MD5 of the manifest, which holds its `created` time)."""
        return self.store().version(video_id)

    def _load(self, video_id: str, *, lazy: bool = False) -> tuple[_Loaded, int]:
        what = f"video {video_id!r}"
        checked = time.monotonic()  # the manifest read next holds from here (see `get_cache`)
        store = self.store()
        self._count("store_loads")
        cache = self._store_call(what, lambda: store.load(video_id, lazy=lazy, expect_model=self.model_info))
        self._store_call(what, lambda: self.engine.check_cache(cache))  # a lying cursor: cache_corrupt; never kept
        loaded = _Loaded(cache, checked)
        if not lazy:
            return loaded, cache.nbytes
        key = RETRIEVAL_KEY.format(video_id)
        cache.chunks = HeldChunks(cache.chunks, lambda read: self._held_read(key, loaded, what, read))
        return loaded, held_nbytes(cache)

    def _held_read(self, key: str, loaded: _Loaded, what: str, read: Callable[[], Any]) -> Any:
        """One read of a lazily held cache: store errors mapped as for any load, then its grown bytes charged to
        its LRU entry (a cache re-committed meanwhile is dropped from the LRU; the next request loads the new)."""
        def guarded() -> Any:
            try:
                return read()
            except CacheChangedError:
                self.lru.discard(key, loaded)
                raise

        out = self._store_call(what, guarded)
        self.lru.resize(key, loaded, held_nbytes(loaded.cache))
        return out

    def get_cache(self, video_id: str, *, lazy: bool = False) -> tuple[VideoKVCache, bool, float]:
        """(cache, LRU hit, seconds spent getting it); a kept cache whose manifest changed is loaded again.

        The freshness bound (module docstring): a request that arrives `revalidate_s` or more after a commit is
        answered from that commit or a later one, whatever else is in flight: an entry counts as current from the
        moment its manifest's version was *asked for* (not answered: a HEAD slowed by load that started before a
        commit must not vouch for the time after it), and a load this request joined is checked like a kept entry.
        `lazy`: the lazily held cache of retrieval requests (its own LRU entry, see the module docstring).
        """
        start = time.perf_counter()
        asked = time.monotonic()
        key = RETRIEVAL_KEY.format(video_id) if lazy else video_id
        while True:
            kept = self.lru.peek(key)
            if kept is not None and not self._current(kept, asked):
                self._revalidate(key, video_id, kept)
            loaded, hit = self.lru.get(key, lambda: self._load(video_id, lazy=lazy))
            if loaded is kept or self._current(loaded, asked):
                return loaded.cache, hit, time.perf_counter() - start

    def _current(self, loaded: _Loaded, asked: float) -> bool:
        """Whether `loaded` may answer a request that arrived at `asked` without asking the store again."""
        return loaded.checked_at >= asked or asked - loaded.checked_at < self.revalidate_s

    def _revalidate(self, key: str, video_id: str, kept: _Loaded) -> None:
        """One HEAD: drop `kept` from the LRU if its cache was committed again, else mark it current."""
        checked = time.monotonic()  # before the HEAD: what it says holds from then on, not from its answer
        try:
            version = self.manifest_version(video_id)
        except Exception as err:  # noqa: BLE001 - the store is unreachable: the kept copy still answers
            logger.warning("cannot revalidate the cache of %r, serving the kept copy: %r", video_id, err)
            return
        if version != kept.version:
            logger.info("the cache of %r was committed again; reloading it", video_id)
            self.lru.discard(key, kept)
        else:
            kept.checked_at = max(kept.checked_at, checked)

    # --- answering ---------------------------------------------------------------------------------------------

    def parse_ask(self, fields: dict[str, Any]):
        """The validated request (the schema's model) from keyword fields; Unprocessable naming each field."""
        fields = {k: v for k, v in fields.items() if not (k in ("video_id", "cache_uri") and v is None)}
        try:
            return self.ask_model.model_validate(fields)
        except ValidationError as err:
            raise Unprocessable(validation_message(err)) from None

    def _as_missing(self, video_id: str) -> None:
        """Answer exactly as for a video with no committed cache (NotFound, same message), after the same store
        lookup (the manifest read a load and `describe` make first), of an id that is never committed: for ids
        outside a key's scope."""
        what = f"video {video_id!r}"
        store = self.store()
        self._store_call(what, lambda: store.manifest(ABSENT_ID))
        raise _missing(what)

    def _prepare(self, fields: dict[str, Any], scope: Scope | None = None):
        req = self.parse_ask(fields)
        vid = self.resolve(req.video_id if "video_id" in req.model_fields_set else None,
                           req.cache_uri if "cache_uri" in req.model_fields_set else None)
        if not req.question.strip():
            raise Unprocessable("question: the question is empty")
        try:
            prompt_len = len(self.engine.adapter.question_ids(req.question, self.engine.layout))
        except UnicodeEncodeError:
            raise Unprocessable("question: not valid Unicode text (lone surrogate)") from None
        if prompt_len > self.max_question_tokens:
            raise PayloadTooLarge(f"the question is {prompt_len} tokens long with the chat template; this service "
                                  f"takes at most {self.max_question_tokens} tokens")
        if scope is not None and not scope.allows(vid):
            self._as_missing(vid)
        cache, hit, load_s = self.get_cache(vid, lazy=req.retrieval is not None)
        if req.retrieval is not None:
            self._check_retrievable(vid, cache, req.retrieval.setting())
        if cache.config.layout != self.engine.layout:  # the prompt follows the cache's layout
            prompt_len = len(self.engine.adapter.question_ids(req.question, cache.config.layout))
        return req, vid, cache, hit, load_s, prompt_len

    def _check_retrievable(self, vid: str, cache: VideoKVCache, setting: Retrieval) -> None:
        """Conflict naming the reason when retrieval cannot work on this cache (before any chunk is read)."""
        if cache.config.answer_from == "state":
            raise Conflict(f"the cache of video {vid!r} answers from its carried state (answer_from='state') and "
                           "keeps no chunks to retrieve; ask without retrieval", code="retrieval_unsupported")
        if isinstance(setting, Segments) and not cache.scenes:
            raise Conflict(f"the cache of video {vid!r} records no scene boundaries for segment retrieval; use "
                           "top_k, or prefill the video again", code="retrieval_unsupported")

    def _request(self, req) -> AnswerRequest:
        """The engine's request for a validated one (its retrieval setting, if any)."""
        retrieval = req.retrieval.setting() if req.retrieval is not None else None
        return AnswerRequest(req.question, req.max_new_tokens, req.temperature, req.top_p, req.seed,
                             retrieval=retrieval)

    def ask(self, *, cancelled: Callable[[], bool] | None = None, scope: Scope | None = None,
            **fields: Any) -> dict[str, Any]:
        """Answer a question about a stored video; the response body of POST /v1/ask.

        `fields` are the request's (video_id or cache_uri, question, max_new_tokens, temperature, top_p, seed,
        retrieval). The question is answered by the batch scheduler, with the other questions in flight.
        `cancelled` is polled between steps: once it returns True the work stops and ClientGone is raised.
        `scope` (an API key's): a video outside it is answered as one that does not exist.
        """
        fields.pop("stream", None)
        req, vid, cache, hit, load_s, prompt_len = self._prepare(fields, scope)
        self._count("in_flight")
        try:
            answer = self._store_call(f"video {vid!r}", lambda: self.batcher.answer(
                cache, self._request(req), cancelled=cancelled, label=vid))
        except ClientGone:
            self._count("cancelled")
            raise
        finally:
            self._count("in_flight", -1)
        return self._result(vid, cache, hit, answer.text, answer.token_ids, prompt_len, answer.finish_reason, load_s,
                            answer.first_token_s, answer.total_s, answer.evidence)

    def stream(self, *, scope: Scope | None = None, **fields: Any) -> Iterator[dict[str, Any]]:
        """Validate and load now (errors raise here), then return the events: one per token as the batch scheduler
        reads it back, a final "done".

        A failure after the first token ends the events with an "error" event (the status is already sent). Closing
        the events (the client left) cancels the question; they return once it has left the batch.
        """
        fields.pop("stream", None)
        req, vid, cache, hit, load_s, prompt_len = self._prepare(fields, scope)
        request = self._request(req)

        def events() -> Iterator[dict[str, Any]]:
            self._count("in_flight")
            gone = threading.Event()
            pieces: queue.SimpleQueue = queue.SimpleQueue()  # lists of token events, then None once settled
            future = None
            try:
                future = self.batcher.submit(cache, request, cancelled=gone.is_set, label=vid, on_events=pieces.put)
                future.add_done_callback(lambda _: pieces.put(None))
                while (batch := pieces.get()) is not None:
                    for event in batch:
                        yield {"type": "token", "text": event.text, "token_id": event.token_id}
                answer = self._store_call(f"video {vid!r}", future.result)
                final = self._result(vid, cache, hit, answer.text, answer.token_ids, prompt_len,
                                     answer.finish_reason, load_s, answer.first_token_s, answer.total_s,
                                     answer.evidence)
                yield {"type": "done", **final}
            except Exception as err:  # noqa: BLE001 - the stream must end with an event, never be cut
                logger.exception("answer stream for %r failed", vid)
                error = err if isinstance(err, ServiceError) else ServiceError(
                    "internal error while answering; the server log has the details")
                yield {"type": "error", **error.body()}
            finally:
                gone.set()  # a client that left: its question leaves the batch at the next step
                if future is not None and isinstance(future.exception(), ClientGone):
                    self._count("cancelled")
                self._count("in_flight", -1)

        return events()

    def _result(self, vid: str, cache: VideoKVCache, hit: bool, text: str, ids: list[int], prompt_len: int,
                finish: str, load_s: float, first_s: float, total_s: float,
                evidence: list[Any] | None = None) -> dict[str, Any]:
        """The response body; `evidence` (with retrieval) becomes a list of chunks with time ranges, else null."""
        video = cache.num_video_tokens if evidence is None else sum(cache.chunk_tokens[e.chunk] for e in evidence)
        return {
            "answer": text, "video_id": vid, "finish_reason": finish, "token_ids": ids,
            "tokens": {"prompt": prompt_len, "context": cache.prefix_len + video, "generated": len(ids)},
            "timings": {"load_s": load_s, "first_token_s": first_s, "total_s": total_s},
            "cache": "hit" if hit else "miss",
            "evidence": None if evidence is None else [asdict(e) for e in evidence],
        }

    # --- listing and describing --------------------------------------------------------------------------------

    def _entries(self, scope: Scope | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(servable caches, invalid ones with the reason) under the root, by video id, from the store's listing:
        its catalog (a few reads, whatever the number of caches; see statekv/store/catalog.py) or, for a root
        without one, a scan that reports invalid manifests instead of failing."""
        listing = self.store().list()
        videos, invalid = [], []
        for e in listing:
            if scope is not None and not scope.allows(e.video_id):
                continue
            if not is_valid_video_id(e.video_id):
                invalid.append({"video_id": public_text(e.video_id), "reason": "not a valid video id for this service"})
                continue
            videos.append({"video_id": e.video_id, "uri": self.public_uri(e.video_id), "chunks": int(e.chunks),
                           "tokens": int(e.tokens), "bytes": int(e.bytes), "storage": str(e.storage),
                           "created": str(e.created), "fingerprint": str(e.fingerprint),
                           "compatible": e.serves(self.model_info)})
        for bad in listing.invalid:
            if scope is not None and not scope.allows(bad.video_id):
                continue
            invalid.append({"video_id": public_text(bad.video_id), "reason": public_text(bad.reason)})
        return videos, invalid

    def list_videos(self, *, limit: int = 100, offset: int = 0, scope: Scope | None = None) -> dict[str, Any]:
        """One page of the servable caches under the root, sorted by video id, and the invalid ones; with `scope`
        (an API key's) only the videos it may read."""
        if not (1 <= limit <= 1000 and offset >= 0):
            raise Unprocessable("limit must be in [1, 1000] and offset >= 0")
        videos, invalid = self._store_call("the cache root", lambda: self._entries(scope))
        page = videos[offset:offset + limit]
        nxt = offset + len(page)
        return {"videos": page, "invalid": invalid, "total": len(videos), "limit": limit, "offset": offset,
                "next_offset": nxt if nxt < len(videos) else None}

    def describe(self, video_id: str, *, scope: Scope | None = None) -> dict[str, Any]:
        """What `statekv inspect` shows for one cache, as JSON (plus its text and whether this model can use it);
        a video outside `scope` is answered as one that does not exist."""
        vid = self.check_video_id(video_id)
        if scope is not None and not scope.allows(vid):
            self._as_missing(vid)
        what = f"video {vid!r}"
        store = self.store()
        m = self._store_call(what, lambda: store.manifest(vid))
        try:
            return describe_manifest(self.public_uri(vid) or vid, m, self.model_info,
                                     public_uri=self.public_uri(vid))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as err:
            logger.error("invalid manifest of %r: %r", vid, err)
            raise ServiceError(f"the stored cache of {what} is corrupt at manifest.json: missing or invalid field "
                               f"{public_text(str(err))}; re-prefill the video", code="cache_corrupt") from None

    # --- health ------------------------------------------------------------------------------------------------

    def health(self, *, name_root: bool = True) -> dict[str, Any]:
        """Liveness, and whether the store can be read (`storage`; "degraded" when not): the model, LRU and
        counters; the root's URI unless `name_root` is False (an open /healthz of a service with API keys says
        nothing about the corpus)."""
        self.check_health()
        storage = self.storage.status()
        return {"status": "ok" if storage is None else "degraded", "storage": "ok" if storage is None else storage.code,
                "model": public_name(self.model_info.name_or_path),
                "model_type": self.model_info.model_type, "fingerprint": self.model_info.fingerprint,
                "caches_root": self.public_root if name_root else None, "lru": self.lru.stats(), "counters": dict(self.counters)}

    def check_storage(self) -> None:
        """Raise the ServiceError a request would get if the cache root cannot be read now (one HEAD / listing of
        at most one key); a root with nothing committed yet is readable."""
        store = self.store()
        fs, root = store.fs, store.path

        def probe() -> None:
            if not is_local(fs):
                fs.invalidate_cache(root)
            try:
                fs.info(root)
            except FileNotFoundError:  # the store answered: nothing indexed under the root yet
                pass

        self._store_call("the cache root", probe)

    def check_health(self) -> None:
        """Raises if this replica cannot answer (Serve restarts it)."""
        if self.engine.adapter.model is None:
            raise RuntimeError("the model is not loaded")


def _missing(what: str) -> NotFound:
    """The one answer for a video with no committed cache (and for one outside the asking key's scope)."""
    return NotFound(f"no committed cache for {what}; list them with GET /v1/videos or index the video first "
                    "(statekv prefill / statekv index)")


def _model_conflict(what: str, err: ModelMismatchError) -> Conflict:
    """409 for a cache made by another model, naming both models without host paths."""
    theirs, mine = err.cache_model, err.engine_model
    if theirs is None or mine is None:  # another prefill setting, not another model
        return Conflict(f"the cache of {what} was made with another model or setting ({public_text(str(err))}); "
                        "ask a service running the cache's model, or prefill the video again")
    return Conflict(f"the cache of {what} was made with model {public_name(theirs.name_or_path)!r} "
                    f"({theirs.model_type}, fingerprint {theirs.fingerprint}), but this service runs "
                    f"{public_name(mine.name_or_path)!r} ({mine.model_type}, fingerprint {mine.fingerprint}); ask a "
                    "service running that model, or prefill the video again")


def _normalise_root(root: str | os.PathLike) -> str:
    return normalise_root(os.fspath(root))


def _public_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """A copy of manifest `m` with the host paths it records (source video, local model) shortened."""
    m = copy.deepcopy(m)
    if isinstance(m.get("source"), dict) and m["source"].get("uri"):
        m["source"]["uri"] = public_location(m["source"]["uri"])
    if isinstance(m.get("video"), dict) and isinstance(m["video"].get("source"), str):
        m["video"]["source"] = public_location(m["video"]["source"])
    m["model"]["name_or_path"] = public_name(m["model"]["name_or_path"])
    return m


def describe_manifest(uri: str, m: dict[str, Any], model: ModelInfo | None = None, *,
                      public_uri: str | None = None) -> dict[str, Any]:
    """The store's description of a cache (`statekv inspect`'s fields and text), without host paths."""
    out = store_describe.describe_manifest(uri, _public_manifest(m), model)
    out["uri"] = public_uri
    out["model"] = {k: str(v) for k, v in out["model"].items()}
    return out
