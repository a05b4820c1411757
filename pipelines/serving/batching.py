"""Batched answering on one replica: every question (plain, streamed, with retrieval) goes through one scheduler.

One thread runs the replica's `statekv.answering.Scheduler`: requests (from any number of request threads) are
grouped by the cache they ask about, admitted into that video's decoder between steps (up to `max_batch` at once,
the rest wait their turn), and the thread steps one decoder per video per round, so questions about different
videos interleave fairly. Streamed questions are read back at every step and their token events handed to the
request's thread as they come (their batch mates are read back with them); retrieval questions attend to their own
chosen chunks in the same batch (statekv/decoding.py).

Cancellation: each request's `cancelled()` is polled before every step of its group; once it returns True its
question leaves the batch (its slot is reused) and its caller gets `ClientGone`.

Failures: an error goes to the callers of the questions it concerns, never to others and never to the thread (a
question whose prompt cannot be built fails alone; a cache whose decoder cannot be built fails its own questions).
Plain Python threads, no Ray: the query service (service.py) uses it directly and tests drive it without a cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from pipelines.serving.errors import ClientGone, ServiceError
from statekv.answering import Answer, QuestionCancelled, Scheduler, Ticket, TokenEvent
from statekv.cache import VideoKVCache
from statekv.decoding import DEFAULT_SYNC_EVERY, AnswerRequest
from statekv.engine import Engine
from statekv.errors import StateKVError

logger = logging.getLogger(__name__)


class BatchScheduler:
    """Answers `submit`ted questions in batches per video, round-robin across videos, on one thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, sync_every: int = DEFAULT_SYNC_EVERY,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        self.scheduler = Scheduler(engine, max_batch=max_batch, sync_every=sync_every, on_tokens=on_tokens)
        self.engine, self.max_batch = engine, max_batch
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def steps(self) -> int:
        """Forwards run: with batching, fewer than the tokens generated."""
        return self.scheduler.steps

    @property
    def max_seen_batch(self) -> int:
        return self.scheduler.max_seen_batch

    def submit(self, cache: VideoKVCache, request: AnswerRequest, *, cancelled: Callable[[], bool] | None = None,
               label: str = "a video", on_events: Callable[[list[TokenEvent]], None] | None = None) -> Future:
        """Queue a question; the future gives its `Answer`, or raises `ClientGone` once `cancelled()` is True.
        With `on_events` the question streams: its token events are passed to it (on the scheduler's thread) as
        each step reads them back, all before the future is set."""
        future: Future = Future()
        ticket = Ticket(request, label=label, cancelled=cancelled, stream=on_events is not None, on_events=on_events,
                        on_done=lambda t: _settle(future, t))
        with self._work:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            self.scheduler.submit(cache, ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="statekv-batching", daemon=True)
                self._thread.start()
            self._work.notify()
        return future

    def answer(self, cache: VideoKVCache, request: AnswerRequest, *, cancelled: Callable[[], bool] | None = None,
               label: str = "a video") -> Answer:
        """`submit` and wait for the answer (raises what the decoding raised, or `ClientGone`)."""
        return self.submit(cache, request, cancelled=cancelled, label=label).result()

    def close(self) -> None:
        """Stop the thread after the current round; questions not yet answered get an error."""
        with self._work:
            self._closed = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._closed and not self.scheduler.busy:
                    self._work.wait()
                if self._closed:
                    self.scheduler.close(RuntimeError("the batch scheduler was closed"))
                    return
            self.scheduler.round()


def _settle(future: Future, ticket: Ticket) -> None:
    """A ticket's outcome into its future: the answer, `ClientGone` for a cancelled question, else its error (one
    log line for an error statekv raises on purpose, the traceback for anything else: a fault in the code)."""
    err = ticket.error
    if err is None:
        future.set_result(ticket.answer)
    elif isinstance(err, QuestionCancelled):
        future.set_exception(ClientGone(str(err)))
    else:
        if isinstance(err, (StateKVError, ServiceError)):
            logger.warning("a question about %r failed: %s", ticket.label, err)
        else:
            logger.error("a question about %r failed", ticket.label, exc_info=err)
        future.set_exception(err)
