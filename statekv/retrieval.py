"""Query-time retrieval: answer from the prefix, the chunks most relevant to the question, and the latest chunks.

ReKV's rule: every chunk has one summary key per layer and KV head (the mean of its keys, written by the store).
When the question is prefilled, each layer scores every chunk by the mean question query against the chunk's
summary key and attends to [prefix | the selected chunks in temporal order | the question]; the selection stays
fixed while the answer is decoded. Only the selected chunks' K/V are read, layer by layer, so the bytes a question
costs grow with `k`, not with the length of the video.

Which queries score (`TopK(query=...)`): "prompt" (statekv's rule) scores with the question's own first pass, the
whole text after the video, queries and summary keys after RoPE; "question" (ReKV as published) first runs the
bare question (no chat template) in a pass of its own whose tail is discarded, and scores with its queries and the
chunks' keys *before* RoPE (both un-rotated with the positions they were rotated at; `unrotate`, the adapter's).

`TopK` selects chunks; `Segments` (StreamKV) groups consecutive chunks into scenes and selects whole scenes; both can
share a total budget across layers adaptively (`adaptive=True`: layers whose scores concentrate on few chunks get
more of the budget). Retrieval settings are small objects without model knowledge, like policies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


def fold_query(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean question query per KV head: (H, q, D) -> (Hkv, D), summed over the query heads of each GQA group."""
    heads, _, dim = query.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return query.float().mean(dim=1).view(num_kv_heads, heads // num_kv_heads, dim).sum(dim=1)


def chunk_scores(query_mean: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """(C,) relevance of each chunk: sum over KV heads of mean-query · summary key. summaries: (C, Hkv, D)."""
    if summaries.shape[1:] != query_mean.shape:
        raise ValueError(f"summary keys {tuple(summaries.shape)} do not match the query {tuple(query_mean.shape)}")
    return torch.einsum("chd,hd->c", summaries.float(), query_mean.float().to(summaries.device))


def concentration(scores: torch.Tensor) -> float:
    """How peaked a layer's chunk scores are: 1 - normalised entropy of softmax(scores) (0 flat, 1 one chunk)."""
    n = scores.numel()
    if n <= 1:
        return 1.0
    p = torch.softmax(scores.double(), dim=0)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    return float(1.0 - entropy / torch.log(torch.tensor(float(n), dtype=torch.float64)))


def adaptive_budgets(concentrations: Sequence[float], total: int, *, floor: int = 1,
                     cap: int | None = None) -> list[int]:
    """Split `total` chunks over layers in proportion to their concentration (+ a `floor` each), summing to `total`
    (or to every layer's `cap` if that is smaller). Largest remainders break ties, earlier layers first."""
    n = len(concentrations)
    if n == 0:
        return []
    cap = total if cap is None else cap
    total = min(total, cap * n)
    floor = min(floor, total // n)
    budgets = [floor] * n
    left = total - floor * n
    weights = [max(float(c), 0.0) for c in concentrations]
    while left > 0:
        open_layers = [i for i in range(n) if budgets[i] < cap]
        mass = sum(weights[i] for i in open_layers)
        shares = {i: (weights[i] / mass if mass > 0 else 1.0 / len(open_layers)) * left for i in open_layers}
        grants = {i: min(cap - budgets[i], int(shares[i])) for i in open_layers}
        if sum(grants.values()) == 0:  # hand out the remainder one by one, largest fractional share first
            order = sorted(open_layers, key=lambda i: (-(shares[i] - int(shares[i])), i))
            for i in order[:left]:
                budgets[i] += 1
            left = total - sum(budgets)
            continue
        for i, g in grants.items():
            budgets[i] += g
        left = total - sum(budgets)
    return budgets


def select_top(scores: torch.Tensor, k: int, recent: int) -> list[int]:
    """Chunk indices in temporal order: the last `recent` chunks plus the `k` best-scoring others."""
    num = scores.numel()
    recent_set = set(range(max(0, num - recent), num))
    candidates = [i for i in range(num) if i not in recent_set]
    if k >= len(candidates):
        chosen = set(candidates)
    else:
        masked = scores.clone().float()
        masked[list(recent_set)] = float("-inf")
        chosen = set(masked.topk(k).indices.tolist())
    return sorted(chosen | recent_set)


@dataclass(frozen=True)
class SegmentRule:
    """StreamKV's segmentation settings (its published defaults): similarity threshold, min and max chunks."""

    threshold: float = 0.99
    min_size: int = 4
    max_size: int = 64

    def __post_init__(self) -> None:
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")


class SegmentTracker:
    """StreamKV's scene segmentation, online, chunk by chunk, as the engine prefills (so it needs no stored
    features): [start, end) chunk ranges from the cosine similarity of consecutive chunks' mean visual features;
    a segment closes where similarity drops below `threshold` (once it has `min_size` chunks) or when it reaches
    `max_size` chunks. A resumed stream starts a new segment at its first chunk."""

    def __init__(self, rule: SegmentRule, segments: Sequence[tuple[int, int]] = (), num_chunks: int = 0) -> None:
        self.rule = rule
        self._closed = [tuple(s) for s in segments]
        self._start = num_chunks
        self._count = num_chunks
        self._last: torch.Tensor | None = None

    def add(self, feature: torch.Tensor) -> None:
        """The next chunk's mean visual feature (d,)."""
        f = torch.nn.functional.normalize(feature.double().flatten(), dim=0)
        size = self._count - self._start
        if self._last is not None:
            similar = float((f * self._last).sum()) >= self.rule.threshold
            if size >= self.rule.max_size or (size >= self.rule.min_size and not similar):
                self._closed.append((self._start, self._count))
                self._start = self._count
        self._last = f
        self._count += 1

    @property
    def segments(self) -> list[tuple[int, int]]:
        """[start, end) chunk ranges covering every chunk added so far."""
        open_one = [(self._start, self._count)] if self._count > self._start else []
        return self._closed + open_one


QUERIES = ("prompt", "question")  # what scores the chunks (see the module docstring)


@dataclass(frozen=True)
class Retrieval:
    """Base class: which chunks each layer attends to when a question is asked (`k` chunks + the last `recent`)."""

    k: int = 64
    recent: int = 0
    name: ClassVar[str]

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.k!r}")
        if not isinstance(self.recent, int) or isinstance(self.recent, bool) or self.recent < 0:
            raise ValueError(f"recent must be a non-negative integer, got {self.recent!r}")

    @property
    def adaptive(self) -> bool:
        return False

    @property
    def by_question(self) -> bool:
        """Whether chunks are scored with the bare question before RoPE (TopK's `query="question"`)."""
        return getattr(self, "query", "prompt") == "question"

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def choose(self, scores: torch.Tensor, k: int, segments: list[tuple[int, int]] | None) -> list[int]:
        """One layer's chunk indices (temporal order) from its chunk scores (C,), with a budget of `k`."""
        raise NotImplementedError

    def budgets(self, layer_scores: list[torch.Tensor]) -> list[int]:
        """`k` for every layer, or (adaptive) a split of k x layers by how concentrated each layer's scores are."""
        if not self.adaptive or not layer_scores:
            return [self.k] * len(layer_scores)
        num = layer_scores[0].numel()
        cap = max(0, num - min(self.recent, num))
        return adaptive_budgets([concentration(s) for s in layer_scores], self.k * len(layer_scores), cap=cap)

    def select(self, layer_scores: list[torch.Tensor], segments: list[tuple[int, int]] | None = None
               ) -> list[list[int]]:
        """Per layer, the chunk indices to attend to, from every layer's chunk scores."""
        return [self.choose(s, b, segments) for s, b in zip(layer_scores, self.budgets(layer_scores))]


@dataclass(frozen=True)
class TopK(Retrieval):
    """ReKV: the `k` best chunks per layer plus the last `recent`; `adaptive=True` shares k x layers across layers
    (a small first pass of the question over the prefix alone measures each layer's concentration)."""

    adaptive_budget: bool = False
    query: str = "prompt"  # "question": ReKV's published query, the bare question before RoPE
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {', '.join(QUERIES)}, got {self.query!r}")

    @property
    def adaptive(self) -> bool:
        return self.adaptive_budget

    def choose(self, scores, k, segments):
        return select_top(scores, k, self.recent)


@dataclass(frozen=True)
class Segments(Retrieval):
    """StreamKV: score scenes by their chunks' mean score (the mean-query · the scene's summary key, the mean of
    its chunks' summary keys), take whole best scenes until `k` chunks, plus the last `recent` chunks. Scene
    boundaries come from the cache (written at prefill)."""

    recent: int = 8
    name: ClassVar[str] = "segments"

    def choose(self, scores, k, segments):
        if segments is None:
            raise ValueError("segment retrieval needs the cache's segment boundaries")
        num = scores.numel()
        recent_set = set(range(max(0, num - self.recent), num))
        ranked = sorted(segments, key=lambda se: -float(scores[se[0]:se[1]].float().mean()))
        chosen: set[int] = set()
        for start, end in ranked:
            fresh = [i for i in range(start, end) if i not in recent_set and i not in chosen]
            if len(chosen) + len(fresh) > k:
                if chosen:
                    continue  # a whole scene or none, while another scene may still fit
                # the best scene alone exceeds k: its k best chunks
                fresh = sorted(sorted(fresh, key=lambda i: -float(scores[i]))[:k])
            chosen.update(fresh)
            if len(chosen) >= k:
                break
        return sorted(chosen | recent_set)


@dataclass
class Evidence:
    """A chunk the answer attended to, where it is in the source video, and how strongly it was chosen."""

    chunk: int
    start_s: float
    end_s: float
    score: float  # mean relevance score over the layers that selected it
    layers: int  # how many layers attended to it


class RetrievalContext:
    """One question's retrieval: per layer, the context it attends to besides its own tokens.

    Called by the answer step (statekv/decoding.py) at every layer of every pass of the question. On the first
    pass, at layer l, it scores the cache's chunks with the question's mean query, reads the chosen chunks' K/V of
    that layer only (`chunks.read_layer`, when the chunks are a lazily loaded store; else from memory) and keeps
    [prefix | chosen chunks in temporal order] as the layer's context; later passes attend to the same context.
    An adaptive budget first runs a probe pass (`probe=True`: contexts are the prefix alone and only the scores
    are recorded), then `end_probe` splits the budget over the layers by how concentrated their scores were.

    With `query="question"` the passes before the answer's own run the bare question (`question`: its inputs,
    embeddings and positions after the video), not the prompt: the selection pass (`selecting=True`) chooses, and
    its tail is discarded (`end_pass`); the prompt then attends to what it chose. Queries and chunk keys are
    un-rotated (`unrotate(x (H, n, D), positions (R, n))`, the adapter's) before scoring; the chunks' pre-RoPE
    summary keys are written at prefill (`ChunkKV.pre_rope_summaries`, a column of the store's summaries files), so
    a stored cache is scored without reading K/V, as with the prompt's query.
    """

    def __init__(self, retrieval: Retrieval, chunks: Any, prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 *, frame_times: Sequence[float], duration: float, frame_seconds: float,
                 segments: list[tuple[int, int]] | None = None,
                 unrotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 question: Any = None) -> None:
        self.retrieval = retrieval
        self.chunks = chunks
        self.prefix = prefix  # layer -> the prefix's (keys, values) (1, Hkv, P, D) on the answer's device
        self.frame_times, self.duration, self.frame_seconds = frame_times, duration, frame_seconds
        self.segments = segments
        self.budgets: dict[int, int] | None = None
        self.probe = retrieval.adaptive  # the first pass only measures (see `end_probe`)
        self.by_question = retrieval.by_question
        if self.by_question and (unrotate is None or question is None):
            raise ValueError("query='question' needs the bare question's inputs and the model's RoPE (unrotate)")
        self.unrotate, self.question = unrotate, question
        self.selecting = self.by_question  # the bare question's pass chooses; the prompt runs after it
        self.scores: dict[int, torch.Tensor] = {}
        self.selected: dict[int, list[int]] = {}
        self._context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._meta: dict[int, Any] = {}
        self._base: dict[int, torch.Tensor] = {}  # query="question": pre-RoPE summary keys per layer

    @property
    def pending(self) -> bool:
        """Whether the next pass of the question only measures or chooses (its tail and token are discarded)."""
        return self.probe or self.selecting

    def pass_inputs(self, prompt: Any) -> Any:
        """The inputs of the question's next pass: the bare question before the answer's own with
        query="question", else the prompt."""
        return self.question if self.by_question and self.pending else prompt

    def end_pass(self) -> None:
        """After a pass that only measured (adaptive probe) or chose (the bare question's)."""
        if self.probe:
            self.end_probe()
        else:
            self.selecting = False

    def summaries(self, layer: int) -> torch.Tensor:
        """(C, Hkv, D) summary keys at `layer`: the stored (post-RoPE) means, or with query="question" the means of
        the chunks' keys before RoPE (each stored key un-rotated at its own position)."""
        if self.by_question:
            return self._pre_rope_summaries(layer)
        if hasattr(self.chunks, "summary_keys"):
            return self.chunks.summary_keys(layer)
        return torch.stack([c.keys[layer].float().mean(dim=1) for c in self.chunks])

    def _pre_rope_summaries(self, layer: int) -> torch.Tensor:
        """A stored cache: its summaries files' pre-RoPE column (no K/V read). Chunks in memory: the means the
        engine computed at prefill, or (chunks read back whole) their keys un-rotated here, reading nothing."""
        if layer not in self._base:
            if hasattr(self.chunks, "summary_keys"):
                self._base[layer] = self.chunks.summary_keys(layer, pre_rope=True)
            else:
                means = [c.pre_rope_summaries[layer] if c.pre_rope_summaries is not None else
                         self.unrotate(c.keys[layer], c.position_ids[:, c.token_index(layer)]).mean(dim=1)
                         for c in self.chunks]
                self._base[layer] = torch.stack([m.float().cpu() for m in means]) if means else torch.empty(0, 1, 1)
        return self._base[layer]

    def _read(self, layer: int, indices: list[int]) -> dict[int, Any]:
        if hasattr(self.chunks, "read_layer"):
            return self.chunks.read_layer(layer, indices)
        return {i: self.chunks[i] for i in indices}

    def context(self, layer: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (1, Hkv, P + chosen, D) of [prefix | chosen chunks] at `layer`; chosen from the
        question's queries `query` (H, q, D) on its first pass (on a probe pass: the prefix, scores recorded)."""
        if layer in self._context:
            return self._context[layer]
        key, value = self.prefix(layer)
        summaries = self.summaries(layer)
        if self.by_question:  # ReKV: the bare question's queries before RoPE
            query = self.unrotate(query, self.question.position_ids)
        scores = chunk_scores(fold_query(query, key.shape[1]), summaries) if len(summaries) else summaries[:, 0, 0]
        self.scores[layer] = scores.cpu()
        if self.probe:
            return key, value
        k = self.budgets.get(layer, self.retrieval.k) if self.budgets else self.retrieval.k
        chosen = self.retrieval.choose(scores.cpu(), k, self.segments) if len(summaries) else []
        self.selected[layer] = chosen
        read = self._read(layer, chosen)
        for i in chosen:
            self._meta.setdefault(i, read[i])
        ks = [read[i].keys[layer].to(key.device, key.dtype).unsqueeze(0) for i in chosen]
        vs = [read[i].values[layer].to(value.device, value.dtype).unsqueeze(0) for i in chosen]
        self._context[layer] = torch.cat([key, *ks], dim=2), torch.cat([value, *vs], dim=2)
        return self._context[layer]

    def end_probe(self) -> None:
        """After the probe pass: each layer's budget from every layer's scores; the next pass chooses."""
        layers = sorted(self.scores)
        self.budgets = dict(zip(layers, self.retrieval.budgets([self.scores[l] for l in layers])))
        self.scores = {}
        self.probe = False

    def evidence(self) -> list[Evidence]:
        """The chunks any layer attended to, in temporal order, with their time range in the source video."""
        counts: dict[int, list[float]] = {}
        for layer, chosen in self.selected.items():
            for i in chosen:
                counts.setdefault(i, []).append(float(self.scores[layer][i]))
        out = []
        for i in sorted(counts):
            start, end = chunk_span(self._meta[i].frame_range, self.frame_times, self.duration, self.frame_seconds)
            out.append(Evidence(chunk=i, start_s=start, end_s=end, score=sum(counts[i]) / len(counts[i]),
                                layers=len(counts[i])))
        return out


def chunk_span(frame_range: tuple[int, int], frame_times: Sequence[float], duration: float,
               frame_seconds: float) -> tuple[float, float]:
    """[start, end) seconds of the chunk holding sampled frames [lo, hi): from its first frame's time to the next
    chunk's first frame's, and to the video's duration for the last chunk — so chunk ranges tile the video, also
    when frames are not evenly spaced (VFR). A cache without a recorded duration ends its last chunk one sampled
    interval (`frame_seconds`) after its last frame."""
    lo, hi = frame_range
    start = float(frame_times[lo])
    if hi < len(frame_times):
        return start, float(frame_times[hi])
    last = float(frame_times[hi - 1])
    return start, float(duration) if duration > last else last + frame_seconds


RETRIEVALS: dict[str, type[Retrieval]] = {"topk": TopK, "segments": Segments}


def retrieval_setting(*, top_k: int | None = None, segments: int | None = None, recent: int | None = None,
                      adaptive: bool = False, query: str | None = None) -> Retrieval | None:
    """The setting a user names (the service's `retrieval` object, `statekv ask`'s flags): `top_k` (ReKV) or
    `segments` (StreamKV) chunks per layer, `recent` (None: the kind's default), `adaptive` and `query` (top_k
    only; None: "prompt"). None when neither kind is given; ValueError naming what does not go together."""
    if top_k is not None and segments is not None:
        raise ValueError("give top_k or segments, not both")
    if top_k is None and segments is None:
        if recent is not None or adaptive or query is not None:
            raise ValueError("recent, adaptive and query need top_k or segments")
        return None
    extra = {} if recent is None else {"recent": recent}
    if top_k is not None:
        return TopK(k=top_k, adaptive_budget=adaptive, query=query or "prompt", **extra)
    if adaptive or query is not None:
        raise ValueError(f"{'adaptive' if adaptive else 'query'} goes with top_k, not segments")
    return Segments(k=segments, **extra)


def make_retrieval(settings: dict[str, Any] | None) -> Retrieval | None:
    """A retrieval setting from its recorded form ({"name": "topk", "k": 64, ...}); None passes through."""
    if settings is None:
        return None
    settings = dict(settings)
    name = settings.pop("name", "topk")
    if name not in RETRIEVALS:
        raise ValueError(f"unknown retrieval {name!r}; valid: {', '.join(RETRIEVALS)}")
    return RETRIEVALS[name](**settings)
