"""The interface the streaming engine uses to drive a video VLM, and the parts Qwen-style families share.

An adapter owns one loaded model and its tokenizer and answers five questions for the engine: the vision
features of one chunk, token embeddings, the 3-D positions of text and video tokens, one pass of the decoder
stack over a given KV cache, and the token ids before and after the video in the chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

logger = logging.getLogger(__name__)

ATTENTION_NAME = "statekv"  # the name our attention function is registered under in transformers


@dataclass(frozen=True)
class KVLayout:
    """Shape of one layer's KV: what a cache must match to be used with this model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class VideoLMAdapter:
    """One loaded video VLM, seen through the operations streaming prefill and answering need."""

    model_type: ClassVar[str]
    model_class: ClassVar[type]

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.config = model.config
        text = self.config.text_config
        self.layout = KVLayout(
            num_layers=text.num_hidden_layers,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )
        vision = self.config.vision_config
        self.patch_size: int = vision.patch_size
        self.temporal_patch_size: int = vision.temporal_patch_size
        self.merge_size: int = vision.spatial_merge_size
        self.video_token_id: int = self.config.video_token_id
        self.eos_token_ids: set[int] = _eos_ids(model, tokenizer)
        self.prefix_ids, self._video_marker = self._split_template()

    # --- identity ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def fingerprint(self) -> str:
        """A hash of the model's config: caches made by one model must not be answered by another."""
        cfg = self.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                    "_attn_implementation_internal", "architectures"):
            _drop_key(cfg, key)
        blob = json.dumps(cfg, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- vision --------------------------------------------------------------------------------------------

    def video_features(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """Merged vision features (t·h·w / merge², hidden) of one chunk of temporal patches."""
        grid = torch.tensor([grid_thw], dtype=torch.long, device=self.device)
        out = self.model.model.get_video_features(pixel_values.to(self.device), grid)
        return torch.cat(list(out.pooler_output), dim=0).to(self.dtype)

    def tokens_per_temporal_patch(self, grid_h: int, grid_w: int) -> int:
        return grid_h * grid_w // self.merge_size**2

    # --- positions (the original Qwen M-RoPE rule; see DESIGN.md) -------------------------------------------

    def temporal_offset(self, t: int, second_per_grid_t: float) -> int:
        """Temporal position of temporal patch `t`, relative to the start of the video block."""
        raise NotImplementedError

    def video_positions(self, start: int, t_range: range, grid_h: int, grid_w: int,
                        second_per_grid_t: float) -> torch.Tensor:
        """3-D positions (3, len(t_range)·h·w/merge²) of video tokens of temporal patches `t_range`.

        The video block starts at `start`; temporal patch t sits at T = start + temporal_offset(t), and
        merged-grid cell (h, w) at H = start + h, W = start + w.
        """
        h, w = grid_h // self.merge_size, grid_w // self.merge_size
        t = torch.tensor([self.temporal_offset(i, second_per_grid_t) for i in t_range], dtype=torch.long)
        tt = t.view(-1, 1, 1).expand(-1, h, w)
        hh = torch.arange(h).view(1, -1, 1).expand(len(t_range), -1, w)
        ww = torch.arange(w).view(1, 1, -1).expand(len(t_range), h, -1)
        return torch.stack([tt, hh, ww]).reshape(3, -1) + start

    @staticmethod
    def text_positions(start: int, length: int) -> torch.Tensor:
        """Text tokens: the same position on all three axes."""
        return torch.arange(start, start + length, dtype=torch.long).view(1, -1).expand(3, -1)

    # --- decoder -------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (L, hidden) of ids (L,)."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any, **attention_kwargs: Any
               ) -> torch.Tensor:
        """Run the decoder stack on embeds (L, hidden) at positions (3, L), extending `cache` in place.

        Returns the final normed hidden states (L, hidden). `attention_kwargs` reach our attention function.
        """
        out = self.model.model.language_model(
            inputs_embeds=embeds.unsqueeze(0),
            position_ids=position_ids.to(self.device).unsqueeze(1),  # (3, 1, L)
            past_key_values=cache,
            use_cache=True,
            **attention_kwargs,
        )
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    # --- chat template ----------------------------------------------------------------------------------------

    def _render(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5.x
            ids = ids["input_ids"]
        return list(ids)

    def _split_template(self) -> tuple[torch.Tensor, int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.name_or_path!r}: the tokenizer has no chat template")
        ids = self._render("?")
        if self.video_token_id not in ids:
            raise ValueError(f"model {self.name_or_path!r}: the chat template places no video token "
                             f"(id {self.video_token_id}) for a video part")
        first = ids.index(self.video_token_id)
        return torch.tensor(ids[:first], dtype=torch.long), first

    def question_ids(self, question: str) -> torch.Tensor:
        """Token ids that follow the video: the rest of the user turn with the question, then the answer header."""
        ids = self._render(question)
        first = ids.index(self.video_token_id)
        if ids[:first] != self.prefix_ids.tolist():
            raise ValueError("the chat template's text before the video depends on the question; "
                             "a stored video prefix cannot be reused with it")
        last = len(ids) - 1 - ids[::-1].index(self.video_token_id)
        return torch.tensor(ids[last + 1:], dtype=torch.long)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.text_config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def _drop_key(tree: Any, key: str) -> None:
    if isinstance(tree, dict):
        tree.pop(key, None)
        for value in tree.values():
            _drop_key(value, key)
