"""The answer runner: the one place the model is stepped for answers, one forward per step for every active
question about one video (plain, streamed and retrieval questions alike; statekv/answering.py admits them).

The video's KV (a read-only `DeviceVideo`, statekv/device_cache.py) is shared; each question keeps its own tokens
(its question, then its answer) in a "tail" of its own, so nothing a question does reaches the shared KV or another
question, and no question copies the video's KV. Per step the active questions' new tokens are packed into one
sequence (a new question contributes its whole prompt, a decoding one its last token), the model runs once, and
our attention function (statekv/attention.py, `statekv_batch=`) attends every query to the shared KV (one fused
call for the whole step, statekv/ops/split_kv.py) and to its own question's tail, merging the two by log-sum-exp.
Each question has its own prompt length, `max_new_tokens`, sampling settings and stopping; questions join and
leave between steps (continuous batching).

Retrieval questions (`AnswerRequest.retrieval`) attend to a context of their own instead of the video's shared KV:
[prefix | the chunks chosen for them at that layer], chosen on their first pass (statekv/retrieval.py), then their
own tail. Their attention is one call over [context | tail] per question, the computation of answering it with a
transformers cache holding [prefix | chosen chunks | question | answer]. An adaptive budget runs the question's
prompt once more first: a probe pass over the prefix alone that only measures each layer's chunk scores (its tail
and token are discarded). With `TopK(query="question")` (ReKV's published query) the passes before the answer's
own run the bare question instead of the prompt, and the last of them chooses the chunks; its tail is discarded
as well. The video's whole KV is built on the device only when a plain question needs it, so a
decoder of retrieval questions on a lazily loaded cache reads only the chosen chunks.

Host syncs: greedy tokens stay on the device and feed the next step directly; the tokens are read back every
`sync_every` steps, when a question reaches its `max_new_tokens`, after a question's first token (its time to
first token) and on every step when `sync_every=1` or a streamed question is in the batch (its tokens go out as
they are read back; its batch mates are read back with it, one sync for all). Tokens a question produced after its
end-of-sequence token, before the next read-back, are dropped: the outputs are those of stopping at once.
Sampling (temperature > 0) draws on the host with the request's seeded generator, so it syncs each step.

Hybrid stacks (Qwen3.5: linear-attention layers with a recurrent state): a layer's recurrent state would have to
be carried per question and packing several questions into one sequence would mix them, so a decoder on such a
model takes ONE question at a time (`max_batch` is 1): it still shares the video's KV (no copy) and keeps only a
copy of the recurrent states per question (small, fixed size); questions about it are answered one after another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from statekv.cache import VideoKVCache
from statekv.device_cache import DeviceVideo
from statekv.generation import check_sampling, next_token
from statekv.models.base import AnswerInputs, VideoLMAdapter
from statekv.ops import attention
from statekv.ops.common import visible_mask
from statekv.retrieval import Retrieval, RetrievalContext
from statekv.ops.split_kv import merge_partials, shared_attention, tail_attention

DEFAULT_SYNC_EVERY = 8


@dataclass
class AnswerRequest:
    """One question and how to answer it."""

    question: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    output_scores: bool = False  # keep the float logits (V,) of every generated step
    retrieval: Retrieval | None = None  # attend to the chunks chosen for this question instead of the whole video

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_p)


@dataclass(eq=False)
class Decoding:
    """A question in a decoder: its prompt, its tokens so far, and where its tail lives."""

    request: AnswerRequest
    prompt: AnswerInputs
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # read back to the host
    unread: int = 0  # tokens of `tokens` a caller has not taken yet (see `take`)
    finish_reason: str | None = None  # "eos" or "length" once done
    first_token_s: float = 0.0
    total_s: float = 0.0
    # device-side
    pending: list[torch.Tensor] = field(default_factory=list)  # (1,) tokens made since the last read-back
    logits: list[torch.Tensor] = field(default_factory=list)  # with output_scores: (V,) per step, on the device
    last: torch.Tensor | None = None  # (1,) the latest token (the next step's input)
    steps: int = 0  # tokens generated, read back or not
    position: int = 0  # position of the next input token after the prompt
    length: int = 0  # tokens in this question's tail
    slot: int = -1
    cache: Any = None  # hybrid models: this question's transformers cache (its recurrent states and tail)
    retrieval: RetrievalContext | None = None  # its own context (with `request.retrieval`)
    stream: bool = False  # read back at every step: its tokens go out as they are made
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self) -> list[int]:
        """Tokens read back since the last `take` (for streaming)."""
        new = self.tokens[len(self.tokens) - self.unread:] if self.unread else []
        self.unread = 0
        return new


class TailPool:
    """The tails of a decoder's questions, per attention layer: keys/values (slots, Hkv, capacity, D); question i
    holds slot i (slots stay compact: a finished question's slot takes the last one's tail)."""

    def __init__(self, layers: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layers, self.shape, self.dtype, self.device = layers, (num_kv_heads, head_dim), dtype, device
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots = self.capacity = 0

    def reserve(self, slots: int, capacity: int) -> None:
        """Room for `slots` tails of `capacity` tokens (grown by doubling; the tails written so far are kept)."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots = self.slots if slots <= self.slots else max(slots, 2 * self.slots)
        new_cap = self.capacity if capacity <= self.capacity else max(capacity, 2 * self.capacity)
        h, d = self.shape
        for store in (self.keys, self.values):
            for layer in self.layers:
                grown = torch.zeros(new_slots, h, new_cap, d, dtype=self.dtype, device=self.device)
                if layer in store:
                    grown[:self.slots, :, :self.capacity] = store[layer]
                store[layer] = grown
        self.slots, self.capacity = new_slots, new_cap

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for t in store.values():
                t[dst, :, :length] = t[src, :, :length]


