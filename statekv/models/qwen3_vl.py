"""Qwen3-VL: two-frame temporal patches, each its own timestamped block, and DeepStack features in early layers.

Token layout (what `Qwen3VLProcessor` makes of the template's `<|vision_start|><|video_pad|><|vision_end|>`):
the template's outer `<|vision_start|>` ends the prefix, then every temporal patch (= one chunk, 2 sampled frames)
is `<{t:.1f} seconds><|vision_start|><|video_pad|>·n<|vision_end|>` with t the mean time of its two frames (an
odd last frame is paired with itself), then the template's outer `<|vision_end|>` opens what follows the video.
The timestamp text and the inner start/end tokens are part of the chunk's tokens (and KV).

Positions (`Qwen3VLModel.get_rope_index`): text tokens advance one position each on all three rows; a temporal
patch starting at p puts merged cell (h, w) at (T, H, W) = (p, p + h, p + w) and the next token at
p + max(h_cells, w_cells). The cursor carries only that next position, so chunks (and resumed streams) continue
exactly where the whole-sequence computation would be.

DeepStack: the vision tower also returns merged features of some of its layers; the decoder adds the i-th to the
hidden states of the visual tokens after text layer i. They are passed per chunk as decoder kwargs
(`visual_pos_masks`, `deepstack_visual_embeds`), so they reach exactly the chunk's own visual tokens.

Preprocessing follows the checkpoint's `video_preprocessor_config.json` (`Qwen3VLVideoProcessor`): mean/std,
patch 16, merge 2; its `size` is a budget of pixels over the whole video (T·H·W), so the frame size depends on the
number of sampled frames (transformers' own `smart_resize` is used for it).

The timestamps are the frames' times in the video (source index / source fps), which the engine passes with
each chunk. The cursor: {"next_position", "frame_size"}.

Where it can differ from the processor: the frame size is chosen once, for the frames of the first prefill; a
resumed stream keeps it, while the processor on the whole (longer) video could pick a smaller size when the
pixel budget binds. `SamplingConfig.min_pixels` / `max_pixels` are per-frame bounds (the engine's meaning for
every family), not the processor's whole-video `size`. Which frames are sampled is the engine's rule
(`statekv.video.sample_frames`), not `Qwen3VLVideoProcessor.sample_frames`; given the same frames the sequence
is the processor's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from statekv.models.base import AnswerInputs, ChunkInputs, VideoLMAdapter
from statekv.video.preprocess import VisionLayout, preprocess_frames

# Qwen3VLVideoProcessor's class defaults, used only when a checkpoint ships no preprocessor config
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
DEFAULT_MIN_PIXELS = 128 * 32 * 32  # over the whole video
DEFAULT_MAX_PIXELS = 768 * 32 * 32
DEFAULT_MAX_VIDEO_TOKENS = 768  # per frame, with cap_pixels_per_frame


class Qwen3VLAdapter(VideoLMAdapter):
    model_type = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    frames_per_chunk: ClassVar[int] = 2
    position_rows: ClassVar[int] = 3
    video_open_tokens: ClassVar[int] = 1  # the template's outer <|vision_start|>
    video_close_tokens: ClassVar[int] = 1  # the template's outer <|vision_end|>

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str,
                 preprocessor: dict[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, name_or_path=name_or_path, preprocessor=preprocessor)
        cfg = self.config
        self.video_token_id = cfg.video_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id
        vision, p = cfg.vision_config, self.preprocessor
        self.vision = VisionLayout(
            patch_size=int(p.get("patch_size", vision.patch_size)),
            temporal_patch_size=int(p.get("temporal_patch_size", vision.temporal_patch_size)),
            merge_size=int(p.get("merge_size", vision.spatial_merge_size)),
            image_mean=tuple(float(x) for x in p.get("image_mean", DEFAULT_MEAN_STD)),
            image_std=tuple(float(x) for x in p.get("image_std", DEFAULT_MEAN_STD)),
        )
        if self.vision.temporal_patch_size != self.frames_per_chunk:
            raise ValueError(f"model {name_or_path!r}: temporal_patch_size {self.vision.temporal_patch_size} "
                             f"is not supported (Qwen3-VL chunks are {self.frames_per_chunk} frames)")
        size = p.get("size") or {}
        self.min_pixels = int(size.get("shortest_edge") or DEFAULT_MIN_PIXELS)  # whole-video budgets
        self.max_pixels = int(size.get("longest_edge") or DEFAULT_MAX_PIXELS)
        # qwen-vl-utils' per-frame cap, opt-in in transformers 5.x (`cap_pixels_per_frame`)
        self.cap_pixels_per_frame = bool(p.get("cap_pixels_per_frame"))
        self.max_video_tokens = int(p.get("max_video_tokens") or DEFAULT_MAX_VIDEO_TOKENS)

    # --- video ---------------------------------------------------------------------------------------------

    def frame_size(self, height: int, width: int, sampling: Any, num_frames: int = 2) -> tuple[int, int]:
        """The processor's size for a video of `num_frames` sampled frames.

        Without per-frame bounds in `sampling` this is `Qwen3VLVideoProcessor`'s rule: the config's `size` bounds
        the pixels of all frames together. `sampling.min_pixels` / `max_pixels` bound each frame instead.
        """
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        tp, factor = self.vision.temporal_patch_size, self.vision.factor
        if sampling.min_pixels is None and sampling.max_pixels is None:
            frames, lo, hi = max(num_frames, tp), self.min_pixels, self.max_pixels
            if self.cap_pixels_per_frame:  # as Qwen3VLVideoProcessor.resize computes it
                per_frame = max(min(self.max_video_tokens * factor * factor, self.max_pixels // frames),
                                int(self.min_pixels * 1.05))
                hi = per_frame * frames
        else:  # per frame: one temporal patch against tp times the per-frame bounds is the same rule per frame
            frames = tp
            lo = tp * (sampling.min_pixels if sampling.min_pixels is not None else 1)
            hi = tp * (sampling.max_pixels if sampling.max_pixels is not None else self.max_pixels)
        return tuple(smart_resize(frames, height, width, temporal_factor=tp, factor=factor, min_pixels=lo,
                                  max_pixels=hi))

    def new_cursor(self, *, prefix_len: int, frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
        return {"next_position": prefix_len, "frame_size": list(frame_size)}

    def preprocess(self, frames: np.ndarray, frame_size: tuple[int, int]):
        """Pixels and grid as `Qwen3VLVideoProcessor` makes them for frames already known to be `frame_size`."""
        return preprocess_frames(frames, min_pixels=1, max_pixels=frame_size[0] * frame_size[1],
                                 layout=self.vision, size=tuple(frame_size))

    def video_features(self, frames: np.ndarray, frame_size: tuple[int, int], *, deepstack: bool = False):
        """Merged vision features (n, hidden) of frames; with `deepstack`, also the DeepStack features, one
        (n, hidden) per decoder layer they enter: ((n, hidden), [(n, hidden)]). The only way into the tower."""
        pre = self.preprocess(frames, frame_size)
        grid = torch.tensor([pre.grid_thw], dtype=torch.long, device=self.device)
        out = self.model.model.get_video_features(pre.pixel_values.to(self.device), grid)
        features = torch.cat(list(out.pooler_output), dim=0).to(self.dtype)
        if not deepstack:
            return features
        layers = getattr(out, "deepstack_features", None) or []  # none for a tower without DeepStack (Qwen3.5)
        return features, [torch.cat(list(d), dim=0).to(self.dtype) for d in layers]

    def timestamp_ids(self, seconds: float) -> list[int]:
        """Ids of the processor's `<{t:.1f} seconds>` text (tokenised alone: special tokens delimit it)."""
        return self.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]

    @staticmethod
    def patch_time(timestamps: list[float]) -> float:
        """Time of one temporal patch from its frames' times: the mean of the first and the last, an odd last
        frame paired with itself (`Qwen3VLProcessor._calculate_timestamps`, same order of operations)."""
        return (timestamps[0] + timestamps[-1]) / 2

    def chunk_inputs(self, frames: np.ndarray, cursor: dict[str, Any], *,
                     timestamps: list[float] | None = None) -> ChunkInputs:
        if timestamps is None or len(timestamps) != len(frames):
            raise ValueError(f"Qwen3-VL chunks need one timestamp per frame ({len(frames)} frames, "
                             f"timestamps {timestamps!r})")
        features, deepstack = self.video_features(frames, cursor["frame_size"], deepstack=True)
        m, tp = self.vision.merge_size, self.vision.temporal_patch_size
        grid_t = -(-len(frames) // tp)  # an odd last frame is padded by repeating it (as the processor does)
        h, w = (s // (self.vision.patch_size * m) for s in cursor["frame_size"])
        n = h * w  # visual tokens per temporal patch
        cells = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(h), torch.arange(w),
                                           indexing="ij")).reshape(3, -1)  # (3, n): (0, h, w)
        embeds, positions, visual, chunk_tokens, chunk_frames = [], [], [], [], []
        pos = cursor["next_position"]
        for j in range(grid_t):
            count = min(tp, len(frames) - j * tp)
            opening = self.timestamp_ids(self.patch_time(timestamps[j * tp:j * tp + count]))
            opening = torch.tensor(opening + [self.vision_start_id], dtype=torch.long)
            embeds += [self.embed(opening), features[j * n:(j + 1) * n],
                       self.embed(torch.tensor([self.vision_end_id]))]
            positions += [self.text_positions(pos, len(opening)), cells + pos + len(opening)]
            pos += len(opening) + max(h, w)
            positions.append(self.text_positions(pos, 1))  # <|vision_end|>
            pos += 1
            visual += [torch.zeros(len(opening), dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                       torch.zeros(1, dtype=torch.bool)]
            chunk_tokens.append(len(opening) + n + 1)
            chunk_frames.append(count)
        mask = torch.cat(visual).to(self.device)
        decoder_kwargs = ({"visual_pos_masks": mask.unsqueeze(0), "deepstack_visual_embeds": deepstack}
                          if deepstack else {})  # a family without DeepStack (Qwen3.5) gets none
        new = dict(cursor, next_position=pos)
        return ChunkInputs(embeds=torch.cat(embeds), position_ids=torch.cat(positions, dim=1),
                           chunk_tokens=chunk_tokens, chunk_frames=chunk_frames, cursor=new,
                           decoder_kwargs=decoder_kwargs)

    # --- after the video -------------------------------------------------------------------------------------

    def answer_inputs(self, question: str, cursor: dict[str, Any], layout: str) -> AnswerInputs:
        ids = self.question_ids(question, layout)  # starts with the outer <|vision_end|>
        start = cursor["next_position"]
        return AnswerInputs(prompt_ids=ids, embeds=self.embed(ids), position_ids=self.text_positions(start, len(ids)),
                            next_position=start + len(ids))

    # --- the plain model's inputs for the same sequence --------------------------------------------------------

    def reference_inputs(self, frames: np.ndarray, question: str, layout: str, frame_size: tuple[int, int],
                         sampled_fps: float) -> dict[str, Any]:
        """What transformers' own `Qwen3VLProcessor` gives for these frames at `frame_size` (frames taken as
        sampled at `sampled_fps`; see statekv.testing.qwen3_vl_reference)."""
        from statekv.testing.qwen3_vl_reference import load_reference_processor, processor_inputs

        processor = load_reference_processor(self.name_or_path)
        return processor_inputs(processor, frames, list(range(len(frames))), sampled_fps, question, layout=layout,
                                frame_size=tuple(frame_size),
                                template_kwargs=self.template_kwargs()).as_model_inputs()


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B): the same processor, vision tower, positions and DeepStack; only the
    text layers' MLPs are mixtures of experts, which changes nothing the engine sees."""

    model_type = "qwen3_vl_moe"
    model_class = Qwen3VLMoeForConditionalGeneration
