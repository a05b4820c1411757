"""`VideoKVCache`: what streaming prefill produces and answering consumes. A plain container: no I/O, no family.

It holds the text prefix's KV, every chunk's own KV (the per-frame cache used for answering), the final carried
state (to resume a stream), for hybrid models the exact recurrent states of the linear-attention layers (after the
prefix and after the last chunk; those layers have no KV: their entries in the per-layer KV lists are None), the prefill config it was made with, and the family adapter's position cursor (an
opaque JSON-able dict: only the adapter reads it). Chunks carry their own token counts and (R, n) positions.
Tensors live on the host; answering moves them to the model's device.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from statekv.errors import CacheLayoutError, ModelMismatchError
from statekv.policies import LayerState

# what a cache keeps to answer from: every chunk's own KV, or only the bounded carried state
ANSWER_FROM = ("chunks", "state")


def check_answer_from(answer_from: str, compression: Any | None = None) -> None:
    """ValueError unless `answer_from` is one of ANSWER_FROM and goes with `compression` (write-time compression
    shrinks the stored chunks; a state-only cache stores none)."""
    if answer_from not in ANSWER_FROM:
        raise ValueError(f"unknown answer_from {answer_from!r}; valid: {', '.join(ANSWER_FROM)}")
    if compression is not None and answer_from != "chunks":
        raise ValueError("compression shrinks the stored chunks, and answer_from='state' stores none")


@dataclass
class RecurrentState:
    """The exact state of one linear-attention layer (e.g. Gated DeltaNet) after a prefix of the sequence.

    Everything the layer needs to continue: nothing is approximated or selected (the layer's cost per token is
    constant already). Shapes as transformers' `LinearAttentionLayer` holds them, without the batch axis.
    """

    conv: torch.Tensor  # (C, K): the last K inputs of the short causal convolution (C = 2·key dim + value dim)
    recurrent: torch.Tensor  # (Hv, Dk, Dv): the delta rule's state (float32 in transformers' kernels)

    def to(self, device: torch.device | str, *, copy: bool = False) -> "RecurrentState":
        return RecurrentState(self.conv.to(device, copy=copy), self.recurrent.to(device, copy=copy))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))


@dataclass
class ChunkKV:
    """One chunk (the family's unit: e.g. two frames for Qwen, one for InternVL) and the KV its tokens produced."""

    index: int  # chunk index within the video
    frame_range: tuple[int, int]  # [start, end) among the video's sampled frames
    source_frames: list[int]  # frame indices in the source video
    timestamps: list[float]  # seconds, one per sampled frame
    position_ids: torch.Tensor  # (R, n) int64: R = the family's position rows (3 for M-RoPE, 1 for 1-D RoPE)
    keys: list[torch.Tensor | None]  # per layer (Hkv, n, D); None at linear-attention layers (and unloaded ones)
    values: list[torch.Tensor | None]  # per layer (Hkv, n, D), or (Hkv, m, D) where `kept` says which m
    # write-time compression (statekv.compression.Guided): per layer the int64 (m,) ascending indices, among the
    # chunk's n tokens, of the tokens whose K/V is stored (the same for every KV head); None: all n are stored
    kept: list[torch.Tensor | None] | None = None
    # per layer the float32 (Hkv, D) mean of the stored keys *before* RoPE (ReKV's block key, for
    # TopK(query="question")); set by the engine, which knows the family's rotary embedding; None: not computed
    pre_rope_summaries: list[torch.Tensor | None] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens the chunk stands for in the video (its positions); a compressed layer stores fewer."""
        return self.position_ids.shape[1]

    def token_index(self, layer: int) -> torch.Tensor:
        """(m,) int64 indices among the chunk's tokens of the K/V stored at `layer` (all n when not compressed):
        `position_ids[:, token_index(layer)]` are the stored keys' original positions."""
        if self.kept is not None and self.kept[layer] is not None:
            return self.kept[layer]
        return torch.arange(self.num_tokens)

    def stored_tokens(self, layer: int) -> int:
        """Tokens whose K/V this chunk stores at `layer`."""
        return int(self.token_index(layer).numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V held (layers not loaded are None and count nothing)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


@dataclass
class ModelInfo:
    """Which model made a cache, and on which token layout; a cache is only valid for a model with the same
    fingerprint whose adapter builds the same layout (`check_serves`)."""

    name_or_path: str
    model_type: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    linear_layers: list[int] = field(default_factory=list)  # layers with a recurrent state and no KV
    # the family adapter's token-layout version (`VideoLMAdapter.layout_version`); caches from before it was
    # recorded hold version 1
    layout_version: int = 1
    transformers_version: str = ""  # the transformers the cache was built with ("" before it was recorded)

    def check_serves(self, made_with: "ModelInfo", video: str) -> None:
        """Raise unless a cache of `video` made with `made_with` can be used (answered, resumed) by this model:
        ModelMismatchError for another model, CacheLayoutError (re-index) for another layout of this model."""
        if made_with.fingerprint != self.fingerprint:
            raise ModelMismatchError("model", f"{made_with.name_or_path} (fingerprint {made_with.fingerprint})",
                                     f"{self.name_or_path} (fingerprint {self.fingerprint})", cache_model=made_with,
                                     engine_model=self)
        if made_with.layout_version != self.layout_version:
            raise CacheLayoutError(video, made_with.model_type, made_with.layout_version,
                                   made_with.transformers_version, self.layout_version)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.linear_layers]

    @property
    def layer_types(self) -> list[str]:
        """transformers' names: "linear_attention" or "full_attention" per layer (recorded in the manifest)."""
        return ["linear_attention" if i in self.linear_layers else "full_attention" for i in range(self.num_layers)]


@dataclass
class VideoInfo:
    """Where the frames came from and how they were sampled and resized."""

    source: str
    video_fps: float
    total_frames: int
    sampled_fps: float
    frame_size: tuple[int, int]  # resized (height, width)
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)  # presentation time of each sampled frame, seconds
    requested_fps: float = 0.0  # the fps asked for; above sampled_fps when --max-frames lowered it
    duration: float = 0.0  # seconds covered, last frame's display included: a resumed source starts here
    # one per prefilled source, in order (see statekv.video.sampling.segment): source, window [start, end) seconds
    # in it, sampled frames [lo, hi) and cache time offset they occupy here, frame size, requested/sampled fps
    segments: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class PrefillConfig:
    """Everything that changes a cache's numbers besides the model and the frames; recorded with the cache.

    Resuming a cache with a different config is refused (`first_difference` names the field).
    """

    policy: dict[str, Any]  # the policy's name and settings
    chunks_per_step: int  # chunks fed per model call (they see each other in full; selection once per step)
    layout: str  # "prefix-first" or "video-first"
    sampling: dict[str, Any]  # SamplingConfig fields
    adapter: dict[str, Any]  # the family adapter's options (position rule, RoPE scaling, ...)
    attention_backend: str  # "auto", "torch" or "triton"
    # "chunks": every chunk's own KV is kept and answers attend to all of it (StateKV, ReKV); "state": only the
    # bounded carried state is kept and answers attend to [prefix | state] (InfiniPot-V's fixed-budget cache)
    answer_from: str = "chunks"
    # write-time compression of the stored chunk KV (statekv.compression: e.g. {"name": "guided", "prompt": ...,
    # "keep": 0.25}); None stores every token. It never changes the carried state.
    compression: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrefillConfig":
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.default is MISSING} - data.keys()
        if missing:
            raise ValueError(f"prefill config lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names if k in data})

    def first_difference(self, other: "PrefillConfig") -> str | None:
        """The first field (dotted for nested settings, e.g. "policy.capacity") where the configs differ."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(a.keys() | b.keys()):
                    if a.get(key) != b.get(key):
                        return f"{f.name}.{key}"
            return f.name
        return None


@dataclass(frozen=True)
class Committed:
    """Where a cache read from a store came from: the committed manifest it was read from, that manifest's
    version (S3 ETag / MD5 of its bytes: compare with `CacheStore.version` to see a re-prefill), the layers
    read (every layer unless a partial load asked for some) and the model it was checked against at load."""

    manifest: dict[str, Any]
    version: str
    layers: list[int]
    checked_for: ModelInfo | None = None  # the model the store checked it against before reading any tensor

    @property
    def video_id(self) -> str:
        return self.manifest["video_id"]


@dataclass
class VideoKVCache:
    """Prefix KV + per-chunk KV + final carried state of one video, for one model and prefill config."""

    model: ModelInfo
    config: PrefillConfig
    dtype: torch.dtype
    video: VideoInfo
    prefix_ids: torch.Tensor  # (P,) int64: what was prefilled before the first chunk (depends on the layout)
    prefix_keys: list[torch.Tensor | None]  # per layer (Hkv, P, D); None at linear-attention layers
    prefix_values: list[torch.Tensor | None]
    chunks: list[ChunkKV] = field(default_factory=list)  # empty when chunks were streamed to a sink only
    state: list[LayerState | None] | None = None  # per layer (None at linear layers); None before the first chunk
    num_chunks: int = 0  # chunks prefilled so far
    chunk_tokens: list[int] = field(default_factory=list)  # tokens of each chunk, in order
    cursor: dict[str, Any] = field(default_factory=dict)  # the adapter's position cursor after the last chunk
    scenes: list[tuple[int, int]] = field(default_factory=list)  # [start, end) chunk ranges of scenes (retrieval)
    # linear-attention layers only: {layer: state after the prefix} and {layer: state after the last prefilled
    # token} (= after the prefix before the first chunk). Answering starts from `recurrent` (a copy), resume too.
    prefix_recurrent: dict[int, RecurrentState] = field(default_factory=dict)
    recurrent: dict[int, RecurrentState] = field(default_factory=dict)
    committed: Committed | None = None  # set by the store's reader; None for a cache made in this process

    @property
    def policy(self) -> dict[str, Any]:
        return self.config.policy

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[0]

    @property
    def num_video_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def position_ids(self) -> torch.Tensor:
        """(R, P + N) positions of the prefix and every chunk's tokens."""
        self._require_chunks()
        rows = self.chunks[0].position_ids.shape[0] if self.chunks else 1
        prefix = torch.arange(self.prefix_len, dtype=torch.long).view(1, -1).expand(rows, -1)
        return torch.cat([prefix, *(c.position_ids for c in self.chunks)], dim=1)

    @property
    def nbytes(self) -> int:
        return self.prefix_nbytes + sum(c.nbytes for c in self.chunks) + self.recurrent_nbytes

    @property
    def prefix_nbytes(self) -> int:
        """Bytes of the text prefix's K/V."""
        return sum(t.numel() * t.element_size() for t in (*self.prefix_keys, *self.prefix_values) if t is not None)

    @property
    def recurrent_nbytes(self) -> int:
        """Bytes of the linear layers' final states: fixed by the model, independent of the video's length."""
        return sum(s.nbytes for s in self.recurrent.values())

    # --- KV access ------------------------------------------------------------------------------------------

    def frame_keys(self, layer: int) -> torch.Tensor:
        """(Hkv, N, D) keys of every video token at `layer`, in temporal order."""
        self._require_kv(layer)
        self._require_chunks()
        return torch.cat([c.keys[layer] for c in self.chunks], dim=1)

    def frame_values(self, layer: int) -> torch.Tensor:
        self._require_kv(layer)
        self._require_chunks()
        return torch.cat([c.values[layer] for c in self.chunks], dim=1)

    def layer_kv(self, layer: int, chunks: list[ChunkKV] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hkv, P + n, D) keys and values of the prefix followed by `chunks` (all chunks by default) — or, for a
        cache that answers from its carried state, of the prefix followed by that state. With write-time
        compression n counts the tokens each chunk stores at this layer (layers may differ)."""
        if chunks is None and self.config.answer_from == "state":
            if self.state is None:
                raise ValueError("this cache answers from its carried state, and it has none (no chunk prefilled)")
            s = self.state[layer]
            return (torch.cat([self.prefix_keys[layer], s.keys], dim=1),
                    torch.cat([self.prefix_values[layer], s.values], dim=1))
        self._require_kv(layer)
        if chunks is None:
            self._require_chunks()
            chunks = self.chunks
        keys = torch.cat([self.prefix_keys[layer], *(c.keys[layer] for c in chunks)], dim=1)
        values = torch.cat([self.prefix_values[layer], *(c.values[layer] for c in chunks)], dim=1)
        return keys, values

    def state_sizes(self) -> list[int]:
        """Carried tokens per attention layer (the same for every KV head); linear layers carry no tokens."""
        return [] if self.state is None else [s.size for s in self.state if s is not None]

    def _require_kv(self, layer: int) -> None:
        if layer in self.model.linear_layers:
            raise ValueError(f"layer {layer} is a linear-attention layer: it has no KV, its state is "
                             f"cache.recurrent[{layer}]")

    def _require_chunks(self) -> None:
        if len(self.chunks) != self.num_chunks:
            raise ValueError(f"this cache holds {len(self.chunks)} of its {self.num_chunks} chunks in memory "
                             "(chunks were streamed to a sink); load it from its store to answer")
