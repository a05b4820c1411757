"""Carried-state policies: which earlier keys a new chunk attends to during streaming prefill.

A policy is a small object that knows nothing of the model (StreamingLLM's `kv_cache.py` is the model): per layer
it takes the carried state and the chunk just prefilled, and returns the next state. Every approximate policy has a
setting where it carries everything and so equals `Full()` exactly (capacity >= all video tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


@dataclass
class LayerState:
    """One layer's carried keys and values, per KV head, in temporal order."""

    keys: torch.Tensor  # (Hkv, S, D), post-RoPE
    values: torch.Tensor  # (Hkv, S, D)
    token_index: torch.Tensor  # (Hkv, S) int64: position of each key among the video's tokens
    scores: torch.Tensor | None = None  # (Hkv, S) float32 per-token score a policy carries (StateKV decay, TaR)

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    def to(self, device: torch.device | str) -> "LayerState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerState(move(self.keys), move(self.values), move(self.token_index), move(self.scores))

    @staticmethod
    def concat(first: "LayerState | None", second: "LayerState") -> "LayerState":
        """[first; second] along the token axis (first may be None: no state yet)."""
        if first is None:
            return second
        return LayerState(
            torch.cat([first.keys, second.keys], dim=1),
            torch.cat([first.values, second.values], dim=1),
            torch.cat([first.token_index, second.token_index], dim=1),
        )

    def gather(self, index: torch.Tensor, scores: torch.Tensor | None = None) -> "LayerState":
        """Keep, per KV head, the tokens at `index` (Hkv, K), which must be sorted to keep temporal order."""
        kv_index = index.unsqueeze(-1).expand(-1, -1, self.keys.shape[-1])
        return LayerState(
            self.keys.gather(1, kv_index),
            self.values.gather(1, kv_index),
            self.token_index.gather(1, index),
            scores,
        )


