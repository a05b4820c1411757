"""Per-key limits of the query service: a token bucket of requests, a token bucket of generated tokens, and a cap
on requests in flight, so that one client cannot starve the others or fill the host LRU with caches only it asks
about. Plain classes, no Ray and no HTTP; the state is per replica (N replicas admit up to N times the limits).

A request is admitted when the key has fewer than `max_concurrent` requests in flight, its generated-token bucket
holds at least one token, and its request bucket holds one request; the tokens a request generated are charged when it ends
(so the token bucket can go into debt, and the key's next request waits until it has refilled).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.serving.errors import TooManyRequests


@dataclass(frozen=True)
class Limits:
    """One key's limits (the service's defaults, overridden per key in the key file)."""

    requests_per_s: float = 5.0  # sustained request rate
    request_burst: float = 20.0  # requests that may come at once after a quiet spell
    tokens_per_s: float = 1000.0  # sustained generated tokens per second
    token_burst: float = 8192.0  # generated tokens that may be spent at once
    max_concurrent: float = 4.0  # requests in flight at once (streams until they end)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")


class TokenBucket:
    """`capacity` units, refilled at `rate` per second; `level` may go below 0 (a debt) when charged after use."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = float(rate), float(capacity)
        self.level, self._at = self.capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: float, now: float) -> float:
        """Take `n` units and return 0, or take nothing and return the seconds until `n` are there."""
        self._refill(now)
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate

    def wait_for(self, n: float, now: float) -> float:
        """0 if the bucket holds `n` units (without taking them), else the seconds until it does."""
        self._refill(now)
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def charge(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n


class _KeyState:
    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.requests = TokenBucket(limits.requests_per_s, limits.request_burst, now)
        self.tokens = TokenBucket(limits.tokens_per_s, limits.token_burst, now)
        self.in_flight = 0


class Admission:
    """A request admitted for a key; `release(tokens)` once when it ends (charges the tokens it generated)."""

    def __init__(self, limiter: "KeyLimiter", key_id: str) -> None:
        self._limiter, self.key_id, self._released = limiter, key_id, False

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.key_id, tokens)


class KeyLimiter:
    """The limits of every key of one replica."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key_id: str, limits: Limits) -> Admission:
        """Admit one request of `key_id`, or raise TooManyRequests (429, Retry-After) naming the limit it hit."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(key_id)
            if state is None or state.limits != limits:  # new key, or its limits changed in the key file
                fresh = _KeyState(limits, now)
                if state is not None:
                    fresh.in_flight = state.in_flight
                state = self._keys[key_id] = fresh
            if state.in_flight >= limits.max_concurrent:
                raise TooManyRequests(f"key {key_id!r} has {state.in_flight} requests in flight, its limit; retry "
                                      "when one has ended", retry_after_s=1)
            wait = state.tokens.wait_for(1, now)
            if wait > 0:
                raise TooManyRequests(f"key {key_id!r} is over its generated-token rate ({limits.tokens_per_s:g}/s)",
                                      retry_after_s=wait)
            wait = state.requests.take(1, now)
            if wait > 0:
                raise TooManyRequests(f"key {key_id!r} is over its request rate ({limits.requests_per_s:g}/s, burst "
                                      f"{limits.request_burst:g})", retry_after_s=wait)
            state.in_flight += 1
        return Admission(self, key_id)

    def _release(self, key_id: str, tokens: int) -> None:
        with self._lock:
            state = self._keys[key_id]
            state.in_flight -= 1
            if tokens:
                state.tokens.charge(tokens, self._clock())

    def in_flight(self, key_id: str) -> int:
        with self._lock:
            state = self._keys.get(key_id)
            return 0 if state is None else state.in_flight
