"""What transformers' own Qwen3-VL processor and model make of sampled frames + a question, without torchvision.

The reference the Qwen3-VL adapter is judged against. It runs the real `Qwen3VLProcessor.__call__` (placeholder
expansion into `<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` per frame pair, tokenisation,
`mm_token_type_ids`) and the real `Qwen3VLVideoProcessor` (size choice, fused rescale + normalise, padding,
patchify, grids). Only its two torchvision kernels are swapped for torch ones: the antialiased bicubic resize
(`statekv.video.resize_frames`, checked against torchvision's algorithm in tests/statekv/test_video_preprocess.py)
and `normalize` ((x - mean) / std, as torchvision's). Then ONE forward of the plain
`Qwen3VLForConditionalGeneration` over the whole sequence, the model computing its own 3-D positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _video_processor_class():
    """`Qwen3VLVideoProcessor` on torch kernels, built lazily: importing transformers' processors is slow."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from statekv.video import resize_frames

    class TorchKernels(TorchvisionBackend):
        """torchvision's resize and normalize on plain torch; sits just above the backend in the MRO."""

        def resize(self, image, size, resample=None, antialias=True, **kwargs):  # noqa: ARG002 (bicubic only)
            lead = image.shape[:-3]
            flat = image.reshape(-1, *image.shape[-3:])  # (n, C, H, W) uint8
            out = resize_frames(flat.permute(0, 2, 3, 1), size.height, size.width)
            return out.reshape(*lead, *out.shape[1:])

        def normalize(self, image, mean, std, inplace=False, **kwargs):  # noqa: ARG002
            mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
            return image.sub(mean).div(std)

    class ReferenceVideoProcessor(Qwen3VLVideoProcessor, TorchKernels):
        """`Qwen3VLVideoProcessor` with torch kernels: MRO Qwen3VL -> BaseVideoProcessor -> TorchKernels -> backend."""

    return ReferenceVideoProcessor


def load_reference_processor(checkpoint: str | os.PathLike):
    """The checkpoint's own tokenizer, chat template and (video) processor configs, as a `Qwen3VLProcessor`."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from statekv.models.processor_text import text_only

    # the class check of `Qwen3VLProcessor` wants torchvision's video processor: `text_only` skips it
    return text_only(Qwen3VLProcessor, AutoTokenizer.from_pretrained(checkpoint),
                     image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint),
                     video_processor=_video_processor_class().from_pretrained(checkpoint))


def video_messages(question: str) -> list[dict[str, Any]]:
    """One user turn: the video, then the question (the layout the engine's chat prefix assumes)."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


@dataclass
class ReferenceInputs:
    """What the processor gives for one video + question (batch of one), plus the prompt's length."""

    input_ids: torch.Tensor  # (1, L)
    mm_token_type_ids: torch.Tensor  # (1, L): 0 text, 2 video
    pixel_values_videos: torch.Tensor  # (patches, 3·tp·ps²)
    video_grid_thw: torch.Tensor  # (1, 3)
    prompt_len: int  # tokens before any appended answer tokens
    patch_size: int = 16

    @property
    def frame_size(self) -> tuple[int, int]:
        """The (height, width) the processor resized the frames to."""
        _, grid_h, grid_w = self.video_grid_thw[0].tolist()
        return grid_h * self.patch_size, grid_w * self.patch_size

    def as_model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids),
                "mm_token_type_ids": self.mm_token_type_ids, "pixel_values_videos": self.pixel_values_videos,
                "video_grid_thw": self.video_grid_thw}

    def with_answer(self, answer_ids: list[int]) -> "ReferenceInputs":
        """The same sequence followed by generated (text) tokens."""
        extra = torch.tensor([answer_ids], dtype=self.input_ids.dtype)
        return ReferenceInputs(torch.cat([self.input_ids, extra], 1),
                               torch.cat([self.mm_token_type_ids, torch.zeros_like(extra)], 1),
                               self.pixel_values_videos, self.video_grid_thw, self.prompt_len, self.patch_size)


def chat_text(processor, question: str, layout: str = "prefix-first",
              template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat template's text for [video, question]; "video-first" moves the text before the video block after it
    (the StateKV paper's layout: the sequence opens with the video). `template_kwargs` reach the template (e.g.
    Qwen3.5's `enable_thinking`)."""
    text = processor.apply_chat_template(video_messages(question), add_generation_prompt=True, tokenize=False,
                                         **(template_kwargs or {}))
    if layout == "prefix-first":
        return text
    if layout != "video-first":
        raise ValueError(f"unknown layout {layout!r}")
    block = processor.vision_start_token + processor.video_token + processor.vision_end_token
    before, after = text.split(block)
    return block + before + after


def processor_inputs(processor, frames: np.ndarray, frame_indices: list[int], video_fps: float,
                     question: str, *, layout: str = "prefix-first",
                     frame_size: tuple[int, int] | None = None,
                     template_kwargs: dict[str, Any] | None = None) -> ReferenceInputs:
    """Run the processor on uint8 (T, H, W, 3) frames sampled at `frame_indices` of a `video_fps` video.

    The processor picks the frame size from its config; with `frame_size` the frames are resized to it first (with
    the same kernel) and the processor's resize is skipped.
    """
    from transformers.video_utils import VideoMetadata

    from statekv.video import resize_frames

    text = chat_text(processor, question, layout, template_kwargs)
    if frame_size is None:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    else:
        video = resize_frames(frames, *frame_size)
    metadata = VideoMetadata(total_num_frames=int(max(frame_indices)) + 1, fps=float(video_fps),
                             frames_indices=[int(i) for i in frame_indices])
    cap = bool(getattr(processor.video_processor, "cap_pixels_per_frame", None))  # None (unset) means off in 5.x
    out = processor(text=[text], videos=[video], video_metadata=[metadata], do_sample_frames=False,
                    do_convert_rgb=False, do_resize=frame_size is None, cap_pixels_per_frame=cap, return_tensors="pt")
    return ReferenceInputs(out["input_ids"], out["mm_token_type_ids"], out["pixel_values_videos"],
                           out["video_grid_thw"], int(out["input_ids"].shape[1]), processor.video_processor.patch_size)


def load_reference_model(checkpoint: str | os.PathLike):
    """The plain model (Qwen3-VL or Qwen3-VL-MoE, by its config) with transformers' own SDPA attention, float32."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    moe = AutoConfig.from_pretrained(checkpoint).model_type == "qwen3_vl_moe"
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    return cls.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()


@dataclass
class ReferenceOutput:
    logits: torch.Tensor  # (L, V) float32
    keys: list[torch.Tensor]  # per layer (Hkv, L, D), after RoPE, as the cache holds them
    values: list[torch.Tensor]
    position_ids: torch.Tensor  # (3, L) as the model computed them


@torch.inference_mode()
def reference_forward(model, inputs: ReferenceInputs) -> ReferenceOutput:
    """ONE forward over the whole sequence; the model computes its own positions (`get_rope_index`)."""
    model.model.rope_deltas = None  # the model caches these between calls
    out = model(input_ids=inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
                pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw,
                use_cache=True)
    positions, _ = model.model.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids,
                                              video_grid_thw=inputs.video_grid_thw)
    cache = out.cache
    return ReferenceOutput(out.logits[0].float(), [layer.keys[0] for layer in cache.layers],
                           [layer.values[0] for layer in cache.layers], positions[:, 0])
