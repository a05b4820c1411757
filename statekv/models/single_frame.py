"""What InternVL3 and LLaVA-OneVision share: one frame per chunk at a fixed size, 1-D RoPE, long-video RoPE scaling.

Both families resize every frame to the fixed `size` of their video preprocessor config (bicubic, antialiased, as
the torchvision processors do it), rescale and normalise with that config's mean/std, run each frame through the
vision tower on its own (frames never attend to each other), and lay the video out as text positions: the
sequence is one 1-D `arange`, exactly what the plain transformers model computes for itself. A family adapter
adds the frame's tokens (vision features plus any per-frame text) and what follows the video.

The cursor: {"next_position" (position of the next token), "frames" (frames prefilled so far: InternVL numbers its
frames `Frame{i}`), "frame_size", "rope"}; "rope" is the RoPE of this video (see `RopeScaling`).

Long videos (`rope_scaling="dynamic_ntk"`): an hour of video runs past the text stack's `max_position_embeddings`.
The StateKV authors' InternVL3 setting scales RoPE with dynamic NTK when video + prompt + answer exceed it. Here
the planned length L = prefix + (tokens of every sampled frame) + `answer_reserve` is fixed when a video's
prefill starts; when L > max_position_embeddings M every token of that video (prefix, frames, question, answer)
uses the base
    theta' = theta * ((factor * L / M) - (factor - 1)) ** (d / (d - 2))      (d = rotary dimension)
i.e. transformers' `_compute_dynamic_ntk_parameters` at seq_len = L, so one forward of the plain model with
`rope_type="dynamic"` over a sequence of exactly L tokens uses the same frequencies. Positions are unchanged.
Unlike transformers' "dynamic" RoPE, which re-derives the base from each forward's largest position (a stream
would rotate every chunk's keys with a different base), the base stays fixed for the whole video: a resumed
stream keeps the base its first prefill chose, since the stored keys were rotated with it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch

from statekv.models.base import (NATURAL, POSITIVE, SIZE, AnswerInputs, ChunkInputs, CursorField, VideoLMAdapter,
                                 next_position_problem)
from statekv.models.processor_text import around_video
from statekv.profiling import PREPROCESS, timed
from statekv.video.preprocess import resize_frames

ROPE_SCALINGS = ("none", "dynamic_ntk")
BICUBIC = 3  # PILImageResampling.BICUBIC, the only resample these families' video processors use


@dataclass(frozen=True)
class FramePreprocessing:
    """Fixed-size frame preprocessing as the family's video processor does it (torchvision backend)."""

    size: tuple[int, int]  # (height, width) every frame is resized to
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any], *, name: str, default_size: int) -> "FramePreprocessing":
        """Read size / mean / std / rescale from the checkpoint's (video) preprocessor config."""
        missing = [key for key in ("image_mean", "image_std") if key not in config]
        if missing:
            raise ValueError(f"model {name!r}: its preprocessor config has no {' / '.join(missing)}; "
                             "the frame normalisation cannot be known")
        resample = config.get("resample", BICUBIC)
        if resample != BICUBIC:
            raise ValueError(f"model {name!r}: preprocessor resample {resample!r} is not supported (bicubic only)")
        if config.get("do_center_crop"):
            raise ValueError(f"model {name!r}: a center-cropping video preprocessor is not supported")
        size = config.get("size") or {}
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            hw = (int(size["shortest_edge"]),) * 2
        else:
            hw = (default_size, default_size)
        return cls(size=hw, image_mean=tuple(float(x) for x in config["image_mean"]),
                   image_std=tuple(float(x) for x in config["image_std"]),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                   do_rescale=bool(config.get("do_rescale", True)), do_normalize=bool(config.get("do_normalize", True)))

    @timed(PREPROCESS)
    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) RGB -> float32 (T, 3, height, width) model pixels."""
        x = resize_frames(frames, *self.size).to(torch.float32)  # (T, 3, h, w) on the 0-255 scale
        if self.do_rescale and self.do_normalize:  # fused, as transformers does it: (x - mean/r) / (std/r)
            mean = torch.tensor(self.image_mean, dtype=torch.float32) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std, dtype=torch.float32) * (1.0 / self.rescale_factor)
        elif self.do_normalize:
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        else:
            return x * self.rescale_factor if self.do_rescale else x
        return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


@dataclass(frozen=True)
class RopeScaling:
    """The adapter option: "none" (plain RoPE at the config's theta) or "dynamic_ntk" (see the module docstring)."""

    kind: str = "none"
    factor: float = 1.0  # transformers' dynamic-NTK `factor` (the checkpoint's own when its config has one)
    answer_reserve: int = 1024  # tokens planned for the question and the answer after the video

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling {self.kind!r}; valid: {', '.join(ROPE_SCALINGS)}")
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling factor must be >= 1, got {self.factor!r}")
        if self.answer_reserve < 0:
            raise ValueError(f"answer_reserve must be >= 0, got {self.answer_reserve!r}")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "none":  # factor and reserve change nothing then: not part of the prefill config
            return {"rope_scaling": self.kind}
        return {"rope_scaling": self.kind, "rope_factor": self.factor, "answer_reserve": self.answer_reserve}


def ntk_theta(theta: float, factor: float, length: int, max_positions: int, dim: int) -> float:
    """Dynamic-NTK base for a sequence of `length` tokens (= theta when it fits in `max_positions`)."""
    length = max(length, max_positions)
    return theta * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))