class Policy:
    """Base class: `update` returns the state carried into the next chunk.

    The streaming engine calls `update_merged` (the state and the chunk as one buffer); a policy implements
    `update`, and overrides `update_merged` too when it can decide without concatenating. A subclass that changes
    what a policy keeps overrides `update_merged` (what runs), not only `update`.
    """

    name: ClassVar[str]
    needs_scores: ClassVar[bool] = False
    # the engine passes `chunk_tokens` (the step's chunks' token counts) to `update_merged` when this is set
    needs_chunk_tokens: ClassVar[bool] = False

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        """`scores` (Hkv, S + n) is the attention mass [state; chunk] received from the chunk's queries."""
        raise NotImplementedError

    def update_merged(self, merged: LayerState, state_size: int, carried: torch.Tensor | None,
                      scores: torch.Tensor | None) -> LayerState:
        """`update` given [state; chunk] as ONE LayerState (the first `state_size` tokens are the state, whose own
        scores are `carried`): the streaming engine passes views of its preallocated buffer, so a policy that can
        say what it keeps without concatenating overrides this and allocates nothing (`Full` returns `merged`)."""
        state = None if state_size == 0 else LayerState(
            merged.keys[:, :state_size], merged.values[:, :state_size], merged.token_index[:, :state_size], carried)
        chunk = LayerState(merged.keys[:, state_size:], merged.values[:, state_size:],
                           merged.token_index[:, state_size:])
        return self.update(state, chunk, scores)

    def settings(self) -> dict[str, Any]:
        """The policy's name and settings, as recorded with a cache."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class Full(Policy):
    """Carry every earlier token: exact full attention, quadratic in video length. The reference."""

    name: ClassVar[str] = "full"

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        return LayerState.concat(state, chunk)

    def update_merged(self, merged: LayerState, state_size: int, carried: torch.Tensor | None,
                      scores: torch.Tensor | None) -> LayerState:
        return LayerState(merged.keys, merged.values, merged.token_index)


@dataclass
class Window(Policy):
    """Carry the most recent `capacity` tokens: the sliding-window / recency baseline (ReKV's prefill)."""

    capacity: int
    name: ClassVar[str] = "window"

    def __post_init__(self) -> None:
        _check_capacity(self.capacity)

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        return self.update_merged(LayerState.concat(state, chunk), 0, None, scores)

    def update_merged(self, merged: LayerState, state_size: int, carried: torch.Tensor | None,
                      scores: torch.Tensor | None) -> LayerState:
        keep = slice(max(0, merged.size - self.capacity), merged.size)
        return LayerState(merged.keys[:, keep], merged.values[:, keep], merged.token_index[:, keep])


@dataclass
class StateKV(Policy):
    """Carry the `capacity` keys per layer and KV head that received the most attention mass from the chunk.

    Mass is summed over the chunk's queries and the query heads of each KV group. With `decay` set, scores
    accumulate across chunks (`score = decay * previous + new`); by default (None) they are recomputed every
    chunk, as in the paper's code.
    """

    capacity: int = 4096
    decay: float | None = None
    name: ClassVar[str] = "statekv"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_capacity(self.capacity)
        if self.decay is not None and not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"StateKV decay must be in [0, 1] or None, got {self.decay!r}")

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        return self.update_merged(LayerState.concat(state, chunk), 0 if state is None else state.size,
                                  None if state is None else state.scores, scores)

    def update_merged(self, merged: LayerState, state_size: int, carried: torch.Tensor | None,
                      scores: torch.Tensor | None) -> LayerState:
        if scores is None:
            raise ValueError("StateKV.update needs the key scores of [state; chunk]")
        if scores.shape != merged.token_index.shape:
            raise ValueError(f"key scores {tuple(scores.shape)} do not match [state; chunk] "
                             f"{tuple(merged.token_index.shape)}")
        scores = scores.float()
        if self.decay is not None and state_size and carried is not None:
            scores = scores.clone()
            scores[:, :state_size] += carried.to(scores.device) * self.decay
        kept_scores = scores if self.decay is not None else None
        if merged.size <= self.capacity:
            return LayerState(merged.keys, merged.values, merged.token_index, kept_scores)
        top = scores.topk(self.capacity, dim=1).indices.sort(dim=1).values  # (Hkv, capacity), temporal order
        return merged.gather(top, None if kept_scores is None else kept_scores.gather(1, top))


