"""Settings to compare: a name, a carried-state policy and (later) ask-time options, parsed from short specs.

    full                 exact full attention (the reference every other setting is compared to)
    window:4096          recency baseline, the 4096 most recent tokens carried
    statekv:4096         StateKV with capacity 4096 (per layer and KV head)
    statekv:4096:0.9     StateKV with an accumulating decay of 0.9
    infinipot:4096       InfiniPot-V as published: a 4096-token memory compressed block-wise to 75 % of its
                         frames when full (newest 25 % of the frames, TaR against them, VaN)
    infinipot-stream:4096
                         statekv's per-chunk InfiniPot-V variant (docs/methods.md says how it differs)
    infinipot-cache:4096 InfiniPot-V as the stored cache: only the 4096-token state is kept and answered from
    topk:64:8            Full prefill; each question attends to the 64 best chunks per layer + the last 8
    topk:64:question     ... scored as ReKV publishes it: the bare question's queries before RoPE
                         (TopK(query="question")); a trailing ":question" (or ":prompt", the default) goes on every
                         top-k kind (topk, adaptive, rekv)
    adaptive:64:8        Full prefill; top-k retrieval whose 64 x layers chunks are shared across layers by how
                         concentrated each layer's scores are (TopK(adaptive_budget=True)) + the last 8
    rekv:4096:64:8       ReKV: sliding-window prefill (4096 tokens) + top-64 retrieval + the last 8 chunks
    segments:64:8        Full prefill; StreamKV segment retrieval (whole scenes up to 64 chunks + the last 8)
    streamkv:4096:64:8   StreamKV: sliding-window prefill + segment retrieval
    guided:0.25          Full prefill; each chunk stores the quarter of its tokens per layer that StreamKV's guidance
                         prompt attends to most (write-time compression, statekv.compression.Guided)
    streamkv-guided:0.6:4096:64:8
                         StreamKV's whole recipe: guidance compression (keep 0.6) + sliding-window prefill + segment
                         retrieval

New methods add a parser to `SETTING_KINDS` (kind -> function of the spec's arguments returning a `Setting`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from statekv.compression import Guided
from statekv.policies import Full, InfiniPotV, InfiniPotVStream, Policy, StateKV, Window
from statekv.retrieval import QUERIES, Segments, TopK


@dataclass(frozen=True)
class Setting:
    """One configuration under test: how the video is prefilled (`policy`) and how questions are asked (`ask`)."""

    name: str
    policy: Policy
    ask: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of `Engine.ask`
    int8: bool = False  # store chunk K/V as int8
    answer_from: str = "chunks"  # "state": keep and answer from the bounded carried state only (Engine docs)
    compression: Guided | None = None  # write-time compression of the stored chunks (Engine docs)

    @property
    def is_reference(self) -> bool:
        return (isinstance(self.policy, Full) and not self.ask and not self.int8 and self.answer_from == "chunks"
                and self.compression is None)


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return value


def _full(args: list[str]) -> Setting:
    if args:
        raise ValueError(f"'full' takes no arguments, got {':'.join(args)!r}")
    return Setting("full", Full())


def _window(args: list[str]) -> Setting:
    if len(args) != 1:
        raise ValueError("'window' takes one argument: window:CAPACITY")
    capacity = _positive_int(args[0], "window capacity")
    return Setting(f"window:{capacity}", Window(capacity))


def _statekv(args: list[str]) -> Setting:
    if len(args) not in (1, 2):
        raise ValueError("'statekv' takes statekv:CAPACITY or statekv:CAPACITY:DECAY")
    capacity = _positive_int(args[0], "statekv capacity")
    decay = float(args[1]) if len(args) == 2 else None
    name = f"statekv:{capacity}" + (f":{decay:g}" if decay is not None else "")
    return Setting(name, StateKV(capacity=capacity, decay=decay))


def _budgeted(kind: str, cls: type[Policy]) -> Callable[[list[str]], Setting]:
    """The parser of an InfiniPot-V kind: KIND:BUDGET[:RECENT_FRACTION]."""
    def parse(args: list[str]) -> Setting:
        if len(args) not in (1, 2):
            raise ValueError(f"'{kind}' takes {kind}:BUDGET or {kind}:BUDGET:RECENT_FRACTION")
        budget = _positive_int(args[0], f"{kind} budget")
        recent = float(args[1]) if len(args) == 2 else 0.25
        name = f"{kind}:{budget}" + (f":{recent:g}" if len(args) == 2 else "")
        return Setting(name, cls(budget=budget, recent=recent))
    return parse


_infinipot = _budgeted("infinipot", InfiniPotV)


def _infinipot_cache(args: list[str]) -> Setting:
    inner = _infinipot(args)
    return Setting(inner.name.replace("infinipot", "infinipot-cache", 1), inner.policy, answer_from="state")


def _retrieval_args(kind: str, args: list[str]) -> tuple[int, int]:
    if len(args) not in (1, 2):
        raise ValueError(f"'{kind}' takes K or K:RECENT after its prefill settings")
    k = _positive_int(args[0], f"{kind} k")
    recent = int(args[1]) if len(args) == 2 else 0
    if recent < 0:
        raise ValueError(f"{kind} recent must be >= 0, got {recent}")
    return k, recent


def _retrieving(kind: str, cls: Callable[..., Any], windowed: bool, *, queries: bool = False
                ) -> Callable[[list[str]], Setting]:
    """A retrieval kind's parser: [WINDOW:]K[:RECENT], and with `queries` (top-k kinds) an optional last
    argument naming what scores the chunks ("prompt", the default, or "question": ReKV's published query)."""
    def parse(args: list[str]) -> Setting:
        policy: Policy = Full()
        if windowed:
            if not args:
                raise ValueError(f"'{kind}' takes WINDOW:K[:RECENT]")
            policy = Window(_positive_int(args[0], f"{kind} window"))
            args = args[1:]
        query = "prompt"
        if args and args[-1] in QUERIES:
            if not queries:
                raise ValueError(f"'{kind}' takes no query ({args[-1]!r}); only the top-k kinds do")
            query, args = args[-1], args[:-1]
        k, recent = _retrieval_args(kind, args)
        name = ":".join([kind, *([str(policy.capacity)] if windowed else []), str(k)] + ([str(recent)] if recent else [])
                        + ([query] if query != "prompt" else []))
        extra = {"query": query} if queries else {}
        return Setting(name, policy, {"retrieval": cls(k=k, recent=recent, **extra)})
    return parse


def _keep_fraction(text: str) -> float:
    try:
        keep = float(text)
    except ValueError:
        keep = -1.0
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"guided keep must be a fraction in (0, 1], got {text!r}")
    return keep


