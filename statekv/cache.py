"""`VideoKVCache`: what streaming prefill produces and answering consumes.

It holds the text prefix's KV, every chunk's own KV (the per-frame cache used for answering), the final carried
state (to resume a stream), and what is needed to place a question after the video: token ids and 3-D positions.
Tensors live on the host; answering moves them to the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from statekv.policies import LayerState


@dataclass
class ChunkKV:
    """One chunk (one temporal patch: two sampled frames) and the KV its tokens produced at every layer."""

    index: int  # temporal patch index within the video
    frame_range: tuple[int, int]  # [start, end) among the video's sampled frames
    source_frames: list[int]  # frame indices in the source video
    timestamps: list[float]  # seconds, one per sampled frame
    position_ids: torch.Tensor  # (3, n) int64
    keys: list[torch.Tensor]  # per layer (Hkv, n, D)
    values: list[torch.Tensor]  # per layer (Hkv, n, D)

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class ModelInfo:
    """Which model made a cache; a cache is only valid for a model with the same fingerprint."""

    name_or_path: str
    model_type: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    video_token_id: int


@dataclass
class VideoInfo:
    """Where the frames came from and how they were sampled and resized."""

    source: str
    video_fps: float
    total_frames: int
    sampled_fps: float
    second_per_grid_t: float
    frame_size: tuple[int, int]  # resized (height, width)
    grid_hw: tuple[int, int]  # patch grid (grid_h, grid_w) of one frame
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)  # presentation time of each sampled frame, seconds
    requested_fps: float = 0.0  # the fps asked for; above sampled_fps when --max-frames lowered it
    duration: float = 0.0  # seconds covered, last frame's display included: a resumed source starts here
    # one per prefilled source, in order (see statekv.video.sampling.segment): source, window [start, end) seconds
    # in it, sampled frames [lo, hi) and cache time offset they occupy here, frame size, requested/sampled fps
    segments: list[dict] = field(default_factory=list)


@dataclass
class VideoKVCache:
    """Prefix KV + per-chunk KV + final carried state of one video, for one model and policy."""

    model: ModelInfo
    policy: dict[str, Any]
    dtype: torch.dtype
    video: VideoInfo
    prefix_ids: torch.Tensor  # (P,) int64: the chat template up to and including <|vision_start|>
    prefix_keys: list[torch.Tensor]  # per layer (Hkv, P, D)
    prefix_values: list[torch.Tensor]
    chunks: list[ChunkKV] = field(default_factory=list)  # empty when chunks were streamed to a sink only
    state: list[LayerState] | None = None  # per layer; None before the first chunk
    grid_t: int = 0  # temporal patches prefilled so far
    max_position: int = -1  # largest position of any token so far (text after the video starts at +1)

    # --- shape of the video ----------------------------------------------------------------------------------

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[0]

    @property
    def video_grid_thw(self) -> torch.Tensor:
        """(1, 3) int64 [[grid_t, grid_h, grid_w]], as a Qwen processor would give for this video."""
        return torch.tensor([[self.grid_t, *self.video.grid_hw]], dtype=torch.long)

    @property
    def tokens_per_chunk(self) -> int:
        grid_h, grid_w = self.video.grid_hw
        return grid_h * grid_w // 4

    @property
    def num_video_tokens(self) -> int:
        return self.grid_t * self.tokens_per_chunk

    @property
    def next_position(self) -> int:
        """Position of the first text token after the video (original Qwen rule: max so far + 1)."""
        return self.max_position + 1

    @property
    def input_ids(self) -> torch.Tensor:
        """(P + N,) the prefix followed by one video placeholder token per video token."""
        video = torch.full((self.num_video_tokens,), self.model.video_token_id, dtype=torch.long)
        return torch.cat([self.prefix_ids, video])

    @property
    def position_ids(self) -> torch.Tensor:
        """(3, P + N) 3-D positions of the prefix and video tokens."""
        self._require_chunks()
        prefix = torch.arange(self.prefix_len, dtype=torch.long).view(1, -1).expand(3, -1)
        return torch.cat([prefix, *(c.position_ids for c in self.chunks)], dim=1)

    @property
    def nbytes(self) -> int:
        prefix = sum(t.numel() * t.element_size() for t in (*self.prefix_keys, *self.prefix_values))
        return prefix + sum(c.nbytes for c in self.chunks)

    # --- KV access ------------------------------------------------------------------------------------------

    def frame_keys(self, layer: int) -> torch.Tensor:
        """(Hkv, N, D) keys of every video token at `layer`, in temporal order."""
        self._require_chunks()
        return torch.cat([c.keys[layer] for c in self.chunks], dim=1)

    def frame_values(self, layer: int) -> torch.Tensor:
        self._require_chunks()
        return torch.cat([c.values[layer] for c in self.chunks], dim=1)

    def layer_kv(self, layer: int, chunks: list[ChunkKV] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hkv, P + n, D) keys and values of the prefix followed by `chunks` (all chunks by default)."""
        if chunks is None:
            self._require_chunks()
            chunks = self.chunks
        keys = torch.cat([self.prefix_keys[layer], *(c.keys[layer] for c in chunks)], dim=1)
        values = torch.cat([self.prefix_values[layer], *(c.values[layer] for c in chunks)], dim=1)
        return keys, values

    def state_sizes(self) -> list[int]:
        """Carried tokens per layer (the same for every KV head)."""
        return [] if self.state is None else [s.size for s in self.state]

    def _require_chunks(self) -> None:
        if len(self.chunks) != self.grid_t:
            raise ValueError(f"this cache holds {len(self.chunks)} of its {self.grid_t} chunks in memory "
                             "(chunks were streamed to a sink); load it from its store to answer")

    # --- store ----------------------------------------------------------------------------------------------

    def save(self, uri: str, **opts: Any) -> dict[str, Any]:
        """Write this (in-memory, complete) cache to `uri` = `<root>/<video_id>`; see `statekv.store.save_cache`."""
        from statekv.store import save_cache

        return save_cache(self, uri, **opts)

    @classmethod
    def load(cls, uri: str, **opts: Any) -> "VideoKVCache":
        """Load a committed cache (lazily by default); see `statekv.store.load_cache`."""
        from statekv.store import load_cache

        return load_cache(uri, **opts)