def inv_freq(theta: float, dim: int) -> torch.Tensor:
    """RoPE inverse frequencies (dim/2,) float32, in transformers' order of operations."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


class SingleFrameAdapter(VideoLMAdapter):
    """A chunk is one frame; 1-D positions; subclasses give the frame's tokens and what follows the video."""

    frames_per_chunk: ClassVar[int] = 1
    position_rows: ClassVar[int] = 1
    default_size: ClassVar[int]  # the family's frame size when the preprocessor config gives none
    cursor_fields: ClassVar[dict[str, CursorField]] = {
        "next_position": NATURAL, "frames": NATURAL, "frame_size": SIZE, "rope": CursorField(
            "{'theta': number > 0, 'planned_length': integer or null}",
            lambda v: isinstance(v, dict) and POSITIVE.check(v.get("theta"))
            and (v.get("planned_length") is None or NATURAL.check(v["planned_length"])))}

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str, preprocessor: dict[str, Any] | None = None,
                 rope_scaling: str | None = None, rope_factor: float | None = None,
                 answer_reserve: int = 1024) -> None:
        super().__init__(model, tokenizer, name_or_path=name_or_path, preprocessor=preprocessor)
        self.pixels = FramePreprocessing.from_config(self.preprocessor, name=name_or_path,
                                                     default_size=self.default_size)
        text = self.config.text_config
        params = dict(getattr(text, "rope_parameters", None) or {})
        config_type = params.get("rope_type", "default")
        if config_type not in ("default", "dynamic"):
            raise ValueError(f"model {name_or_path!r}: rope_type {config_type!r} is not supported "
                             "(default or dynamic)")
        if rope_scaling is None:  # follow the checkpoint: its own "dynamic" RoPE becomes our fixed-per-video NTK
            rope_scaling = "dynamic_ntk" if config_type == "dynamic" else "none"
        if rope_factor is None:
            rope_factor = float(params.get("factor", 1.0)) if config_type == "dynamic" else 1.0
        self.rope = RopeScaling(rope_scaling, float(rope_factor), int(answer_reserve))
        self.rope_theta = float(params["rope_theta"])
        self.max_positions = int(text.max_position_embeddings)
        self.rotary_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self._rotary = self.language_model.rotary_emb
        # fixed frequencies per call: transformers' "dynamic" update would re-base by each call's largest position
        self._rotary.rope_type = "default"
        self._plain_inv_freq = inv_freq(self.rope_theta, self.rotary_dim).to(self._rotary.inv_freq.device)
        self._rotary.inv_freq.copy_(self._plain_inv_freq)
        self._rope_lock = threading.Lock()

    def options(self) -> dict[str, Any]:
        return self.rope.to_dict()

    # --- the family's part ----------------------------------------------------------------------------------

    def frame_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision features (T, k, hidden) of preprocessed frames (T, 3, h, w), each frame on its own."""
        raise NotImplementedError

    def frame_text(self, index: int) -> tuple[list[int], list[int]]:
        """Token ids before and after the vision tokens of frame `index` (0-based, in the whole video)."""
        raise NotImplementedError

    def after_video(self) -> torch.Tensor:
        """Embeddings (m, hidden) that follow the last frame before the text after the video (may be empty)."""
        return torch.zeros(0, self.model.config.text_config.hidden_size, device=self.device, dtype=self.dtype)

    # --- video ------------------------------------------------------------------------------------------------

    def frame_size(self, height: int, width: int, sampling: Any, num_frames: int | None = None) -> tuple[int, int]:
        return self.pixels.size  # fixed by the preprocessor config, whatever the video

    def tokens_per_frame(self, index: int) -> int:
        """LLM tokens frame `index` stands for (vision tokens and its own text)."""
        before, after = self.frame_text(index)
        return len(before) + self.vision_tokens_per_frame + len(after)

    @property
    def vision_tokens_per_frame(self) -> int:
        raise NotImplementedError

    def new_cursor(self, *, prefix_len: int, frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
        return {"next_position": prefix_len, "frames": 0, "frame_size": list(frame_size),
                "rope": {"theta": self.rope_theta, "planned_length": None}}

    def cursor_problem(self, cursor: dict[str, Any], *, prefix_len: int, num_chunks: int) -> str | None:
        return super().cursor_problem(cursor, prefix_len=prefix_len, num_chunks=num_chunks) or \
            next_position_problem(cursor, prefix_len=prefix_len, num_chunks=num_chunks)

    def plan_video(self, cursor: dict[str, Any], num_frames: int) -> dict[str, Any]:
        """Fix the video's RoPE from its planned length (see the module docstring)."""
        return dict(cursor, rope=self.video_rope(cursor["next_position"], num_frames))

    def planned_length(self, prefix_len: int, num_frames: int) -> int:
        """prefix + every sampled frame's tokens + the answer reserve (the length RoPE scaling plans for)."""
        video = sum(self.tokens_per_frame(i) for i in range(num_frames)) + len(self.after_video())
        return prefix_len + video + self.rope.answer_reserve

    def video_rope(self, prefix_len: int, num_frames: int) -> dict[str, Any]:
        """The RoPE one video uses throughout: {"theta", "planned_length"} (see the module docstring)."""
        if self.rope.kind == "none":
            return {"theta": self.rope_theta, "planned_length": None}
        length = self.planned_length(prefix_len, num_frames)
        theta = ntk_theta(self.rope_theta, self.rope.factor, length, self.max_positions, self.rotary_dim)
        return {"theta": theta, "planned_length": length}

    def decoder_kwargs(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """Extra decode() inputs for every call on this video's tokens (prefix, chunks, answer)."""
        return {"statekv_rope_theta": float(cursor["rope"]["theta"])}

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return self.pixels(frames)

    def video_features(self, frames: np.ndarray, frame_size: tuple[int, int]) -> torch.Tensor:
        feats = self.frame_tokens(self.preprocess(frames))  # (T, k, hidden)
        return feats.reshape(-1, feats.shape[-1])

    def step_features(self, frames: np.ndarray, frame_size: tuple[int, int], step_frames: int) -> list[torch.Tensor]:
        """Features of consecutive steps of `step_frames` frames (the last may have fewer) from one tower call:
        the tower takes the frames as a batch and never mixes them (per-frame attention, per-frame pooling)."""
        features = self.video_features(frames, frame_size)
        return list(features.split(step_frames * self.vision_tokens_per_frame))

    def chunk_inputs(self, frames: np.ndarray, cursor: dict[str, Any], *, timestamps: list[float] | None = None,
                     features: torch.Tensor | None = None) -> ChunkInputs:
        # frame times are not part of these families' token layouts (`timestamps` is accepted and unused)
        # features: given by step_features, or through video_features, so that whoever counts vision-tower calls
        # on the adapter sees these
        if features is None:
            features = self.video_features(frames, cursor["frame_size"])
        feats = features.view(len(frames), self.vision_tokens_per_frame, -1)
        parts, tokens = [], []
        for t in range(feats.shape[0]):
            before, after = self.frame_text(cursor["frames"] + t)
            parts += [self.embed(torch.tensor(before, dtype=torch.long)), feats[t],
                      self.embed(torch.tensor(after, dtype=torch.long))]
            tokens.append(len(before) + feats.shape[1] + len(after))
        embeds = torch.cat(parts).to(self.dtype)
        start = cursor["next_position"]
        positions = torch.arange(start, start + embeds.shape[0], dtype=torch.long).view(1, -1)
        new = dict(cursor, next_position=start + embeds.shape[0], frames=cursor["frames"] + feats.shape[0])
        return ChunkInputs(embeds=embeds, position_ids=positions, chunk_tokens=tokens,
                           chunk_frames=[1] * feats.shape[0], cursor=new, decoder_kwargs=self.decoder_kwargs(cursor))

    # --- after the video -------------------------------------------------------------------------------------

    def answer_inputs(self, question: str, cursor: dict[str, Any], layout: str) -> AnswerInputs:
        ids = self.question_ids(question, layout)
        embeds = torch.cat([self.after_video(), self.embed(ids)])
        start = cursor["next_position"]
        return AnswerInputs(prompt_ids=ids, embeds=embeds, position_ids=self.text_positions(start, len(embeds)),
                            next_position=start + len(embeds))

    # --- decoder ---------------------------------------------------------------------------------------------

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
        theta = kwargs.pop("statekv_rope_theta", None)
        with self._frequencies(theta):
            return super().decode(embeds, position_ids, cache, **kwargs)

    def rotary(self, position_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """At the video's RoPE base (`statekv_rope_theta` among its decoder kwargs)."""
        with self._frequencies(kwargs.get("statekv_rope_theta")):
            return super().rotary(position_ids)

    @contextmanager
    def _frequencies(self, theta: float | None) -> Iterator[None]:
        """RoPE at base `theta` for one call (the plain base when None or equal)."""
        if theta is None or theta == self.rope_theta:
            yield
            return
        with self._rope_lock:
            self._rotary.inv_freq.copy_(inv_freq(theta, self.rotary_dim))
            try:
                yield
            finally:
                self._rotary.inv_freq.copy_(self._plain_inv_freq)

    # --- the plain model's inputs for the same sequence --------------------------------------------------------

    processor: Any  # the installed transformers processor of the family, text side (statekv.models.processor_text)

    def video_text(self, num_frames: int) -> str:
        """What the installed processor's `replace_video_token` puts in place of the template's video placeholder
        for `num_frames` frames (these families' processors read only the frame count)."""
        return self.processor.replace_video_token({"pixel_values_videos": [torch.empty(num_frames, 0)]}, 0)

    def sequence_ids(self, question: str, layout: str, num_frames: int) -> list[int]:
        """The whole sequence's ids as the family's processor lays it out (placeholder tokens for vision)."""
        video = self.video_text(num_frames)
        if layout == "prefix-first":
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      **self.template_kwargs())
            before, after = around_video(self.processor, text)  # as the processor puts the video in
            return self.text_ids(before + video + after)
        return self.prefix_ids(layout).tolist() + self.text_ids(video) + self.question_ids(question, layout).tolist()
