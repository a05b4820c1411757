"""HTTP glue of the query service: `create_api(service)` is the FastAPI app over one `QueryService` (service.py),
`QueryDeployment` serves it on Ray Serve, and `build_app(config)` / `app_builder(args)` are what `serve.run`,
`serve run` and `serve deploy` use.

    POST /v1/ask                 {video_id | cache_uri, question, max_new_tokens, temperature, top_p, seed, stream,
                                  retrieval: {top_k | segments, recent, adaptive}}
    GET  /v1/videos?limit=&offset=
    GET  /v1/videos/{video_id}
    GET  /healthz, /readyz
    GET  /openapi.json, /docs

The OpenAPI schema is generated from the same models that validate requests (schema.py), with the service's own
limits, and lists every status each operation returns; with API keys it declares the bearer scheme.

Who may ask is decided by an `AccessControl` (auth.py; API keys, scopes, per-key limits, loopback only without
keys), called by one dependency of each /v1 route; `/healthz` stays open. `AuditMiddleware` writes one audit line
per request (audit.py) and ends the request's admission (its concurrency slot, its generated tokens) when the
response has ended, streams included. A non-streaming answer whose client disconnects stops at
the next token: the handler watches the connection (and Serve cancels the request) while a worker thread decodes.
"""

# no `from __future__ import annotations`: FastAPI must see the real classes in handler signatures
import asyncio
import functools
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pipelines.serving import audit
from pipelines.serving.auth import AccessControl, Caller
from pipelines.serving.config import ServiceConfig
from pipelines.serving.docs_page import render_docs
from pipelines.serving.errors import ClientGone, ServiceError, Unprocessable
from pipelines.serving.keys import KeyStore
from pipelines.serving.schema import (VIDEO_ID_PATTERN, AskResponse, Health, Ready, VideoInfo, VideoPage, error_responses,
                                      validation_message)
from pipelines.serving.service import QueryService

logger = logging.getLogger(__name__)

MAX_OFFSET = 2**63 - 1


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# what a request's receive channel raises once its client has gone: Starlette's disconnect, and Serve's receive proxy
# re-raising the cancellation of the request (RequestCancelledError is a TaskCancelledError) that the proxy sends
# when the client disconnects
CLIENT_GONE = (ClientDisconnect, TaskCancelledError)