@dataclass
class InfiniPotV(Policy):
    """InfiniPot-V as published (paper and reference code): block-wise compression of a fixed-budget memory.

    The memory fills, frame after frame, until it holds the `budget` (in tokens, rounded down to whole frames);
    then it is compressed to the `target` share of those frames (the paper's 32 frames -> 24) and fills again.
    A compression, per layer and KV head, of the F frames held:
    - the newest int(F * `recent`) frames are the recent window, kept whole;
    - TaR: every older token is scored by its mean cosine similarity to the keys at the same spatial offset (its
      slot within a frame) in each recent frame, recomputed at every compression; the least similar (most novel)
      are kept, so that TaR's share — `tar` of the kept tokens, the recent window included — is filled;
    - VaN: the rest of the kept tokens are those with the largest value L2 norm among the tokens left.
    With `tar=0` there is no recent window and VaN chooses every kept token (as in the reference code). A frame is
    one chunk of the engine (`chunk_tokens`); frames must have equal token counts (Qwen2-VL / Qwen2.5-VL, the
    paper's families) when a compression runs. Kept keys stay post-RoPE at their original positions. With a
    budget above all video tokens nothing is ever compressed: `Full`.
    """

    budget: int = 4096  # tokens the memory may hold (whole frames); a memory that reaches it is compressed
    target: float = 0.75  # share of the budget's frames a compression keeps (0.75: 32 frames -> 24)
    recent: float = 0.25  # share of the frames held that is the recent window (TaR's reference, kept whole)
    tar: float = 0.5  # share of the kept tokens chosen by TaR, recent window included; the rest by VaN
    name: ClassVar[str] = "infinipot"
    needs_chunk_tokens: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_capacity(self.budget)
        for field_name in ("target", "recent", "tar"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"InfiniPotV {field_name} must be in [0, 1], got {value!r}")

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        """The chunk is one frame (the engine's path, `update_merged`, is told its chunks' token counts)."""
        return self.update_merged(LayerState.concat(state, chunk), 0 if state is None else state.size, None, None)

    def update_merged(self, merged: LayerState, state_size: int, carried: torch.Tensor | None,
                      scores: torch.Tensor | None, *, chunk_tokens: Sequence[int] | None = None) -> LayerState:
        kept = LayerState(merged.keys, merged.values, merged.token_index)
        frame = int(chunk_tokens[-1]) if chunk_tokens else merged.size - state_size  # tokens per frame
        if frame < 1:
            return kept
        budget_frames = max(1, self.budget // frame)
        if merged.size < budget_frames * frame:  # the memory is not full yet
            return kept
        if merged.size % frame or (chunk_tokens and any(int(t) != frame for t in chunk_tokens)):
            raise ValueError(f"InfiniPot-V compresses whole frames of equal size, but the memory holds "
                             f"{merged.size} tokens and the step's chunks have {list(chunk_tokens or [frame])} "
                             "tokens (a family whose chunks differ in length: use infinipot-stream)")
        target_frames = max(1, int(budget_frames * self.target))
        if merged.size <= target_frames * frame:
            return kept
        return kept.gather(infinipot_keep(merged.keys, merged.values, frame, target_frames, self.recent, self.tar))


def infinipot_keep(keys: torch.Tensor, values: torch.Tensor, frame: int, target_frames: int, recent: float,
                   tar: float) -> torch.Tensor:
    """(Hkv, target_frames * frame) sorted indices that one InfiniPot-V compression keeps of the F whole frames in
    `keys`/`values` (Hkv, F * frame, D): the recent window, TaR's most novel older tokens, then VaN."""
    heads, size, _ = keys.shape
    frames = size // frame
    keep = target_frames * frame
    device = keys.device
    pinned = torch.empty(heads, 0, dtype=torch.long, device=device)  # kept before VaN chooses
    n_recent = min(int(frames * recent), target_frames) if tar > 0 else 0
    if tar > 0 and n_recent > 0:
        r = n_recent * frame
        tar_budget = keep - round((1.0 - tar) * keep)  # the reference's split: VaN gets round((1 - tar) * keep)
        unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-9)  # (Hkv, S, D)
        old = unit[:, :size - r].reshape(heads, frames - n_recent, frame, -1)  # (Hkv, F - R, frame, D)
        ref = unit[:, size - r:].reshape(heads, n_recent, frame, -1)  # (Hkv, R, frame, D)
        similarity = torch.einsum("hjtd,hqtd->hjt", old, ref) / n_recent  # mean over the recent frames
        novelty = -similarity.reshape(heads, -1)  # (Hkv, S - R * frame)
        n_tar = min(max(0, tar_budget - r), novelty.shape[1])
        tar_idx = novelty.topk(n_tar, dim=1).indices
        recent_idx = torch.arange(size - r, size, device=device).expand(heads, -1)
        pinned = torch.cat([tar_idx, recent_idx], dim=1)
    norms = values.float().norm(dim=-1)  # (Hkv, S)
    norms = norms.scatter(1, pinned, float("-inf"))
    van_idx = norms.topk(keep - pinned.shape[1], dim=1).indices
    return torch.cat([pinned, van_idx], dim=1).sort(dim=1).values


