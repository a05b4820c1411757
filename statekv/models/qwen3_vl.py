"""Qwen3-VL: two-frame temporal patches, each its own timestamped block, and DeepStack features in early layers.

Token layout, taken from the installed transformers' own `Qwen3VLProcessor` (not copied from it): every temporal
patch (= one chunk, 2 sampled frames) is the processor's `replace_video_token` text for that patch alone —
`<{t:.1f} seconds><|vision_start|><|video_pad|>·n<|vision_end|>` with t the mean time of its two frames (an odd
last frame paired with itself) — and the text around the video is what the processor's
`get_text_with_replacements` leaves of the chat template when the video is put in. In transformers 5.25 (the
trained layout: Qwen's release, transformers 4.57) the per-patch blocks REPLACE the template's whole
`<|vision_start|><|video_pad|><|vision_end|>`, so the prefix ends with the user header and the question follows the
last block's `<|vision_end|>` directly. (5.23-5.24 kept a doubled outer pair around all blocks: a regression that
statekv once copied; caches built on it carry layout version 1 and are refused, see `layout_version`.) Because the
text comes from the processor, an upstream layout change either moves statekv with it or fails the family tests
(tests/statekv/test_family_qwen3_vl.py compares every token with the processor's whole-video output); it never
silently changes answers of stored caches, which record the layout version they were built on.

What cannot come from the processor: the positions. They are the model's rule (`Qwen3VLModel.get_rope_index`),
not the processor's: text tokens advance one position each on all three rows; a temporal patch's visual tokens
starting at p put merged cell (h, w) at (T, H, W) = (p, p + h, p + w) and the next token at p + max(h_cells,
w_cells). The cursor carries only that next position, so chunks (and resumed streams) continue exactly where the
whole-sequence computation would be (tested against `get_rope_index`).

DeepStack: the vision tower also returns merged features of some of its layers; the decoder adds the i-th to the
hidden states of the visual tokens after text layer i. They are passed per chunk as decoder kwargs
(`visual_pos_masks`, `deepstack_visual_embeds`), so they reach exactly the chunk's own visual tokens.

Preprocessing follows the checkpoint's `video_preprocessor_config.json` (`Qwen3VLVideoProcessor`): mean/std,
patch 16, merge 2; its `size` is a budget of pixels over the whole video (T·H·W), so the frame size depends on the
number of sampled frames (transformers' own `smart_resize` is used for it). Pixels are statekv's own
(statekv/video/preprocess.py): the video processor's kernels need torchvision.

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

import functools
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor

from statekv.models.base import NATURAL, SIZE, AnswerInputs, ChunkInputs, CursorField, VideoLMAdapter, \
    next_position_problem
from statekv.models.processor_text import around_video, text_only
from statekv.video.preprocess import VisionLayout, preprocess_frames

# Qwen3VLVideoProcessor's class defaults, used only when a checkpoint ships no preprocessor config
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
DEFAULT_MIN_PIXELS = 128 * 32 * 32  # over the whole video
DEFAULT_MAX_PIXELS = 768 * 32 * 32
DEFAULT_MAX_VIDEO_TOKENS = 768  # per frame, with cap_pixels_per_frame


def text_processor(tokenizer: Any, vision: VisionLayout) -> Qwen3VLProcessor:
    """The installed `Qwen3VLProcessor` over `tokenizer`, text side only, whose video processor has the checkpoint's
    patch and merge sizes (all its text expansion reads of it)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                  merge_size=vision.merge_size)
    return text_only(Qwen3VLProcessor, tokenizer, video_processor=video)


