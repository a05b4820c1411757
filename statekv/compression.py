"""Write-time compression of the stored chunk KV: StreamKV's guidance-prompt scoring (`Guided`).

After each prefill step the engine runs a fixed guidance prompt (e.g. "What is happening in this video?") as if it
were a question asked right after the step: its tokens, at the positions a question would have there, attend to
[prefix | carried state | this step] at every attention layer, through the engine's own attention function (its
`statekv_scores` per-key attention mass, the same mechanism StateKV's policy uses). Each of the step's chunks then
keeps, per attention layer, its `keep` fraction of tokens with the most attention mass from the guidance prompt
(summed over the prompt's tokens, query heads and KV heads: one decision per layer, the same tokens for every KV
head, so a layer's stored keys, values and positions stay one (Hkv, m, D) block per chunk). Kept tokens stay in
their original order, with their original (already rotated) keys and positions.

What compression changes and what not:
- only what is stored for answering (the chunk rows a sink, the store and `VideoKVCache.chunks` get);
- NOT the carried state: the policy of the next step sees the step's full KV, exactly as without compression,
  so the prefill itself (and resuming it) is unchanged; a linear-attention layer of a hybrid model has no KV and is
  never compressed (its exact state is carried as always);
- chunk boundaries, frames and timestamps: each chunk stays one chunk (evidence time ranges stay per chunk), and
  retrieval's summary key of a chunk is the mean of its kept keys.

`keep=1.0` stores every token: the result equals an uncompressed cache. The cost is one extra forward of the
prompt's few tokens per step (over the step's context, which is bounded by the carried state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from statekv.cache import ChunkKV

DEFAULT_PROMPT = "What is happening in this video?"


@dataclass(frozen=True)
class Guided:
    """StreamKV's guidance-prompt compression: keep the `keep` fraction (StreamKV's published ratio: 0.6) of every
    chunk's tokens per attention layer that the guidance `prompt` attends to most."""

    prompt: str = DEFAULT_PROMPT
    keep: float = 0.6
    name: ClassVar[str] = "guided"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the guidance prompt must be a non-empty string")

    def settings(self) -> dict[str, Any]:
        """Recorded in the cache's prefill config (a resume with other settings is refused)."""
        return {"name": self.name, "prompt": self.prompt, "keep": float(self.keep)}

    def kept_count(self, tokens: int) -> int:
        """Tokens a chunk of `tokens` keeps: ceil(keep · tokens), at least 1."""
        return min(tokens, max(1, math.ceil(self.keep * tokens - 1e-9)))


COMPRESSIONS: dict[str, type[Guided]] = {"guided": Guided}


def make_compression(settings: dict[str, Any] | None) -> Guided | None:
    """A compression from its recorded settings ({"name": "guided", ...}); None passes through."""
    if settings is None:
        return None
    settings = dict(settings)
    name = settings.pop("name", None)
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; valid: {', '.join(COMPRESSIONS)}")
    return COMPRESSIONS[name](**settings)


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending int64 indices of the `count` highest of `scores` (n,) (ties: the earlier token)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def kept_tokens(compression: Guided, layer_scores: dict[int, torch.Tensor], chunk_tokens: Sequence[int],
                num_layers: int) -> list[list[torch.Tensor | None]]:
    """Per chunk of a step, per layer, the kept token indices (None at layers without scores: linear ones).

    layer_scores: per attention layer the (Hkv, n) guidance attention mass on the step's n tokens (chunks in order).
    """
    out: list[list[torch.Tensor | None]] = []
    lo = 0
    for tokens in chunk_tokens:
        count = compression.kept_count(tokens)
        out.append([None if layer not in layer_scores else
                    top_tokens(layer_scores[layer][:, lo:lo + tokens].float().sum(dim=0), count)
                    for layer in range(num_layers)])
        lo += tokens
    return out


def guidance_scores(compression: Guided, adapter: Any, context: list[tuple[torch.Tensor, torch.Tensor] | None],
                    recurrent: dict[int, Any], cursor: dict[str, Any], *, step_tokens: int, layout: str,
                    backend: str, build_cache: Callable[..., Any]) -> dict[int, torch.Tensor]:
    """Per attention layer the (Hkv, step_tokens) attention mass the guidance prompt puts on the step's tokens.

    context: per layer the (1, Hkv, S, D) keys and values of [prefix | carried state | this step] (None at linear
    layers); recurrent: the linear layers' states after the step; cursor: the adapter's cursor after the step.
    `build_cache` (the engine's) makes a fresh transformers cache of them, so nothing the engine holds is changed.
    """
    prompt = adapter.answer_inputs(compression.prompt, cursor, layout)
    dyn = build_cache(adapter.model.config, context, recurrent)
    scores: dict[int, torch.Tensor] = {}
    adapter.decode(prompt.embeds, prompt.position_ids, dyn, statekv_scores=scores, statekv_backend=backend,
                   **adapter.decoder_kwargs(cursor))
    out = {}
    for layer, kv in enumerate(context):
        if kv is not None:
            end = kv[0].shape[2]  # keys after the context are the prompt's own
            out[layer] = scores[layer][0, :, end - step_tokens:end]  # (Hkv, step_tokens)
    return out


def compress_step(compression: Guided, adapter: Any, context: list[tuple[torch.Tensor, torch.Tensor] | None],
                  recurrent: dict[int, Any], cursor: dict[str, Any], chunk_tokens: Sequence[int], *, layout: str,
                  backend: str, build_cache: Callable[..., Any]) -> list[list[torch.Tensor | None]]:
    """The engine's hook after a prefill step: per chunk of the step, per layer, the kept token indices."""
    scores = guidance_scores(compression, adapter, context, recurrent, cursor, step_tokens=sum(chunk_tokens),
                             layout=layout, backend=backend, build_cache=build_cache)
    return kept_tokens(compression, scores, chunk_tokens, len(context))


def keep_tokens(chunk: ChunkKV, kept: list[torch.Tensor | None]) -> ChunkKV:
    """`chunk` storing at each layer only its `kept` tokens' K/V (layers with None: unchanged)."""
    keys = [k if k is None or i is None else k[:, i.to(k.device)].contiguous() for k, i in zip(chunk.keys, kept)]
    values = [v if v is None or i is None else v[:, i.to(v.device)].contiguous() for v, i in zip(chunk.values, kept)]
    return ChunkKV(index=chunk.index, frame_range=chunk.frame_range, source_frames=chunk.source_frames,
                   timestamps=chunk.timestamps, position_ids=chunk.position_ids, keys=keys, values=values,
                   kept=[None if i is None else i.cpu() for i in kept])