class EventStream(StreamingResponse):
    """Server-sent events of a service stream: one `data: {json}` per event (tokens, then "done" or "error").

    However the response ends (its last event, the client leaving, the request cancelled) the events are closed at
    once, so the answer stops and the service's in-flight count drops then, not when the generator is garbage
    collected; a client that leaves is an ordinary end, logged in one line, never an error.
    """

    def __init__(self, events: Iterator[dict[str, Any]], path: str) -> None:
        self._events, self._path = events, path
        self._lock = threading.Lock()  # the events run in pool threads: one step or the close at a time
        self._ended = False  # every event was sent
        super().__init__(self._chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _next(self) -> str | None:
        with self._lock:
            event = next(self._events, None)
        if event is None:
            self._ended = True
            return None
        return f"data: {json.dumps(event)}\n\n"

    def _close(self) -> None:
        with self._lock:  # waits for a step in progress
            self._events.close()

    async def _chunks(self) -> AsyncIterator[str]:
        while (chunk := await run_in_threadpool(self._next)) is not None:
            yield chunk

    async def listen_for_disconnect(self, receive: Receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except CLIENT_GONE:  # the stream stops as on a disconnect message
            pass

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:  # also when cancelled (the client left): the close is shielded so that it runs to its end
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self._close)
            if not self._ended:
                logger.info("client of a stream on %s left; its answer was stopped", self._path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except CLIENT_GONE:  # a server that reports the disconnect by failing `send` (ASGI spec 2.4)
            pass


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so the next message is the disconnect, or the
    receive channel fails as Serve's does once the request is cancelled)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except CLIENT_GONE:
        pass


class UTF8Request(Request):
    """A request whose JSON body is read as UTF-8 only (RFC 8259: JSON exchanged between systems is UTF-8);
    Python's `json.loads` of bytes would also take UTF-16 and UTF-32."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads((await self.body()).decode("utf-8"))
        return self._json


class UTF8Route(APIRoute):
    """A route whose request body, if any, must be UTF-8: 422 invalid_request naming the first other byte."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def utf8_only(request: Request) -> Response:
            request = UTF8Request(request.scope, request.receive)
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError as err:
                raise Unprocessable(f"body: not UTF-8 (byte {err.start}); JSON request bodies must be UTF-8 "
                                    "encoded") from None
            return await handler(request)

        return utf8_only


AUDIT_SCOPE_KEY = "statekv.audit"  # the request's AuditRecord in its ASGI scope


class AuditMiddleware:
    """One audit line per HTTP request once its response has ended (streams too), and the end of its admission."""

    def __init__(self, app: Any, *, with_question: bool = False) -> None:
        self.app, self.with_question = app, with_question

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[AUDIT_SCOPE_KEY] = audit.AuditRecord(scope.get("method", ""), scope.get("path", ""))
        status = 500  # unless a response starts

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if record.admission is not None:
                record.admission.release(record.fields["tokens"] or 0)
            audit.emit(record, status, with_question=self.with_question)


def _record(request: Request) -> audit.AuditRecord:
    record = request.scope.get(AUDIT_SCOPE_KEY)
    return record if record is not None else audit.AuditRecord(request.method, request.url.path)


def _counted(events: Iterator[dict[str, Any]], record: audit.AuditRecord) -> Iterator[dict[str, Any]]:
    """`events`, counting token events into the audit record; closing it closes `events` at once."""
    record.fields["tokens"] = 0
    try:
        for event in events:
            if event.get("type") == "token":
                record.fields["tokens"] += 1
            yield event
    finally:
        events.close()


def _consume(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a ClientGone nobody waits for is not an "unretrieved exception"


async def _answer_unless_gone(service: QueryService, request: Request, fields: dict[str, Any]) -> Any:
    """Run `service.ask` in a worker thread; stop it at the next token once the client disconnects."""
    stop = threading.Event()
    work = asyncio.ensure_future(run_in_threadpool(functools.partial(service.ask, cancelled=stop.is_set, **fields)))
    work.add_done_callback(_consume)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the client left, or Serve cancelled this request because it did
        if not work.done():
            stop.set()
        gone.cancel()
    if not work.done():
        logger.info("client of %s left; its answer was stopped", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return work.result()


def create_api(service: QueryService, access: AccessControl | None = None, *,
               audit_questions: bool = False) -> FastAPI:
    """The HTTP API over `service`, its schema built from the service's limits; `access` decides who may ask
    (None: everyone, for in-process callers that wire their own rule)."""
    AskRequest = service.ask_model
    keys = access is not None and access.keys is not None
    api = FastAPI(title="statekv query service", version="1", docs_url=None, redoc_url=None,  # /docs: below
                  description="Answers questions about videos from their stored KV caches, without prefilling "
                              "again. Every error body is {\"error\": {\"code\", \"message\"}}. Request bodies "
                              "are JSON in UTF-8." + (" Every /v1 request carries `Authorization: Bearer <secret>`."
                                                      if keys else ""))
    api.router.route_class = UTF8Route
    api.add_middleware(AuditMiddleware, with_question=audit_questions)
    auth_errors = (401, 403, 429) if keys else (403,) if access is not None else ()

    async def admit(request: Request, *, listing: bool) -> Caller:
        if access is None:
            return Caller(None, None)
        record = _record(request)
        entry = await run_in_threadpool(access.authenticate, request.headers.getlist("authorization"),
                                        request.client.host if request.client else None)
        record.fields["key_id"] = None if entry is None else entry.id
        caller = access.authorize(entry, listing=listing)
        record.admission = caller.admission
        return caller

    if keys:
        bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                            description="an API key's secret (`statekv keys new` prints it once)")

        async def reader(request: Request, _: Any = Security(bearer)) -> Caller:
            return await admit(request, listing=False)

        async def lister(request: Request, _: Any = Security(bearer)) -> Caller:
            return await admit(request, listing=True)
    else:
        async def reader(request: Request) -> Caller:
            return await admit(request, listing=False)

        async def lister(request: Request) -> Caller:
            return await admit(request, listing=True)

    @api.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
        return _error(err.status, err.code, err.message, err.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", validation_message(list(err.errors())))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error(err.status_code, code, str(err.detail), getattr(err, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=err)
        return _error(500, "internal", "internal error; the server log has the details")

    @api.post("/v1/ask", response_model=AskResponse, responses={
        **error_responses(400, *auth_errors, 404, 409, 413, 422, 500, 503),
        200: {"content": {"text/event-stream": {}},
              "description": "the answer; with stream=true, server-sent events: {type: token} per token, then "
                             "{type: done} with the whole answer, or {type: error, error} if it failed midway"}})
    async def ask(body: AskRequest, request: Request, caller: Caller = Depends(reader)):
        fields = body.model_dump(exclude={"stream"}, exclude_unset=True)  # what was sent, validated again there
        record = _record(request)
        record.question = body.question
        record.fields["video_id"] = body.video_id if "video_id" in fields else _video_of(service, body.cache_uri)
        if body.stream:  # errors before the first token are raised here, with their status
            events = await run_in_threadpool(functools.partial(service.stream, scope=caller.scope, **fields))
            return EventStream(_counted(events, record), request.url.path)
        try:
            result = await _answer_unless_gone(service, request, {**fields, "scope": caller.scope})
        except ClientGone:
            return Response(status_code=499)
        if isinstance(result, dict):
            record.fields["tokens"] = result["tokens"]["generated"]
        return result

    @api.get("/v1/videos", response_model=VideoPage, responses=error_responses(*auth_errors, 422, 500, 503))
    def videos(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
               caller: Caller = Depends(lister)):
        return service.list_videos(limit=limit, offset=offset, scope=caller.scope)

    @api.get("/v1/videos/{video_id:path}", response_model=VideoInfo,
             responses=error_responses(*auth_errors, 404, 422, 500, 503))
    def video(request: Request, video_id: str = Path(..., json_schema_extra={"pattern": VIDEO_ID_PATTERN}),
              caller: Caller = Depends(reader)):  # the pattern is enforced by describe
        _record(request).fields["video_id"] = video_id
        return service.describe(video_id, scope=caller.scope)

    @api.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs():  # the reference from the schema, with no asset from elsewhere (a CDN is out of reach on clusters)
        return HTMLResponse(render_docs(api.openapi()))

    @api.get("/healthz", response_model=Health, responses=error_responses(500))
    def healthz():  # open to every client (probes): with keys it does not name the root
        """Liveness: 200 while the model is loaded; `status` "degraded" while the cache store cannot be read."""
        return service.health(name_root=not keys)

    @api.get("/readyz", response_model=Ready, responses=error_responses(503))
    def readyz():  # open to every client (a readiness probe): says nothing about the corpus
        """Readiness: 200 while the cache store can be read (checked at most every few seconds), else the 503 a
        request would get, so a load balancer or a Kubernetes readiness probe routes around this replica."""
        error = service.storage.status()
        if error is not None:
            raise error
        return {"status": "ready"}

    return api


def _video_of(service: QueryService, cache_uri: str | None) -> str | None:
    """The video id a cache_uri names, for the audit line (None when it is outside the root)."""
    try:
        return service.resolve(cache_uri=cache_uri)
    except ServiceError:
        return None


def access_from_config(config: ServiceConfig, root: str) -> AccessControl:
    """The access rule a replica enforces: the key file's keys, else loopback only, else (no_auth) everyone."""
    keys = KeyStore(config.api_keys_file, check_every_s=config.keys_check_s) if config.api_keys_file else None
    return AccessControl(root, keys=keys, no_auth=config.no_auth, defaults=config.limits())


@serve.deployment(name="QueryService", max_ongoing_requests=16, health_check_period_s=10,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0})
@serve.ingress()
class QueryDeployment:
    """One replica: the model loaded once, caches in a byte-bounded LRU, the HTTP API of `create_api`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServiceConfig.from_dict(config)
        audit.configure(sys.stderr)  # this replica's entry point: audit lines to its log
        self.service = QueryService.from_config(self.config)
        self.access = access_from_config(self.config, self.service.root)  # a bad key file stops the replica here

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service, self.access, audit_questions=self.config.audit_questions)

    def check_health(self) -> None:
        self.service.check_health()

    def stats(self) -> dict[str, Any]:
        """For tests and operators through a handle: LRU state and vision-tower / prefill / token counters, the
        device LRU of answer contexts, and the batch scheduler's forwards (fewer than tokens when it batches)."""
        batcher = self.service.batcher
        return {"lru": self.service.lru.stats(), "counters": dict(self.service.counters),
                "device_cache": self.service.engine.device_caches.stats(),
                "batching": {"steps": batcher.steps, "max_batch": batcher.max_batch,
                             "max_batch_seen": batcher.max_seen_batch}}


def build_app(config: ServiceConfig | dict[str, Any]) -> serve.Application:
    """The query-service application for `serve.run`, with resources and autoscaling from `config`."""
    if isinstance(config, dict):
        config = ServiceConfig.from_dict(config)
    if config.no_auth:
        logger.warning("the query service checks no API keys (no_auth): every client that reaches its port can ask "
                       "about, list and load every video under %s", config.caches_root)
    autoscaling = dict(config.autoscaling)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": config.num_gpus, "num_cpus": config.num_cpus},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if autoscaling.get("min_replicas") == autoscaling.get("max_replicas") and "initial_replicas" not in autoscaling:
        options["num_replicas"] = autoscaling.get("min_replicas", 1)
    else:
        options["autoscaling_config"] = autoscaling
    return QueryDeployment.options(**options).bind(config.to_dict())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry for `serve run` / `serve deploy` (import_path pipelines.serving.app:app_builder, `args` = settings)."""
    return build_app(ServiceConfig.from_dict(dict(args)))
