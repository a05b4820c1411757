"""Batched answering on one replica: questions that arrive concurrently about the same video are decoded together.

One scheduler thread owns the batched decoding of a replica. Requests (from any number of request threads) are
grouped by the cache they ask about; each group has one `statekv.decoding.BatchDecoder` over the video's shared
device KV, to which questions are admitted between steps (up to `max_batch` at once, the rest wait their turn).
The thread goes round the groups and runs ONE step of each per round, so questions about different videos
interleave fairly (a video with 30 questions in flight does not starve one with a single question), and every
question has its own prompt length, `max_new_tokens`, sampling and stopping (statekv/decoding.py).

Cancellation: each request's `cancelled()` is polled before every step of its group; once it returns True its
question leaves the batch (its slot is reused) and its caller gets `ClientGone`.

Failures: an error goes to the callers of the questions it concerns, never to others and never to the thread (a
question whose prompt cannot be built fails alone; a cache whose decoder cannot be built fails its own questions).

Streaming answers are not batched here (their tokens go out one by one from the request's own thread through
`Engine.stream`); neither are answers with retrieval, whose context differs per question. Plain Python threads,
no Ray: the query service (service.py) uses it directly and tests drive it without a cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pipelines.serving.errors import ClientGone
from statekv.cache import VideoKVCache
from statekv.decoding import DEFAULT_SYNC_EVERY, AnswerRequest, BatchDecoder, Decoding
from statekv.engine import Answer, Engine
from statekv.errors import StateKVError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request: AnswerRequest
    label: str  # what the question is about, for messages
    cancelled: Callable[[], bool] | None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    decoding: Decoding | None = None


@dataclass(eq=False)
class _Group:
    """The questions about one cache: waiting ones and the decoder of the running ones."""

    cache: VideoKVCache
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    decoder: BatchDecoder | None = None


class BatchScheduler:
    """Answers `submit`ted questions in batches per video, round-robin across videos, on one thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, sync_every: int = DEFAULT_SYNC_EVERY,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch, self.sync_every = engine, max_batch, sync_every
        self.on_tokens = on_tokens  # told how many answer tokens were read back (the service's counter)
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # forwards run: with batching, fewer than the tokens generated
        self.max_seen_batch = 0

    def submit(self, cache: VideoKVCache, request: AnswerRequest, *, cancelled: Callable[[], bool] | None = None,
               label: str = "a video") -> Future:
        """Queue a question; the future gives its `Answer`, or raises `ClientGone` once `cancelled()` is True."""
        job = _Job(request, label, cancelled)
        with self._work:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            group = self._groups.get(id(cache))
            if group is None or group.cache is not cache:
                group = self._groups[id(cache)] = _Group(cache)
            group.waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="statekv-batching", daemon=True)
                self._thread.start()
            self._work.notify()
        return job.future

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

    # --- the scheduler thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._closed and not self._groups:
                    self._work.wait()
                if self._closed:
                    for group in self._groups.values():
                        for job in (*group.waiting, *group.running):
                            job.future.set_exception(RuntimeError("the batch scheduler was closed"))
                    self._groups.clear()
                    return
                groups = list(self._groups.items())
            for key, group in groups:  # one step per video per round: fair interleaving
                with torch.inference_mode():
                    self._advance(group)
                with self._work:
                    if not group.waiting and not group.running and self._groups.get(key) is group:
                        del self._groups[key]

    def _advance(self, group: _Group) -> None:
        """Drop cancelled questions, admit waiting ones, run one step, deliver the finished answers.

        A failure is delivered to the questions it concerns and to no other: preparing one question's prompt fails
        that question; building the video's decoder fails the questions about that video; a step fails the
        questions it ran (the waiting ones get a new decoder next round). The thread itself goes on.
        """
        with self._work:
            waiting = list(group.waiting)
            group.waiting.clear()
        for job in waiting:
            if job.cancelled is not None and job.cancelled():
                job.future.set_exception(ClientGone(f"the client of a question about {job.label!r} left before "
                                                    "its answer started"))
            else:
                group.waiting.append(job)
        if group.decoder is None and group.waiting:
            try:
                group.decoder = self.engine.decoder(group.cache, max_batch=self.max_batch,
                                                    sync_every=self.sync_every)
            except Exception as err:  # noqa: BLE001 - delivered to every question about this video, not swallowed
                self._fail(list(group.waiting), err, "the video's answer context")
                group.waiting.clear()
                return
        for job in list(group.running):
            if job.cancelled is not None and job.cancelled():
                group.decoder.remove(job.decoding)
                group.running.remove(job)
                n = len(job.decoding.tokens) + len(job.decoding.pending)
                job.future.set_exception(ClientGone(f"the client of a question about {job.label!r} left "
                                                    f"after {n} tokens"))
        while group.waiting and group.decoder.room:
            job = group.waiting.popleft()
            try:
                prompt = self.engine.answer_prompt(group.cache, job.request.question)
                job.decoding = group.decoder.add(job.request, prompt)
            except Exception as err:  # noqa: BLE001 - delivered to this question's caller, not swallowed
                self._fail([job], err, "its prompt")
                continue
            job.decoding.started = job.submitted  # latencies count the wait in the queue
            group.running.append(job)
        if not group.running:
            group.decoder = None
            return
        self.max_seen_batch = max(self.max_seen_batch, len(group.running))
        try:
            finished = set(group.decoder.step())
        except Exception as err:  # noqa: BLE001 - delivered to the questions of this step, not swallowed
            self._fail(list(group.running), err, "a decoding step")
            group.running.clear()
            group.decoder = None  # its state is unknown; questions still waiting get a new one
            return
        self.steps += 1
        read = 0
        for job in list(group.running):
            read += len(job.decoding.take())
            if job.decoding in finished:
                group.running.remove(job)
                try:
                    answer = self.engine.answer_of(group.cache, job.decoding)
                except Exception as err:  # noqa: BLE001 - delivered to this question's caller, not swallowed
                    self._fail([job], err, "its answer")
                else:
                    job.future.set_result(answer)
        if read and self.on_tokens is not None:
            self.on_tokens(read)
        if not group.running and not group.waiting:
            group.decoder = None

    @staticmethod
    def _fail(jobs: list[_Job], err: Exception, stage: str) -> None:
        """Give `err` to each of `jobs`' callers; one log line for an error statekv raises on purpose (it names the
        input and the reason), the traceback for anything else (a fault in the code)."""
        labels = sorted({job.label for job in jobs})
        if isinstance(err, StateKVError):
            logger.warning("%d question(s) about %s failed at %s: %s", len(jobs), ", ".join(map(repr, labels)),
                           stage, err)
        else:
            logger.error("%d question(s) about %s failed at %s", len(jobs), ", ".join(map(repr, labels)), stage,
                         exc_info=err)
        for job in jobs:
            job.future.set_exception(err)
