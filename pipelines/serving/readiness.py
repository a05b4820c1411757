"""Readiness of a replica, apart from its liveness: can it read the cache store now?

A replica whose model is loaded is alive (`/healthz` answers 200, and Serve does not restart it: a restart would not
bring credentials or a network back). It is *ready* only while the store answers: `/readyz` is 503
`storage_unavailable` when it does not, and `/healthz` says "degraded" — what a Kubernetes readiness probe and a
load balancer need to route around it. The store is asked at most once per `every_s` seconds, however often the
probes come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pipelines.serving.errors import ServiceError

DEFAULT_EVERY_S = 5.0


class StorageProbe:
    """Runs `check` (raises a ServiceError when the store cannot be read) at most every `every_s` seconds and
    remembers the outcome: `status()` is None while the store answers, else the error a request would get."""

    def __init__(self, check: Callable[[], None], *, every_s: float = DEFAULT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._check, self.every_s, self._clock = check, float(every_s), clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._error: ServiceError | None = None

    def status(self) -> ServiceError | None:
        """The store's error (None: it answers), from a check at most `every_s` old."""
        with self._lock:  # one check at a time; probes arriving meanwhile share its result
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self.every_s:
                try:
                    self._check()
                    self._error = None
                except ServiceError as err:
                    self._error = err
                self._checked_at = self._clock()
            return self._error