def _guided(args: list[str]) -> Setting:
    if len(args) != 1:
        raise ValueError("'guided' takes one argument: guided:KEEP (a fraction in (0, 1])")
    keep = _keep_fraction(args[0])
    return Setting(f"guided:{keep:g}", Full(), compression=Guided(keep=keep))


def _streamkv_guided(args: list[str]) -> Setting:
    if len(args) < 3:
        raise ValueError("'streamkv-guided' takes KEEP:WINDOW:K[:RECENT]")
    keep = _keep_fraction(args[0])
    inner = _retrieving("streamkv", Segments, True)(args[1:])
    return replace(inner, name=f"streamkv-guided:{keep:g}:{inner.name.split(':', 1)[1]}",
                   compression=Guided(keep=keep))


SETTING_KINDS: dict[str, Callable[[list[str]], Setting]] = {
    "full": _full, "window": _window, "statekv": _statekv, "infinipot": _infinipot, "infinipot-cache": _infinipot_cache,
    "infinipot-stream": _budgeted("infinipot-stream", InfiniPotVStream),
    "topk": _retrieving("topk", TopK, False, queries=True), "rekv": _retrieving("rekv", TopK, True, queries=True),
    "adaptive": _retrieving("adaptive", partial(TopK, adaptive_budget=True), False, queries=True),
    "segments": _retrieving("segments", Segments, False), "streamkv": _retrieving("streamkv", Segments, True),
    "guided": _guided, "streamkv-guided": _streamkv_guided,
}


def parse_setting(spec: str) -> Setting:
    """A `Setting` from a spec such as "statekv:4096"; a trailing "+int8" stores chunk K/V as int8."""
    text = spec.strip()
    int8 = text.endswith("+int8")
    if int8:
        text = text[: -len("+int8")]
    kind, *args = text.split(":")
    if kind not in SETTING_KINDS:
        raise ValueError(f"unknown setting {spec!r}; kinds: {', '.join(SETTING_KINDS)}")
    setting = SETTING_KINDS[kind](args)
    if int8:
        setting = replace(setting, name=f"{setting.name}+int8", int8=True)
    return setting


def parse_settings(specs: Iterable[str]) -> list[Setting]:
    """Settings from specs, with `full` first (added if missing: every metric is relative to it), no duplicates."""
    settings = [parse_setting(s) for s in specs]
    names = [s.name for s in settings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"settings given twice: {', '.join(dupes)}")
    reference = [s for s in settings if s.is_reference]
    others = [s for s in settings if not s.is_reference]
    return (reference or [_full([])]) + others