@dataclass
class InfiniPotVStream(Policy):
    """statekv's earlier, per-chunk variant of InfiniPot-V (not the published rule: see docs/methods.md).

    Compresses after every chunk, not block-wise: when [state; chunk] exceeds the budget, the newest `recent`
    fraction of the budget (in tokens) is always kept; of the rest, a `tar` share goes to the tokens with the
    highest temporal novelty (1 - cosine similarity of a key to the key at the same offset from the end of the
    previous carried state — recorded once, when the token arrives; 2.0 where there is none, so the first chunk
    counts as maximally novel) and the remainder to the highest value L2 norms (VaN). With budget >= all tokens it
    equals `Full`.
    """

    budget: int = 4096
    recent: float = 0.25
    tar: float = 0.5
    name: ClassVar[str] = "infinipot-stream"

    def __post_init__(self) -> None:
        _check_capacity(self.budget)
        for field_name in ("recent", "tar"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"InfiniPotVStream {field_name} must be in [0, 1], got {value!r}")

    def update(self, state: LayerState | None, chunk: LayerState, scores: torch.Tensor | None) -> LayerState:
        novelty = temporal_novelty(state, chunk)
        merged = LayerState.concat(state, chunk)
        carried = state.scores if state is not None and state.scores is not None else None
        if state is not None and carried is None:  # a state made by another policy: no novelty recorded
            carried = torch.full(state.token_index.shape, 2.0, device=novelty.device)
        merged.scores = novelty if carried is None else torch.cat([carried.to(novelty.device), novelty], dim=1)
        if merged.size <= self.budget:
            return merged
        return merged.gather(*_infinipot_keep(merged, self.budget, self.recent, self.tar))


def temporal_novelty(state: LayerState | None, chunk: LayerState) -> torch.Tensor:
    """(Hkv, n) TaR novelty of the chunk's tokens: 1 - cos(key, key at the same offset from the end in the state's
    last tokens), 2.0 (maximal) where the state holds no such earlier token."""
    heads, n, _ = chunk.keys.shape
    novelty = torch.full((heads, n), 2.0, dtype=torch.float32, device=chunk.keys.device)
    if state is None or state.size == 0:
        return novelty
    m = min(n, state.size)
    cos = torch.nn.functional.cosine_similarity(chunk.keys[:, n - m:].float(), state.keys[:, -m:].float(), dim=-1)
    novelty[:, n - m:] = 1.0 - cos
    return novelty


def _infinipot_keep(merged: LayerState, budget: int, recent: float, tar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (Hkv, budget) sorted, their novelty) of the tokens InfiniPot-V keeps in `merged`."""
    size = merged.size
    n_recent = min(budget, int(round(budget * recent)))
    n_old = size - n_recent
    n_tar = int(round((budget - n_recent) * tar))
    n_van = budget - n_recent - n_tar
    heads = merged.keys.shape[0]
    device = merged.keys.device
    old_novelty = merged.scores[:, :n_old].float()
    none = torch.empty(heads, 0, dtype=torch.long, device=device)
    tar_idx = old_novelty.topk(n_tar, dim=1).indices if n_tar else none
    norms = merged.values[:, :n_old].float().norm(dim=-1)
    norms = norms.scatter(1, tar_idx, float("-inf"))  # already kept by TaR
    van_idx = norms.topk(n_van, dim=1).indices if n_van else none
    recent_idx = torch.arange(n_old, size, device=device).expand(heads, -1)
    index = torch.cat([tar_idx, van_idx, recent_idx], dim=1).sort(dim=1).values
    return index, merged.scores.gather(1, index)


POLICIES: dict[str, type[Policy]] = {"full": Full, "window": Window, "statekv": StateKV, "infinipot": InfiniPotV,
                                     "infinipot-stream": InfiniPotVStream}
BUDGETED = ("infinipot", "infinipot-stream")  # policies whose one size setting is `budget`, not `capacity`


def make_policy(name: str, **settings: Any) -> Policy:
    """Build a policy from its name (as given on a command line or in a manifest)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}") from None
    return cls(**settings)


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")


def policy_from_size(name: str, size: int) -> Policy:
    """A policy from a command-line name and its one size setting: `capacity` (window, statekv) or InfiniPot-V's
    `budget`; `full` takes none."""
    if name == "full":
        return make_policy(name)
    return make_policy(name, **({"budget": size} if name in BUDGETED else {"capacity": size}))