class StepContext:
    """What our attention function needs for one packed step (passed as `statekv_batch`): the shared KV, the
    tails, each question's segment of the packed sequence, and the questions with a context of their own."""

    def __init__(self, video: DeviceVideo | None, pool: TailPool | None, rows: list[Decoding], sizes: list[int],
                 device: torch.device, backend: str) -> None:
        self.video, self.pool, self.backend = video, pool, backend  # video: None when every row has its own
        self.segments = []  # (slot, start in the packed sequence, new tokens, tail length before)
        self.own = []  # (decoding, slot, start, new tokens, tail length before) of the rows with their own context
        start = 0
        for d, q in zip(rows, sizes):
            self.segments.append((d.slot, start, q, d.length))
            if d.retrieval is not None:
                self.own.append((d, d.slot, start, q, d.length))
            start += q
        self.shared = len(self.own) < len(rows)  # some rows attend to the video's shared KV
        if pool is None:
            return
        device_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        n = self.num_slots = len(rows)
        # a pure decoding step (every question one token; rows are in slot order, so its start is its slot)
        self.all_single = all(q == 1 for _, _, q, _ in self.segments)
        single = [(s, st, n0) for s, st, q, n0 in self.segments if q == 1]
        self.single_slots = device_index([s for s, _, _ in single])
        self.single_starts = device_index([st for _, st, _ in single])
        self.single_ends = device_index([n0 for _, _, n0 in single])  # where each one's new token goes
        lengths = [1] * n
        for s, _, n0 in single:
            lengths[s] = n0 + 1
        self.single_span = max(lengths) if single else 0
        # tails of unequal lengths need a mask; equal ones (one question, or questions in step) see every key
        self.single_visible = None if min(lengths) == self.single_span else (
            torch.arange(self.single_span)[None, :] < torch.tensor(lengths)[:, None]).to(device)[:, None, :]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """query (1, H, L, D) of the packed step, key/value (1, Hkv, L, D) its new tokens (with a transformers
        cache: (1, Hkv, T, D), the one question's whole tail) -> output (1, L, H, D)."""
        if self.pool is not None:
            self._write(layer, key, value)
        _, H, L, D = query.shape
        if self.shared:
            out_s, lse_s = shared_attention(query, self.video.keys[layer], self.video.values[layer], scaling=scaling)
            if self.pool is None:  # one question whose tail the transformers cache holds
                q, T = query.shape[2], key.shape[2]
                visible = visible_mask(0, q, q, T, query.device).unsqueeze(0)
                out_t, lse_t = tail_attention(query, key, value, visible, scaling=scaling)
            else:
                out_t, lse_t = self._tails(layer, query, scaling)
            out = merge_partials(out_s, lse_s, out_t, lse_t, query.dtype).transpose(1, 2).contiguous()
        else:
            out = query.new_empty(1, L, H, D)
        for d, slot, start, q, n0 in self.own:  # [its context | its tail], causal over its new tokens
            ctx_k, ctx_v = d.retrieval.context(layer, query[0, :, start:start + q])
            if self.pool is None:
                tail_k, tail_v = key, value
            else:
                tail_k = self.pool.keys[layer][slot:slot + 1, :, :n0 + q]
                tail_v = self.pool.values[layer][slot:slot + 1, :, :n0 + q]
            o, _ = attention(query[:, :, start:start + q], torch.cat([ctx_k, tail_k], dim=2),
                             torch.cat([ctx_v, tail_v], dim=2), scaling=scaling, backend=self.backend)
            out[:, start:start + q] = o
        return out

    def _write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append the step's new tokens to their question's tail."""
        pk, pv = self.pool.keys[layer], self.pool.values[layer]  # (slots, Hkv, cap, D)
        if self.all_single:  # one index write for every question
            pk[self.single_slots, :, self.single_ends] = key[0].transpose(0, 1)  # (n, Hkv, D)
            pv[self.single_slots, :, self.single_ends] = value[0].transpose(0, 1)
            return
        for slot, start, q, n0 in self.segments:
            pk[slot, :, n0:n0 + q] = key[0, :, start:start + q]
            pv[slot, :, n0:n0 + q] = value[0, :, start:start + q]

    def _tails(self, layer: int, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.pool.keys[layer], self.pool.values[layer]  # (slots, Hkv, cap, D)
        _, H, L, D = query.shape
        n, span = self.num_slots, self.single_span
        if self.all_single:  # the common step: one attention call for every question
            o, l = tail_attention(query[0].transpose(0, 1).unsqueeze(2), pk[:n, :, :span], pv[:n, :, :span],
                                  self.single_visible, scaling=scaling)  # (n, H, 1, D), (n, H, 1)
            return o[:, :, 0].transpose(0, 1).unsqueeze(0), l[:, :, 0].transpose(0, 1).unsqueeze(0)
        out = torch.empty(1, H, L, D, dtype=torch.float32, device=query.device)
        lse = torch.empty(1, H, L, dtype=torch.float32, device=query.device)
        for slot, start, q, n0 in self.segments:  # a question's prompt: causal over its own tokens
            if q == 1:
                continue
            visible = visible_mask(0, q, q, n0 + q, query.device).unsqueeze(0)
            o, l = tail_attention(query[:, :, start:start + q], pk[slot:slot + 1, :, :n0 + q],
                                  pv[slot:slot + 1, :, :n0 + q], visible, scaling=scaling)
            out[:, :, start:start + q], lse[:, :, start:start + q] = o, l
        if self.single_slots.numel():  # questions past their prompt, one new token each: all slots in one call
            qd = query.new_zeros(n, H, 1, D)
            qd[self.single_slots] = query[0, :, self.single_starts].transpose(0, 1).unsqueeze(2)
            o, l = tail_attention(qd, pk[:n, :, :span], pv[:n, :, :span], self.single_visible, scaling=scaling)
            out[0, :, self.single_starts] = o[self.single_slots, :, 0].transpose(0, 1)
            lse[0, :, self.single_starts] = l[self.single_slots, :, 0].transpose(0, 1)
        return out, lse


class BatchDecoder:
    """Decodes the questions added to it about one video, one forward per `step` for all of them.

    `video` builds (or fetches from the device LRU) the video's whole KV on the device: called on the first step
    that has a plain question, never for a decoder of retrieval questions only."""

    def __init__(self, adapter: VideoLMAdapter, cache: VideoKVCache, video: Callable[[], DeviceVideo],
                 decoder_kwargs: dict[str, Any], *, backend: str = "auto", max_batch: int = 32,
                 sync_every: int = DEFAULT_SYNC_EVERY) -> None:
        if max_batch < 1 or sync_every < 1:
            raise ValueError(f"max_batch and sync_every must be >= 1, got {max_batch}, {sync_every}")
        self.adapter, self.cache, self.decoder_kwargs, self.backend = adapter, cache, decoder_kwargs, backend
        self._video_of = video
        self._video: DeviceVideo | None = None
        self._prefix: DeviceVideo | None = None
        layout = adapter.layout
        self.hybrid = bool(layout.linear_layers)
        self.max_batch = 1 if self.hybrid else max_batch  # see the module docstring
        self.sync_every = sync_every
        self.active: list[Decoding] = []
        self._since_sync = 0
        self.pool = None if self.hybrid else TailPool(list(layout.attention_layers), layout.num_kv_heads,
                                                      layout.head_dim, adapter.dtype, adapter.device)

    @property
    def room(self) -> int:
        return self.max_batch - len(self.active)

    def video(self) -> DeviceVideo:
        """The video's whole answer context on the device (built on first use)."""
        if self._video is None:
            self._video = self._video_of()
        return self._video

    def prefix(self) -> DeviceVideo:
        """The prefix's KV and the linear layers' final states on the device: what retrieval questions share."""
        if self._prefix is None:
            layout = self.adapter.layout
            self._prefix = DeviceVideo.from_cache(self.cache, layout.num_layers, layout.linear_layers,
                                                  self.adapter.device, prefix_only=True)
        return self._prefix

    def add(self, request: AnswerRequest, prompt: AnswerInputs, *, stream: bool = False) -> Decoding:
        """Start answering `request` from its prompt (the tokens after the video) at the next step; `stream`: read
        back at every step while it runs."""
        if self.room < 1:
            raise RuntimeError(f"the decoder is full ({self.max_batch} questions)")
        d = Decoding(request, prompt, position=prompt.next_position, stream=stream,
                     generator=torch.Generator().manual_seed(request.seed) if request.seed is not None else None)
        if request.retrieval is not None:
            d.retrieval = self._retrieval(request.retrieval, request.question, prompt)
        if self.hybrid:
            d.cache = self._fresh_cache(d)
        d.slot = len(self.active)
        self.active.append(d)
        return d

    def _retrieval(self, retrieval: Retrieval, question: str, prompt: AnswerInputs) -> RetrievalContext:
        """A question's retrieval context over this decoder's cache (ValueError if the cache cannot retrieve)."""
        c = self.cache
        if c.config.answer_from == "state":
            raise ValueError("retrieval picks chunks, and this cache keeps none: it answers from its carried state "
                             "(answer_from='state')")
        if len(c.chunks) != c.num_chunks:
            raise ValueError(f"retrieval needs every chunk addressable: the cache holds {len(c.chunks)} of "
                             f"{c.num_chunks} (load it from its store, lazily)")
        bare = self._bare_question(question, prompt) if retrieval.by_question else None
        prefix = self.prefix()
        a, kwargs = self.adapter, self.decoder_kwargs
        return RetrievalContext(retrieval, c.chunks, lambda layer: (prefix.keys[layer], prefix.values[layer]),
                                frame_times=c.video.timestamps, duration=c.video.duration,
                                frame_seconds=1.0 / c.video.sampled_fps, segments=c.scenes or None,
                                unrotate=lambda x, pos: a.unrotate(x, pos, **kwargs), question=bare)

    def _bare_question(self, question: str, prompt: AnswerInputs) -> AnswerInputs:
        """ReKV's retrieval input: the question's own tokens, no chat template, at the text positions right after
        the video (where the prompt starts)."""
        a = self.adapter
        ids = torch.tensor(a.text_ids(question), dtype=torch.long)
        if not len(ids):
            raise ValueError("query='question' scores with the question's tokens, and the question has none")
        start = int(prompt.position_ids[0, 0])
        return AnswerInputs(prompt_ids=ids, embeds=a.embed(ids), position_ids=a.text_positions(start, len(ids)),
                            next_position=start + len(ids))

    def _fresh_cache(self, d: Decoding) -> DynamicCache:
        """A hybrid question's transformers cache: copies of the linear layers' states after the video (decoding
        updates them in place), and room for its tail."""
        states = (self.prefix() if d.retrieval is not None else self.video()).recurrent
        cache = DynamicCache(config=self.adapter.model.config)
        for layer, state in states.items():
            cache.update_conv_state(state.conv.unsqueeze(0), layer)
            cache.update_recurrent_state(state.recurrent.unsqueeze(0), layer)
        return cache

    def remove(self, d: Decoding) -> None:
        """Stop decoding `d` (e.g. its client went away); its tail slot is reused."""
        i = self.active.index(d)
        last = self.active.pop()
        if last is not d:  # keep slots compact: the last question moves into the freed slot
            self.pool.move(last.slot, d.slot, last.length)
            last.slot = d.slot
            self.active[i] = last
        d.slot = -1

    def step(self, *, sync: bool = False) -> list[Decoding]:
        """One forward for every active question; returns the questions that finished (read back) at this step."""
        if not self.active:
            return []
        a = self.adapter
        rows = list(self.active)
        decoding = [d for d in rows if d.steps > 0]
        embeds = iter(a.embed(torch.cat([d.last for d in decoding])) if decoding else [])  # (n, hidden)
        parts, positions, sizes = [], [], []
        for d in rows:
            if d.steps == 0:
                inputs = d.prompt if d.retrieval is None else d.retrieval.pass_inputs(d.prompt)
                parts.append(inputs.embeds)
                positions.append(inputs.position_ids)
            else:
                parts.append(next(embeds).unsqueeze(0))
                positions.append(a.text_positions(d.position, 1))
                d.position += 1
            sizes.append(parts[-1].shape[0])
        if self.pool is not None:  # grown as the tails grow (by doubling), not reserved for max_new_tokens
            self.pool.reserve(len(rows), max(d.length + q for d, q in zip(rows, sizes)))
        video = self.video() if any(d.retrieval is None for d in rows) else None
        ctx = StepContext(video, self.pool, rows, sizes, a.device, self.backend)
        cache = rows[0].cache if self.hybrid else None
        hidden = a.decode(torch.cat(parts), torch.cat(positions, dim=1), cache, statekv_batch=ctx,
                          **self.decoder_kwargs)
        ends = torch.tensor([st + q - 1 for _, st, q, _ in ctx.segments], dtype=torch.long, device=hidden.device)
        logits = a.logits(hidden[ends])  # (B, V) float
        greedy = logits.argmax(dim=-1, keepdim=True)  # (B, 1) on the device: no sync
        first = must_read = False
        for i, (d, q) in enumerate(zip(rows, sizes)):
            if d.retrieval is not None and d.retrieval.pending:  # the pass only measured or chose: the prompt runs
                d.retrieval.end_pass()
                if self.hybrid:
                    d.cache = self._fresh_cache(d)
                continue
            d.length += q
            r = d.request
            if r.temperature == 0.0:
                token = greedy[i]
            else:
                token = torch.tensor([next_token(logits[i], temperature=r.temperature, top_p=r.top_p,
                                                 generator=d.generator)], device=logits.device)
            d.pending.append(token)
            d.last = token
            if r.output_scores:
                d.logits.append(logits[i])
            d.steps += 1
            first |= d.steps == 1
            must_read |= d.steps >= r.max_new_tokens
        self._since_sync += 1
        if sync or first or must_read or self._since_sync >= self.sync_every or any(d.stream for d in rows):
            return self._read_back()
        return []

    def _read_back(self) -> list[Decoding]:
        """Copy every pending token to the host (one sync), apply stopping, drop the finished questions."""
        self._since_sync = 0
        waiting = [d for d in self.active if d.pending]
        if not waiting:
            return []
        ids = torch.cat([t for d in waiting for t in d.pending]).tolist()
        now = time.perf_counter()
        eos = self.adapter.eos_token_ids
        finished = []
        at = 0
        for d in waiting:
            mine, d.pending = ids[at:at + len(d.pending)], []
            at += len(mine)
            if not d.tokens and mine:
                d.first_token_s = now - d.started
            for token in mine:
                d.tokens.append(token)
                d.unread += 1
                if token in eos:
                    d.finish_reason = "eos"
                elif len(d.tokens) >= d.request.max_new_tokens:
                    d.finish_reason = "length"
                if d.done:
                    break
            if d.done:
                d.logits = d.logits[:len(d.tokens)]
                d.total_s = now - d.started
                finished.append(d)
        for d in finished:
            self.remove(d)
        return finished
