"""The audit log of the query service: one JSON line per request on the `statekv.audit` logger.

Each line holds who asked (key id, or null without keys), what (method, route path, video id), the status, the
tokens generated and the latency. Never the secret; the question's text only when the operator turns
`audit_questions` on. Where the lines go is the entry point's choice (the Serve replica sends them to its stderr).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

AUDIT_LOGGER = "statekv.audit"
logger = logging.getLogger(AUDIT_LOGGER)


class AuditRecord:
    """What one request's handlers learn (key, video, tokens, question) for its audit line."""

    def __init__(self, method: str, path: str) -> None:
        self.start = time.perf_counter()
        self.fields: dict[str, Any] = {"method": method, "path": path, "key_id": None, "video_id": None,
                                       "tokens": None}
        self.question: str | None = None
        self.admission: Any = None  # limits.Admission released when the response has ended

    def line(self, status: int, *, with_question: bool) -> str:
        out = {"event": "request", **self.fields, "status": status,
               "latency_s": round(time.perf_counter() - self.start, 6)}
        if with_question and self.question is not None:
            out["question"] = self.question
        return json.dumps(out, ensure_ascii=True)


def emit(record: AuditRecord, status: int, *, with_question: bool = False) -> None:
    """Log `record`'s line at INFO on the audit logger."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(record.line(status, with_question=with_question))


def configure(stream: Any) -> None:
    """Entry points: send audit lines, message only, to `stream` (once; the logger does not propagate)."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