class Qwen3VLAdapter(VideoLMAdapter):
    model_type = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    frames_per_chunk: ClassVar[int] = 2
    position_rows: ClassVar[int] = 3
    # 2: the per-patch blocks replace the template's video wrapper (the trained layout, transformers 5.25);
    # 1: statekv < 0.3 kept the wrapper around all blocks (transformers 5.23-5.24). See the module docstring.
    layout_version: ClassVar[int] = 2
    cursor_fields: ClassVar[dict[str, CursorField]] = {"next_position": NATURAL, "frame_size": SIZE}

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str,
                 preprocessor: dict[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, name_or_path=name_or_path, preprocessor=preprocessor)
        cfg = self.config
        self.video_token_id = cfg.video_token_id
        self._patch_cache: dict[tuple[tuple[float, ...], int], tuple[tuple[int, ...], tuple[int, ...]]] = {}
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

    def cursor_problem(self, cursor: dict[str, Any], *, prefix_len: int, num_chunks: int) -> str | None:
        return super().cursor_problem(cursor, prefix_len=prefix_len, num_chunks=num_chunks) or \
            next_position_problem(cursor, prefix_len=prefix_len, num_chunks=num_chunks)

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

    def step_features(self, frames: np.ndarray, frame_size: tuple[int, int], step_frames: int
                      ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(features, DeepStack features) of consecutive steps of `step_frames` frames (the last may have fewer)
        from one tower call: the tower attends within one temporal patch only (one `cu_seqlens` segment per patch;
        the position-embedding interpolation is the same for every patch of a grid row), so the frames of several
        steps are one grid row of t = all their patches; only the last step may be odd."""
        tp = self.vision.temporal_patch_size
        if step_frames % tp:
            raise ValueError(f"steps of {step_frames} frames split a temporal patch of {tp}")
        features, deepstack = self.video_features(frames, frame_size, deepstack=True)
        per_patch = features.shape[0] // -(-len(frames) // tp)  # merged tokens of one temporal patch
        sizes = [-(-min(step_frames, len(frames) - s) // tp) * per_patch for s in range(0, len(frames), step_frames)]
        layers = [d.split(sizes) for d in deepstack]
        return [(f, [d[i] for d in layers]) for i, f in enumerate(features.split(sizes))]

    # --- the token layout, from the installed processor ------------------------------------------------------

    @functools.cached_property
    def processor(self) -> Qwen3VLProcessor:
        """The installed transformers' processor, text side (see `text_processor`)."""
        return text_processor(self.tokenizer, self.vision)

    @functools.cached_property
    def _wrapper_kept(self) -> tuple[int, int]:
        """Tokens of the template's video wrapper that the processor keeps (before, after) the video's blocks:
        (0, 0) in the trained layout (the blocks replace the wrapper)."""
        wrapper = self.processor.vision_start_token + self.processor.video_token + self.processor.vision_end_token
        before, after = around_video(self.processor, wrapper)
        return len(self.text_ids(before)), len(self.text_ids(after))

    @property
    def video_open_tokens(self) -> int:  # type: ignore[override]
        return self._wrapper_kept[0]

    @property
    def video_close_tokens(self) -> int:  # type: ignore[override]
        return self._wrapper_kept[1]

    def patch_ids(self, times: tuple[float, ...], cells: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ids before, ids after) the `cells` visual tokens of one temporal patch whose frames are at `times`
        (seconds): the processor's own replacement text for a video of that one patch (`replace_video_token`: its
        timestamp is the processor's mean of the frames' times, an odd last frame paired with itself), tokenised.
        Kept per (times, cells): a chunk asks for it once."""
        key = (tuple(times), cells)
        if key not in self._patch_cache:
            from transformers.video_utils import VideoMetadata

            m = self.vision.merge_size
            # one temporal patch of a 1 x cells merged grid; the frames "indexed" by their times at fps 1, so the
            # processor's timestamp of frame i is times[i]
            inputs = {"video_grid_thw": torch.tensor([[1, m, m * cells]]),
                      "video_metadata": [VideoMetadata(total_num_frames=len(times), fps=1.0,
                                                       frames_indices=list(times))]}
            ids = self.text_ids(self.processor.replace_video_token(inputs, 0))
            pads = [i for i, t in enumerate(ids) if t == self.video_token_id]
            if len(pads) != cells or pads[-1] - pads[0] + 1 != cells:
                raise ValueError(f"model {self.name_or_path!r}: the processor's text for one temporal patch holds "
                                 f"{len(pads)} video tokens, not one run of {cells}")
            if len(self._patch_cache) >= 4096:  # a long stream's timestamps: keep the memory bounded
                self._patch_cache.clear()
            self._patch_cache[key] = (tuple(ids[:pads[0]]), tuple(ids[pads[-1] + 1:]))
        return self._patch_cache[key]

    # --- chunks ------------------------------------------------------------------------------------------------

    def chunk_inputs(self, frames: np.ndarray, cursor: dict[str, Any], *, timestamps: list[float] | None = None,
                     features: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> ChunkInputs:
        if timestamps is None or len(timestamps) != len(frames):
            raise ValueError(f"Qwen3-VL chunks need one timestamp per frame ({len(frames)} frames, "
                             f"timestamps {timestamps!r})")
        # given by step_features, or from video_features (the only way into the tower)
        features, deepstack = (self.video_features(frames, cursor["frame_size"], deepstack=True) if features is None
                               else features)
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
            opening, closing = self.patch_ids(tuple(timestamps[j * tp:j * tp + count]), n)
            embeds += [self.embed(torch.tensor(opening, dtype=torch.long)), features[j * n:(j + 1) * n],
                       self.embed(torch.tensor(closing, dtype=torch.long))]
            positions += [self.text_positions(pos, len(opening)), cells + pos + len(opening)]
            pos += len(opening) + max(h, w)
            positions.append(self.text_positions(pos, len(closing)))
            pos += len(closing)
            visual += [torch.zeros(len(opening), dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                       torch.zeros(len(closing), dtype=torch.bool)]
            chunk_tokens.append(len(opening) + n + len(closing))
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
        ids = self.question_ids(question, layout)
        start = cursor["next_position"]
        return AnswerInputs(prompt_ids=ids, embeds=self.embed(ids), position_ids=self.text_positions(start, len(ids)),
                            next_position=start + len(ids))

class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B): the same processor, vision tower, positions and DeepStack; only the
    text layers' MLPs are mixtures of experts, which changes nothing the engine sees."""

    model_type = "qwen3_vl_moe"
    model_class = Qwen3VLMoeForConditionalGeneration
