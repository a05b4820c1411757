"""InternVL3 / InternVL3.5 (transformers-native, model_type "internvl"): the StateKV paper's own family.

A chunk is one frame: InternViT on the 448² frame, pixel shuffle (downsample 0.5) and the MLP projector give
`image_seq_length` (256) tokens. `InternVLProcessor` expands the template's `<video>` into
`"\n".join(f"Frame{i}: <img>" + "<IMG_CONTEXT>" * k + "</img>")`, so the tokens of frame i (1-based) are
    ["\n" for i > 1] "Frame{i}: " <img> <IMG_CONTEXT>*k </img>
with the vision features in place of the `<IMG_CONTEXT>` tokens; the template's own "\n" after `<video>` starts
the text after the video. Positions are the sequence's 1-D arange (see single_frame.py).

The whole-video text (`video_text`, what the plain model is checked against) is the installed processor's own
(`InternVLProcessor.replace_video_token`). A chunk's text cannot be asked of the processor at run time: it numbers
frames over the whole video, so frame i's label would need the text of all i frames (quadratic in a stream). The
adapter writes `frame_text` itself and checks it against the installed processor when it loads (three frames): an
upstream change of the layout refuses to load in one line instead of silently changing answers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLForConditionalGeneration, InternVLProcessor

from statekv.models.processor_text import text_only
from statekv.models.single_frame import SingleFrameAdapter


class InternVLAdapter(SingleFrameAdapter):
    model_type = "internvl"
    model_class = InternVLForConditionalGeneration
    default_size = 448

    def __init__(self, model: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        tokens = {}
        for name, default in (("start_image_token", "<img>"), ("end_image_token", "</img>"),
                              ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")):
            token = getattr(tokenizer, name, None) or default
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"model {self.name_or_path!r}: the tokenizer has no {token!r} ({name})")
            tokens[name] = (token, token_id)
        self.tokens = tokens
        self.video_token_id = tokens["video_token"][1]
        self.image_token_id = self.config.image_token_id
        if tokens["context_image_token"][1] != self.image_token_id:
            raise ValueError(f"model {self.name_or_path!r}: config image_token_id {self.image_token_id} is not the "
                             f"tokenizer's {tokens['context_image_token'][0]!r}")
        vision = self.config.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
        k = int(patches * self.config.downsample_ratio**2)
        if k != self.config.image_seq_length:
            raise ValueError(f"model {self.name_or_path!r}: image_seq_length {self.config.image_seq_length} "
                             f"is not the vision tower's {k} tokens per frame")
        if tuple(self.pixels.size) != tuple(vision.image_size):
            raise ValueError(f"model {self.name_or_path!r}: preprocessor size {self.pixels.size} is not the vision "
                             f"tower's image_size {tuple(vision.image_size)}")
        self._k = k
        self._labels: dict[str, list[int]] = {}
        self.processor = text_only(InternVLProcessor, tokenizer, image_seq_length=k)
        self._check_frame_text(3)

    def _check_frame_text(self, num_frames: int) -> None:
        """ValueError unless `frame_text` + vision tokens of the first frames are the installed processor's text."""
        ours = []
        for i in range(num_frames):
            opening, closing = self.frame_text(i)
            ours += opening + [self.image_token_id] * self._k + closing
        theirs = self.text_ids(self.video_text(num_frames))
        if ours != theirs:
            raise ValueError(f"model {self.name_or_path!r}: the installed transformers' InternVLProcessor lays "
                             f"frames out as {self.tokenizer.decode(theirs[:12])!r}..., this adapter as "
                             f"{self.tokenizer.decode(ours[:12])!r}...; statekv does not support this transformers")

    @property
    def vision_tokens_per_frame(self) -> int:
        return self._k

    def frame_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype), return_dict=True)
        return out.pooler_output.to(self.dtype)  # (T, k, hidden)

    def frame_text(self, index: int) -> tuple[list[int], list[int]]:
        label = ("\n" if index else "") + f"Frame{index + 1}: "
        if label not in self._labels:  # tokenised once per frame number
            self._labels[label] = self.text_ids(label)
        return self._labels[label] + [self.tokens["start_image_token"][1]], [self.tokens["end_image_token"][1]]

    # --- the plain model's inputs ------------------------------------------------------------------------

