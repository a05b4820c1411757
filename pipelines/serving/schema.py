"""The query service's API types: the one definition of what a request may hold and what a response holds.

The request model is built from the service's own limits (`ask_request_model`), so the OpenAPI schema states
exactly the limits that are enforced, and the plain `QueryService` validates its Python callers through the same
model. Types are strict: `"7"` is not a seed and `"yes"` is not a boolean. What JSON Schema cannot say (the
question's limit in tokens, a `cache_uri` under the root) is in the field descriptions and the listed errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# the store's one rule for video ids (one path segment, no traversal, no reserved names); it uses look-arounds, so
# the models that carry it validate with Python's `re` (pydantic's default Rust engine has none)
from statekv.retrieval import Retrieval, retrieval_setting
from statekv.video_ids import VIDEO_ID_PATTERN

DEFAULT_MAX_NEW_TOKENS = 64  # when a request gives none (capped by the service's limit)
MAX_SEED = 2**53 - 1  # exact in every JSON parser (and in the schema, whose bounds are floats)
MAX_TEMPERATURE = 100.0  # above this sampling is uniform for any model; a larger value is a mistake
MAX_RETRIEVAL_CHUNKS = 1 << 20  # a budget above a video's chunk count takes every chunk; above this it is a mistake


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # an optional field that, when given, must be a string (never null)


class RetrievalRequest(BaseModel):
    """Query-time retrieval: attend to the prefix, the chunks chosen for this question, and the question only.

    Exactly one of `top_k` (ReKV: the k best-scoring chunks per layer, `statekv.retrieval.TopK`) or `segments`
    (StreamKV: a budget of k chunks per layer filled with whole best-scoring scenes, `statekv.retrieval.Segments`).
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["top_k"]}, {"required": ["segments"],
                                            "not": {"anyOf": [{"required": ["adaptive"]}, {"required": ["query"]}]}}]})

    top_k: int = Field(None, ge=1, le=MAX_RETRIEVAL_CHUNKS, examples=[64], json_schema_extra=_no_default,
                       description="ReKV: the k chunks per layer whose summary keys score highest for the question")
    segments: int = Field(None, ge=1, le=MAX_RETRIEVAL_CHUNKS, examples=[64], json_schema_extra=_no_default,
                          description="StreamKV: k chunks per layer, taken as whole scenes, best-scoring first")
    recent: int = Field(None, ge=0, le=MAX_RETRIEVAL_CHUNKS, json_schema_extra=_no_default,
                        description="the last `recent` chunks too, always (default: 0 with top_k, 8 with segments)")
    adaptive: bool = Field(False, description="top_k only: share k x layers across layers, more to the layers whose "
                                              "scores concentrate on few chunks")
    query: Literal["prompt", "question"] = Field(
        None, json_schema_extra=_no_default,
        description="top_k only: what scores the chunks — the whole prompt after RoPE (default) or, as ReKV "
                    "publishes it, the bare question before RoPE")

    @model_validator(mode="after")
    def _one_kind(self) -> "RetrievalRequest":
        if ("top_k" in self.model_fields_set) == ("segments" in self.model_fields_set):
            raise ValueError("give exactly one of top_k and segments")
        if "segments" in self.model_fields_set and "adaptive" in self.model_fields_set:
            raise ValueError("adaptive: only with top_k")
        if "segments" in self.model_fields_set and "query" in self.model_fields_set:
            raise ValueError("query: only with top_k")
        return self

    def setting(self) -> Retrieval:
        """The library's retrieval setting for this request."""
        return retrieval_setting(top_k=self.top_k, segments=self.segments, recent=self.recent,
                                 adaptive=self.adaptive, query=self.query)


class AskRequestBase(BaseModel):
    """A question about one stored video, named by exactly one of `video_id` or `cache_uri`."""

    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re", json_schema_extra={
        "oneOf": [{"required": ["video_id"]}, {"required": ["cache_uri"]}]})

    video_id: str = Field(None, pattern=VIDEO_ID_PATTERN, examples=["clip"], json_schema_extra=_no_default,
                          description="a cache directly under the service's root")
    cache_uri: str = Field(None, min_length=1, max_length=2048, examples=["s3://bucket/caches/clip"],
                           json_schema_extra=_no_default,
                           description="<root>/<video_id> spelled exactly; anything else is 400 outside_root")
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="0 is greedy; a temperature too small to represent is greedy too")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                         description="nucleus sampling mass; the most likely token is always kept")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
    stream: bool = Field(False, description="answer as server-sent events, one per token")
    retrieval: RetrievalRequest | None = Field(None, description="answer from the chunks chosen for the question "
                                               "(the response then lists them as `evidence`); absent or null: from "
                                               "every chunk. 409 retrieval_unsupported for a cache that keeps none")

    @model_validator(mode="after")
    def _one_video(self) -> "AskRequestBase":
        if ("video_id" in self.model_fields_set) == ("cache_uri" in self.model_fields_set):
            raise ValueError("give exactly one of video_id and cache_uri")
        return self


