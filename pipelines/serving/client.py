"""A small client of the query service for `statekv ask --service URL`: one POST /v1/ask with the API key from
the environment, the answer (or its server-sent events) back. Standard library only (no Ray, no HTTP package), so
the command stays light.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

API_KEY_ENV = "STATEKV_API_KEY"  # where clients take the secret from (never a command-line flag: shells log those)


class ServiceRequestError(OSError):
    """The service answered an error (its status, code and message), or could not be reached."""


def _request(url: str, body: dict[str, Any], api_key: str | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(url.rstrip("/") + "/v1/ask", data=json.dumps(body).encode("utf-8"),
                                  headers=headers, method="POST")


def _error(err: urllib.error.HTTPError, api_key: str | None) -> ServiceRequestError:
    try:
        detail = json.loads(err.read().decode("utf-8"))["error"]
        text = f"{err.code} {detail['code']}: {detail['message']}"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {err.code}"
    if err.code == 401 and not api_key:
        text += f" (set {API_KEY_ENV} to the key's secret)"
    return ServiceRequestError(f"the service refused the question: {text}")


def ask(url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """POST `body` to `<url>/v1/ask` (non-streaming); the response body. The key defaults to $STATEKV_API_KEY."""
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        with urllib.request.urlopen(_request(url, {**body, "stream": False}, api_key), timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        raise _error(err, api_key) from None


def stream(url: str, body: dict[str, Any], *, api_key: str | None = None,
           timeout: float = 600.0) -> Iterator[dict[str, Any]]:
    """The events of a streamed answer (token events, then "done"); an "error" event raises ServiceRequestError."""
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        response = urllib.request.urlopen(_request(url, {**body, "stream": True}, api_key), timeout=timeout)
    except urllib.error.HTTPError as err:
        raise _error(err, api_key) from None
    with response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if event.get("type") == "error":
                raise ServiceRequestError(f"the answer failed midway: {event['error']['code']}: "
                                          f"{event['error']['message']}")
            yield event
