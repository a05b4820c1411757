"""Ray Serve glue of the query service: a FastAPI ingress whose handlers parse input and delegate to
`QueryService` (service.py), `build_app(config)` and the `app_builder(args)` that `serve run` / `serve deploy` use.

    POST /v1/ask                 {video_id | cache_uri, question, max_new_tokens, temperature, top_p, seed, stream}
    GET  /v1/videos?limit=&offset=
    GET  /v1/videos/{video_id}
    GET  /healthz
    GET  /openapi.json, /docs
"""

# no `from __future__ import annotations`: Serve's ingress rewrites handler signatures, and FastAPI must see
# the real classes (a string annotation makes the body a query parameter)
import json
import logging
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serving.config import ServiceConfig
from pipelines.serving.service import QueryService, ServiceError

logger = logging.getLogger(__name__)


# --- request and response bodies -----------------------------------------------------------------------------------

class AskRequest(BaseModel):
    """A question about one stored video, named by `video_id` (under the service's root) or `cache_uri`."""

    model_config = ConfigDict(extra="forbid")

    video_id: str | None = Field(None, max_length=200, examples=["clip"])
    cache_uri: str | None = Field(None, max_length=2048, examples=["s3://bucket/caches/clip"])
    question: str = Field(..., min_length=1, max_length=100_000, examples=["What happens in the video?"])
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="default: 64, or the service's limit if lower")
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False


class Tokens(BaseModel):
    prompt: int
    context: int
    generated: int


class Timings(BaseModel):
    load_s: float
    first_token_s: float
    total_s: float


class AskResponse(BaseModel):
    answer: str
    video_id: str
    finish_reason: str
    token_ids: list[int]
    tokens: Tokens
    timings: Timings
    cache: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "video_id or cache_uri outside the cache root"), (404, "no committed cache for that video"),
        (409, "the cache was made with another model"), (413, "question longer than the service's limit"),
        (422, "malformed request"), (503, "cache store unreachable (see Retry-After)"))
}


# --- the FastAPI app -------------------------------------------------------------------------------------------------

api = FastAPI(title="statekv query service",
              description="Answers questions about videos from their stored KV caches, without prefilling again.",
              version="1")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
    return _error(err.status, err.code, err.message, err.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors())
    return _error(422, "invalid_request", problems or "malformed request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return _error(err.status_code, code, str(err.detail), getattr(err, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal", "internal error; the server log has the details")


def _sse(events) -> Any:
    """Server-sent events: one `data: {json}` per token, a final "done" one (or an "error" one)."""
    try:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except ServiceError as err:
        yield f"data: {json.dumps({'type': 'error', **err.body()})}\n\n"


@serve.deployment(name="QueryService", max_ongoing_requests=16, health_check_period_s=10,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0})
@serve.ingress(api)
class QueryDeployment:
    """One replica: the model loaded once, caches in a byte-bounded LRU; handlers delegate to QueryService."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.service = QueryService.from_config(ServiceConfig.from_dict(config))

    @api.post("/v1/ask", response_model=AskResponse, responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}},
                        "description": "the answer; with stream=true, server-sent events"}})
    def ask(self, body: AskRequest):
        options = body.model_dump(exclude={"stream"})
        if body.stream:
            events = self.service.stream(**options)  # errors before the first token are raised here
            return StreamingResponse(_sse(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return self.service.ask(**options)

    @api.get("/v1/videos", responses=ERRORS)
    def videos(self, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        return self.service.list_videos(limit=limit, offset=offset)

    @api.get("/v1/videos/{video_id:path}", responses=ERRORS)
    def video(self, video_id: str) -> dict[str, Any]:
        return self.service.describe(video_id)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return self.service.health()

    def check_health(self) -> None:
        self.service.check_health()

    def stats(self) -> dict[str, Any]:
        """For tests and operators through a handle: LRU state and vision-tower / prefill call counters."""
        return {"lru": self.service.lru.stats(), "counters": dict(self.service.counters)}


def build_app(config: ServiceConfig | dict[str, Any]) -> serve.Application:
    """The query-service application for `serve.run`, with resources and autoscaling from `config`."""
    if isinstance(config, dict):
        config = ServiceConfig.from_dict(config)
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
