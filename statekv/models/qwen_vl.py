"""What Qwen2-VL and Qwen2.5-VL share: two-frame temporal patches, 3-D M-RoPE, a merged patch grid.

A chunk is one temporal patch (`temporal_patch_size` = 2 sampled frames) = (H/28)·(W/28) video pad tokens, no
per-frame text. The video block in the chat template is `<|vision_start|><|video_pad|><|vision_end|>`; the
processor expands the pad into grid_t·grid_h·grid_w / merge² pads.

Positions follow the transformers model's own `get_rope_index` (the issue's standard: `Full()` must equal one
forward of the plain model): the video block starting at s puts temporal patch t at T = s + ⌊t · interval⌋
(interval computed in float32 as the model does: 1 for Qwen2-VL, tokens_per_second · second_per_grid_t for
Qwen2.5-VL), merged cell (h, w) at H = s + h, W = s + w. Text after the video starts at
`s + max(grid_h, grid_w) / merge` (transformers >= 5.x; the video's length does not move it, so with long videos
later text shares positions with the video's temporal axis). The original Qwen rule (text after the video at
max(all positions) + 1, what transformers 4.x and the Qwen release computed) is `position_rule="qwen"`.

Token layout: the installed processor's (`Qwen2VLProcessor` / `Qwen2_5_VLProcessor`, text side): it replaces only
the template's `<|video_pad|>` (`replace_video_token`: one pad per merged cell), keeping `<|vision_start|>` and
`<|vision_end|>` around the video; a chunk is pads only, no text. The text around the video and the reference
sequence come from the processor (statekv/models/processor_text.py), so an upstream change of it fails the family
tests instead of changing answers.

The cursor: {"video_start", "grid_t" (temporal patches so far), "grid_hw" (patch grid of a frame),
"second_per_grid_t", "max_position", "frame_size", "position_rule"}.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch

from statekv.models.base import (INT, NATURAL, POSITIVE, SIZE, AnswerInputs, ChunkInputs, CursorField,
                                 VideoLMAdapter, is_count)
from statekv.models.processor_text import text_only
from statekv.video.preprocess import IMAGE_MEAN, IMAGE_STD, VisionLayout, preprocess_frames, smart_resize

logger = logging.getLogger(__name__)

POSITION_RULES = ("transformers", "qwen")
# Qwen2VLVideoProcessor's defaults, used only when a checkpoint ships no preprocessor config
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28


class QwenVLAdapter(VideoLMAdapter):
    """Qwen2-VL-style video: chunks of one temporal patch, 3-row positions. Subclasses set the temporal interval."""

    frames_per_chunk: ClassVar[int] = 2
    position_rows: ClassVar[int] = 3
    video_open_tokens: ClassVar[int] = 1  # <|vision_start|>
    video_close_tokens: ClassVar[int] = 1  # <|vision_end|>
    processor_class: ClassVar[type]  # the family's transformers processor
    cursor_fields: ClassVar[dict[str, CursorField]] = {
        "video_start": NATURAL, "grid_t": NATURAL, "grid_hw": SIZE, "second_per_grid_t": POSITIVE,
        "max_position": INT, "frame_size": SIZE, "position_rule": CursorField(
            f"one of {', '.join(POSITION_RULES)}", lambda v: v in POSITION_RULES)}

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str, preprocessor: dict[str, Any] | None = None,
                 position_rule: str = "transformers") -> None:
        super().__init__(model, tokenizer, name_or_path=name_or_path, preprocessor=preprocessor)
        if position_rule not in POSITION_RULES:
            raise ValueError(f"unknown position_rule {position_rule!r}; valid: {', '.join(POSITION_RULES)}")
        self.position_rule = position_rule
        self.video_token_id = self.config.video_token_id
        vision = self.config.vision_config
        p = self.preprocessor
        size = p.get("size") or {}
        self.vision = VisionLayout(
            patch_size=int(p.get("patch_size", vision.patch_size)),
            temporal_patch_size=int(p.get("temporal_patch_size", vision.temporal_patch_size)),
            merge_size=int(p.get("merge_size", vision.spatial_merge_size)),
            image_mean=tuple(float(x) for x in p.get("image_mean", IMAGE_MEAN)),
            image_std=tuple(float(x) for x in p.get("image_std", IMAGE_STD)),
        )
        if self.vision.temporal_patch_size != self.frames_per_chunk:
            raise ValueError(f"model {name_or_path!r}: temporal_patch_size {self.vision.temporal_patch_size} "
                             f"is not supported (the Qwen adapters take {self.frames_per_chunk} frames per chunk)")
        self.min_pixels = int(p.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS)
        self.max_pixels = int(p.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS)

    def options(self) -> dict[str, Any]:
        return {"position_rule": self.position_rule}

    @functools.cached_property
    def processor(self) -> Any:
        """The installed processor, text side: its video processor's kernels need torchvision, and its text
        expansion reads only the merge size of it."""
        return text_only(self.processor_class, self.tokenizer,
                         video_processor=SimpleNamespace(merge_size=self.vision.merge_size))

    # --- video ---------------------------------------------------------------------------------------------

    def frame_size(self, height: int, width: int, sampling: Any, num_frames: int = 0) -> tuple[int, int]:
        """Per-frame bounds: the number of frames plays no part."""
        lo = sampling.min_pixels if sampling.min_pixels is not None else self.min_pixels
        hi = sampling.max_pixels if sampling.max_pixels is not None else self.max_pixels
        return smart_resize(height, width, factor=self.vision.factor, min_pixels=lo, max_pixels=hi)

    def new_cursor(self, *, prefix_len: int, frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
        ps = self.vision.patch_size
        return {"video_start": prefix_len, "grid_t": 0, "grid_hw": [frame_size[0] // ps, frame_size[1] // ps],
                "second_per_grid_t": self.vision.temporal_patch_size / sampled_fps,
                "max_position": prefix_len - 1, "frame_size": list(frame_size), "position_rule": self.position_rule}

    def cursor_problem(self, cursor: dict[str, Any], *, prefix_len: int, num_chunks: int) -> str | None:
        """The video block starts within the prefix's end, spans one temporal patch per chunk of a grid that the
        frame size gives, and its largest position is at or after its start."""
        problem = super().cursor_problem(cursor, prefix_len=prefix_len, num_chunks=num_chunks)
        if problem:
            return problem
        start, grid_t, hw, spgt = (cursor.get(k) for k in ("video_start", "grid_t", "grid_hw", "second_per_grid_t"))
        ps = self.vision.patch_size
        if not is_count(start, high=prefix_len):
            return f"video_start {start!r:.40} is not within the {prefix_len}-token prefix"
        if grid_t != num_chunks:
            return f"grid_t {grid_t!r:.40}, but the cache has {num_chunks} chunks"
        if hw != [s // ps for s in cursor["frame_size"]]:
            return f"grid_hw {hw!r:.40} is not the patch grid of frame_size {cursor['frame_size']}"
        if not isinstance(spgt, (int, float)) or isinstance(spgt, bool) or not 0 < spgt < float("inf"):
            return f"second_per_grid_t {spgt!r:.40} is not a positive number"
        if not is_count(cursor.get("max_position"), low=start - 1):
            return f"max_position {cursor.get('max_position')!r:.40} is before video_start {start}"
        return None

    def temporal_interval(self, second_per_grid_t: float) -> torch.Tensor:
        """Temporal positions per temporal patch, as the model computes it (a float32 scalar)."""
        raise NotImplementedError

    def _pixels(self, frames: np.ndarray, frame_size: tuple[int, int]):
        return preprocess_frames(frames, min_pixels=1, max_pixels=frame_size[0] * frame_size[1],
                                 layout=self.vision, size=tuple(frame_size))

    def _features(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        grid = torch.tensor([grid_thw], dtype=torch.long, device=self.device)
        out = self.model.model.get_video_features(pixel_values.to(self.device), grid)
        return torch.cat(list(out.pooler_output), dim=0).to(self.dtype)

    def video_features(self, frames: np.ndarray, frame_size: tuple[int, int]) -> torch.Tensor:
        pre = self._pixels(frames, frame_size)
        return self._features(pre.pixel_values, pre.grid_thw)

    def step_features(self, frames: np.ndarray, frame_size: tuple[int, int], step_frames: int) -> list[torch.Tensor]:
        """Features of consecutive steps of `step_frames` frames (the last may have fewer) from one tower call.

        The tower attends within one temporal patch only (`cu_seqlens` holds one segment per patch of each grid
        row; Qwen2.5-VL's windows too), so the frames of several steps are one grid row of t = all their patches;
        only the last step may be odd, and its last frame is paired with itself either way."""
        tp = self.vision.temporal_patch_size
        if step_frames % tp:
            raise ValueError(f"steps of {step_frames} frames split a temporal patch of {tp}")
        features = self.video_features(frames, frame_size)
        per_patch = features.shape[0] // -(-len(frames) // tp)  # merged tokens of one temporal patch
        sizes = [-(-min(step_frames, len(frames) - s) // tp) * per_patch for s in range(0, len(frames), step_frames)]
        return list(features.split(sizes))

    def video_positions(self, cursor: dict[str, Any], grid_t: int) -> torch.Tensor:
        """(3, grid_t·h·w/merge²) positions of the next `grid_t` temporal patches."""
        m = self.vision.merge_size
        h, w = cursor["grid_hw"][0] // m, cursor["grid_hw"][1] // m
        t0 = cursor["grid_t"]
        interval = self.temporal_interval(cursor["second_per_grid_t"])
        t = (torch.arange(t0, t0 + grid_t) * interval).long()  # the model's own order of operations
        tt = t.view(-1, 1, 1).expand(-1, h, w)
        hh = torch.arange(h).view(1, -1, 1).expand(grid_t, -1, w)
        ww = torch.arange(w).view(1, 1, -1).expand(grid_t, h, -1)
        return torch.stack([tt, hh, ww]).reshape(3, -1) + cursor["video_start"]

    def chunk_inputs(self, frames: np.ndarray, cursor: dict[str, Any], *, timestamps: list[float] | None = None,
                     features: torch.Tensor | None = None) -> ChunkInputs:  # positions use the sampled fps
        # (n, hidden): given by step_features, or from video_features (the only way into the tower)
        embeds = self.video_features(frames, cursor["frame_size"]) if features is None else features
        tp = self.vision.temporal_patch_size
        n_frames = len(frames)
        grid_t = -(-n_frames // tp)  # an odd last frame is padded by repeating it (as the processor does)
        if embeds.shape[0] % grid_t:
            raise ValueError(f"{embeds.shape[0]} feature rows are not the tokens of {grid_t} temporal patches")
        positions = self.video_positions(cursor, grid_t)
        chunk_frames = [min(tp, n_frames - j * tp) for j in range(grid_t)]
        new = dict(cursor, grid_t=cursor["grid_t"] + grid_t,
                   max_position=max(cursor["max_position"], int(positions.max())))
        return ChunkInputs(embeds=embeds, position_ids=positions, chunk_tokens=[embeds.shape[0] // grid_t] * grid_t,
                           chunk_frames=chunk_frames, cursor=new)

    # --- after the video -------------------------------------------------------------------------------------

    def text_start(self, cursor: dict[str, Any]) -> int:
        """Position of the first text token after the video, by the rule the cache was made with."""
        if cursor["position_rule"] == "qwen":
            return cursor["max_position"] + 1
        m = self.vision.merge_size
        return cursor["video_start"] + max(cursor["grid_hw"]) // m

    def answer_inputs(self, question: str, cursor: dict[str, Any], layout: str) -> AnswerInputs:
        ids = self.question_ids(question, layout)
        start = self.text_start(cursor)
        return AnswerInputs(prompt_ids=ids, embeds=self.embed(ids), position_ids=self.text_positions(start, len(ids)),
                            next_position=start + len(ids))

    # --- the plain model's inputs for the same sequence --------------------------------------------------------