def ask_request_model(*, max_new_tokens_limit: int, max_question_chars: int,
                      max_question_tokens: int) -> type[AskRequestBase]:
    """The request body of POST /v1/ask with this service's limits as schema bounds."""
    default_tokens = min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit)

    class AskRequest(AskRequestBase):
        question: str = Field(..., min_length=1, max_length=max_question_chars,
                              examples=["What happens in the video?"],
                              description=f"at most {max_question_chars} characters and at most "
                                          f"{max_question_tokens} tokens (413 question_too_long)")
        max_new_tokens: int = Field(default_tokens, ge=1, le=max_new_tokens_limit,
                                    description="tokens to generate at most")

    return AskRequest


def validation_message(err: ValidationError | list[dict[str, Any]]) -> str:
    """One line naming each offending field and why (never the input value)."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "malformed request"


# --- responses -------------------------------------------------------------------------------------------------

class Tokens(BaseModel):
    prompt: int = Field(description="question tokens with the chat template around them")
    context: int = Field(description="prefix and video tokens the answer attended to (with retrieval: the prefix "
                                     "and the chunks of `evidence`, those any layer attended to)")
    generated: int


class Evidence(BaseModel):
    """A chunk the answer attended to (with retrieval) and where it is in the source video."""

    chunk: int = Field(description="chunk index in the cache")
    start_s: float = Field(description="time of the chunk's first frame in the source video, seconds")
    end_s: float = Field(description="end of the chunk: the next chunk's first frame time, the video's duration for "
                                     "the last chunk (chunk ranges tile the video)")
    score: float = Field(description="mean relevance score (question query · summary key) over the layers that "
                                     "chose it")
    layers: int = Field(description="how many layers attended to it")


class Timings(BaseModel):
    load_s: float
    first_token_s: float
    total_s: float


class AskResponse(BaseModel):
    answer: str
    video_id: str
    finish_reason: Literal["eos", "length"]
    token_ids: list[int]
    tokens: Tokens
    timings: Timings
    cache: Literal["hit", "miss"]
    evidence: list[Evidence] | None = Field(None, description="with retrieval: the chunks any layer attended to, in "
                                                              "temporal order, with their time ranges; null without")


class VideoEntry(BaseModel):
    video_id: str
    uri: str | None = Field(description="the cache's URI for cache_uri (null under a local root: use video_id)")
    chunks: int
    tokens: int
    bytes: int
    storage: str
    created: str
    fingerprint: str
    compatible: bool = Field(description="made with this service's model")


class InvalidEntry(BaseModel):
    video_id: str
    reason: str


class VideoPage(BaseModel):
    videos: list[VideoEntry]
    invalid: list[InvalidEntry] = Field(description="caches under the root that cannot be served, and why")
    total: int
    limit: int
    offset: int
    next_offset: int | None


class VideoInfo(BaseModel):
    video_id: str
    uri: str | None
    source: str | None
    model: dict[str, str]
    compatible: bool
    policy: dict[str, Any]
    prefill: dict[str, Any] = Field(description="the prefill config the cache was made with")
    family: dict[str, Any] = Field(description="the model family and its position cursor")
    frames: dict[str, int | float]
    duration_s: float
    tokens: dict[str, Any]
    state_tokens: int | None
    storage: str
    dtype: str
    bytes: int
    files: int
    created: str
    statekv_version: str
    summary: str


class Ready(BaseModel):
    status: Literal["ready"]


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded: alive, but the cache store cannot be read now "
                                                          "(GET /readyz is 503 meanwhile)")
    storage: str = Field(description="\"ok\", or the error code a request gets now (e.g. storage_unavailable)")
    model: str
    model_type: str
    fingerprint: str
    caches_root: str | None = Field(description="the root's URI (null for a local root)")
    lru: dict[str, int]
    counters: dict[str, int]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


_STATUS = {
    400: "outside_root: cache_uri is not <root>/<video_id> under this service's root",
    401: "unauthorized: no API key, or not a valid one (unknown, revoked, mistyped); see WWW-Authenticate",
    403: "forbidden: the key may not read this service's root, or (GET /v1/videos) may not list; loopback_only: "
         "the service has no API keys and answers loopback clients only",
    404: "not_found: no committed cache for that video, or one outside the key's scope (answered alike)",
    409: "model_mismatch: the cache was made with another model; cache_outdated: the cache was built on an older "
         "token layout of its model's family (re-index the video); retrieval_unsupported: the request asks for "
         "retrieval and the cache keeps no chunks to retrieve (answer_from=state) or no scenes (segments)",
    413: "question_too_long: the question has more tokens than the service takes (the limit is in the message)",
    429: "rate_limited: the key is over its request rate, its generated-token rate or its requests in flight "
         "(see Retry-After)",
    422: "invalid_request: the body or a parameter does not match this schema, or the body is not UTF-8",
    500: "cache_corrupt: the stored cache is damaged or its position cursor unusable (re-prefill the video); "
         "internal: a server fault",
    503: "storage_unavailable: the cache store is unreachable or dropped the connection (see Retry-After); "
         "cache_changed: the cache was committed again while it was read (retry at once)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses an operation returns."""
    return {s: {"model": ErrorBody, "description": _STATUS[s]} for s in statuses}
