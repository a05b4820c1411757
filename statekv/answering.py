"""One way to answer: questions are admitted into a decoder per video, stepped together, and collected.

Three small parts, one job each (nano-vllm's scheduler / runner / engine split):

- `Scheduler` admits waiting questions (`Ticket`s) into one `BatchDecoder` per video between steps and steps the
  decoders round-robin, one step per video per round, so a video with many questions in flight does not starve one
  with a single question. It polls each question's `cancelled`, and delivers a failure to the questions it concerns
  only. `Engine.ask`, `ask_many` and `stream` drive one in the caller's thread; the query service drives one on its
  scheduler thread (pipelines/serving/batching.py).
- `BatchDecoder` (statekv/decoding.py) runs the model: one forward per step for every active question, plain,
  streamed or with retrieval. It is the only place that steps the model for answers.
- `Collector` turns a question's pieces (tokens read back, logits, its retrieval) into what its caller sees:
  `TokenEvent`s while it streams, its `Answer` at the end.

Plain Python, no Ray; torch's inference mode is entered per round (a stream may be resumed by any thread).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from statekv.cache import VideoKVCache
from statekv.decoding import DEFAULT_SYNC_EVERY, AnswerRequest, BatchDecoder, Decoding
from statekv.generation import TextDeltas
from statekv.models.base import AnswerInputs, VideoLMAdapter
from statekv.retrieval import Evidence


class Answerer(Protocol):
    """What answering needs from an engine (`statekv.Engine`): its adapter, a decoder over a cache (checked against
    the model), and the prompt that follows the video for a question."""

    adapter: VideoLMAdapter

    def decoder(self, cache: VideoKVCache, *, max_batch: int, sync_every: int) -> BatchDecoder: ...

    def answer_prompt(self, cache: VideoKVCache, question: str) -> AnswerInputs: ...


@dataclass
class Answer:
    """A generated answer and what it was generated from."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]  # the tokens placed after the video: rest of the user turn, question, answer header
    finish_reason: str  # "eos" or "length"
    scores: list[torch.Tensor] | None = None  # with output_scores: float logits (V,) of each generated step
    first_token_s: float = 0.0
    total_s: float = 0.0
    evidence: list[Evidence] | None = None  # with retrieval: the chunks attended to and their time ranges


@dataclass
class TokenEvent:
    """One generated token while streaming; `text` is the new text it completes (may be empty)."""

    token_id: int
    text: str
    logits: torch.Tensor | None = field(default=None, repr=False)


class QuestionCancelled(Exception):
    """A question left the batch because its `cancelled()` returned True (nobody reads its answer)."""


