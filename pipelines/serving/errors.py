"""What the query service tells clients when something fails, and what it never tells them.

Errors a caller can act on are `ServiceError`s carrying the HTTP status, a short code and a message. Client-facing
text names video ids and fields, never host paths: `public_text` strips absolute paths from any text that came
from elsewhere (an exception, a manifest), `public_name` and `public_location` shorten a local checkpoint or
video path to its last component. The server log keeps the details.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Callable
from typing import Any

from statekv.store.fs import CREDENTIAL_ERRORS, is_transport_error


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


class Unauthorized(ServiceError):
    """No API key, or one that is not valid: 401 with the `WWW-Authenticate` challenge of RFC 6750."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        challenge = 'Bearer realm="statekv"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class TooManyRequests(ServiceError):
    """A key over one of its limits: 429 with `Retry-After` (whole seconds, at least 1)."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


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


class ClientGone(Exception):
    """The client of a request disconnected; its work was stopped (nobody reads an answer)."""


# --- telling a dropped connection from a damaged cache ----------------------------------------------------------

# network errnos that Python does not map onto a ConnectionError / TimeoutError subclass (those are typed already)
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def is_network_error(err: BaseException) -> bool:
    """Whether `err` means the bytes did not arrive: the store's own rule (`statekv.store.fs.is_transport_error`,
    one list of transport types for the store and the service), except that a bare OSError counts only with a
    network errno: behind a corruption error it is pyarrow's parser refusing bytes that did arrive."""
    if type(err) is OSError:
        return err.errno in _NETWORK_ERRNOS
    return is_transport_error(err)


def network_cause(err: BaseException) -> BaseException | None:
    """The connection failure behind `err` (itself, its cause or its context, however deep), else None.

    The store turns an OSError met while reading a Parquet file into its corruption error (`raise ... from
    None` keeps the original as `__context__`); a dropped connection is not corruption, so look behind it.
    """
    return _cause(err, is_network_error)


def credential_cause(err: BaseException) -> BaseException | None:
    """The missing-credentials (or region) error behind `err`, however deep, else None: the replica's environment
    cannot reach the store (`statekv.store.fs.CREDENTIAL_ERRORS`)."""
    return _cause(err, lambda e: isinstance(e, CREDENTIAL_ERRORS))


def _cause(err: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if match(err):
            return err
        err = err.__cause__ or err.__context__
    return None


# --- keeping host paths out of client-facing text ---------------------------------------------------------------

# an absolute POSIX path (or file:// URI) not preceded by a scheme or a word: "/home/a/b.parquet" -> "b.parquet"
_ABS_PATH = re.compile(r"(?<![\w:/.])(?:file://)?/(?:[^\s'\"/:,;()\[\]]+/)*([^\s'\"/:,;()\[\]]*)")
_PARENT = re.compile(r"(?:\.\./)+")


def public_text(text: str) -> str:
    """`text` with every absolute path shortened to its last component and `../` runs removed."""
    return _PARENT.sub("", _ABS_PATH.sub(lambda m: m.group(1) or "<path>", text))


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", "~", "./", "../", "file://")) or os.path.isabs(name) or os.path.isdir(name)


def public_name(name_or_path: str) -> str:
    """A model's hub id as is; a local checkpoint directory by its last component."""
    name = str(name_or_path)
    if _is_local_path(name):
        return os.path.basename(name.rstrip("/")) or "<local model>"
    return name


def public_location(uri: str | None) -> str | None:
    """A remote URI (s3://bucket/key) without credentials or query; a local path by its last component."""
    if not uri:
        return uri
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        host, _, path = rest.partition("/")
        host = host.rsplit("@", 1)[-1]  # drop user:password@
        return f"{scheme}://{host}/{path}".split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return os.path.basename(uri.removeprefix("file://").rstrip("/")) or None