class Collector:
    """One question's pieces -> token events while it streams, then its `Answer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = TextDeltas(tokenizer)

    def events(self, d: Decoding) -> list[TokenEvent]:
        """The tokens read back since the last call, with the text each completes (and its logits, if kept)."""
        new = d.take()
        out = []
        for i, token in enumerate(new):
            delta = self.text.add(token, last=d.done and i == len(new) - 1)
            logits = d.logits[len(self.text.ids) - 1].cpu() if d.request.output_scores else None
            out.append(TokenEvent(token, delta, logits))
        return out

    @staticmethod
    def evidence(d: Decoding) -> list[Evidence] | None:
        """With retrieval, the chunks the question attends to (known once its first pass ran); else None."""
        return None if d.retrieval is None else d.retrieval.evidence()

    def answer(self, d: Decoding) -> Answer:
        """The `Answer` of a finished question."""
        r = d.request
        return Answer(text=self.tokenizer.decode(d.tokens, skip_special_tokens=True),
                      token_ids=list(d.tokens),
                      prompt_ids=d.prompt.prompt_ids.tolist(),  # the ids it was asked with: not tokenized again
                      finish_reason=d.finish_reason or "length",
                      scores=[l.cpu() for l in d.logits] if r.output_scores else None,
                      first_token_s=d.first_token_s, total_s=d.total_s, evidence=self.evidence(d))


@dataclass(eq=False)
class Ticket:
    """A question in a `Scheduler`: its request, what it is about, and where its answer goes.

    `on_events` (streaming) gets each batch of token events as it is read back, on the scheduler's thread;
    `on_done` is called once the ticket has its `answer` or its `error`."""

    request: AnswerRequest
    label: str = "a video"  # what the question is about, for messages
    cancelled: Callable[[], bool] | None = None
    stream: bool = False  # read back at every step
    on_events: Callable[[list[TokenEvent]], None] | None = None
    on_done: Callable[["Ticket"], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)  # latencies count the wait in the queue
    decoding: Decoding | None = None
    collector: Collector | None = None
    answer: Answer | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None


@dataclass(eq=False)
class _Group:
    """The questions about one cache: waiting ones and the decoder of the running ones."""

    cache: VideoKVCache
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    decoder: BatchDecoder | None = None


class Scheduler:
    """Admits submitted questions into one decoder per video and steps the decoders, one step per video per round.

    `submit` may be called from any thread; `round` from one thread at a time. `on_tokens` is told how many answer
    tokens each step read back (a service's counter)."""

    def __init__(self, engine: Answerer, *, max_batch: int = 32, sync_every: int = DEFAULT_SYNC_EVERY,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch, self.sync_every, self.on_tokens = engine, max_batch, sync_every, on_tokens
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._lock = threading.Lock()
        self.steps = 0  # forwards run: with batching, fewer than the tokens generated
        self.max_seen_batch = 0

    def submit(self, cache: VideoKVCache, ticket: Ticket) -> Ticket:
        """Queue `ticket`'s question about `cache`; it is admitted at a coming round."""
        with self._lock:
            group = self._groups.get(id(cache))
            if group is None or group.cache is not cache:
                group = self._groups[id(cache)] = _Group(cache)
            group.waiting.append(ticket)
        return ticket

    @property
    def busy(self) -> bool:
        """Whether any question is waiting or running."""
        with self._lock:
            return bool(self._groups)

    def round(self) -> None:
        """One step of every video's decoder (fair interleaving), admitting waiting questions first."""
        with self._lock:
            groups = list(self._groups.items())
        for key, group in groups:
            with torch.inference_mode():
                self._advance(group)
            with self._lock:
                if not group.waiting and not group.running and self._groups.get(key) is group:
                    del self._groups[key]

    def close(self, error: BaseException) -> None:
        """Give `error` to every question not yet answered and forget them."""
        with self._lock:
            groups, self._groups = list(self._groups.values()), OrderedDict()
        for group in groups:
            self._fail([*group.waiting, *group.running], error)

    def _advance(self, group: _Group) -> None:
        """Drop cancelled questions, admit waiting ones, run one step, deliver what it read back.

        A failure is delivered to the questions it concerns and to no other: preparing one question's prompt fails
        that question; building the video's decoder fails the questions about that video; a step fails the
        questions it ran (the waiting ones get a new decoder next round)."""
        with self._lock:
            waiting = list(group.waiting)
            group.waiting.clear()
        for t in waiting:
            if t.cancelled is not None and t.cancelled():
                self._fail([t], QuestionCancelled(f"the client of a question about {t.label!r} left before its "
                                                  "answer started"))
            else:
                group.waiting.append(t)
        if group.decoder is None and group.waiting:
            try:
                group.decoder = self.engine.decoder(group.cache, max_batch=self.max_batch,
                                                    sync_every=self.sync_every)
            except Exception as err:  # noqa: BLE001 - delivered to every question about this video
                self._fail(list(group.waiting), err)
                group.waiting.clear()
                return
        for t in list(group.running):
            if t.cancelled is not None and t.cancelled():
                group.decoder.remove(t.decoding)
                group.running.remove(t)
                n = len(t.decoding.tokens) + len(t.decoding.pending)
                self._fail([t], QuestionCancelled(f"the client of a question about {t.label!r} left after {n} "
                                                  "tokens"))
        self._admit(group)
        if not group.running:
            group.decoder = None
            return
        self.max_seen_batch = max(self.max_seen_batch, len(group.running))
        running = list(group.running)
        before = sum(len(t.decoding.tokens) for t in running)
        try:
            finished = set(group.decoder.step())
        except Exception as err:  # noqa: BLE001 - delivered to the questions of this step
            self._fail(running, err)
            group.running.clear()
            group.decoder = None  # its state is unknown; questions still waiting get a new one
            return
        self.steps += 1
        read = sum(len(t.decoding.tokens) for t in running) - before
        if read and self.on_tokens is not None:
            self.on_tokens(read)
        for t in running:
            self._deliver(group, t, t.decoding in finished)
        if not group.running and not group.waiting:
            group.decoder = None

    def _admit(self, group: _Group) -> None:
        """Waiting questions into the decoder while it has room (a prompt that cannot be built fails alone)."""
        while group.waiting and group.decoder.room:
            t = group.waiting.popleft()
            try:
                prompt = self.engine.answer_prompt(group.cache, t.request.question)
                t.decoding = group.decoder.add(t.request, prompt, stream=t.stream)
            except Exception as err:  # noqa: BLE001 - delivered to this question's caller
                self._fail([t], err)
                continue
            t.decoding.started = t.submitted
            t.collector = Collector(self.engine.adapter.tokenizer)
            group.running.append(t)

    def _deliver(self, group: _Group, t: Ticket, finished: bool) -> None:
        """A streamed question's new token events; a finished question's answer (the decoder has let it go)."""
        try:
            events = t.collector.events(t.decoding) if t.stream and t.on_events is not None else []
            if events:
                t.on_events(events)
            answer = t.collector.answer(t.decoding) if finished else None
        except Exception as err:  # noqa: BLE001 - delivered to this question's caller
            group.running.remove(t)
            if not finished:
                group.decoder.remove(t.decoding)
            self._fail([t], err)
            return
        if finished:
            group.running.remove(t)
            t.answer = answer
            if t.on_done is not None:
                t.on_done(t)

    @staticmethod
    def _fail(tickets: list[Ticket], err: BaseException) -> None:
        for t in tickets:
            t.error = err
            if t.on_done is not None:
                t.on_done(t)


def answer_all(engine: Answerer, cache: VideoKVCache, requests: list[AnswerRequest], *, max_batch: int = 32,
               sync_every: int = DEFAULT_SYNC_EVERY) -> list[Answer]:
    """Answer `requests` about `cache` together in the calling thread; raises the first question's error, if any."""
    scheduler = Scheduler(engine, max_batch=max_batch, sync_every=sync_every)
    tickets = [scheduler.submit(cache, Ticket(r)) for r in requests]
    while scheduler.busy:
        scheduler.round()
    for t in tickets:
        if t.error is not None:
            raise t.error
    return [t.answer for t in tickets]


def stream_answer(engine: Answerer, cache: VideoKVCache, request: AnswerRequest, *,
                  evidence: list[Evidence] | None = None) -> Iterator[TokenEvent]:
    """`request`'s tokens as they are read back, in the calling thread; with retrieval the chosen chunks are
    appended to `evidence` once the question's first pass has run, before its first token is yielded."""
    scheduler = Scheduler(engine, max_batch=1, sync_every=1)
    pending: list[TokenEvent] = []
    ticket = scheduler.submit(cache, Ticket(request, stream=True, on_events=pending.extend))
    told = evidence is None
    while scheduler.busy:
        scheduler.round()  # enters inference mode itself: no `yield` below holds it
        if ticket.error is not None:
            raise ticket.error
        if not told and pending:
            evidence.extend(Collector.evidence(ticket.decoding) or [])
            told = True
        events, pending[:] = list(pending), []
        yield from events
