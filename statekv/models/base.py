"""The adapter contract: everything family-specific the streaming engine needs, behind one small interface.

The engine (statekv/engine.py) is family-free. It asks the adapter of the loaded checkpoint's family for:

    frame_size(height, width, sampling, num_frames)
                                           the size every frame of a video of `num_frames` sampled frames is
                                           resized to (read once per video; Qwen3-VL's pixel budget is per video)
    new_cursor(prefix_len, frame_size, sampled_fps)
                                           a plain JSON-able dict: where the video's next chunk sits (positions,
                                           grids, times). Stored with the cache, so a stream can be resumed.
    prefix_ids(layout)                     token ids prefilled before the first chunk (always attended to)
    chunk_inputs(frames, cursor, timestamps=..., features=...)
                                           ChunkInputs of the next k chunks: frames (k*frames_per_chunk or fewer
                                           at the end of a video, uint8 (T, H, W, 3)) and the time of each in
                                           the video (source frame index / source fps in seconds, as the
                                           processors compute it; Qwen3-VL writes it as text) -> embeddings of
                                           every token the chunks stand for (vision tokens AND any per-frame text the family's
                                           processor inserts), positions (position_rows, n) exactly as the
                                           transformers model computes them for the whole sequence, tokens and
                                           frames per chunk, extra decoder kwargs, and the advanced cursor;
                                           `features`: this step's entry of `step_features` (else it encodes
                                           the frames itself)
    answer_inputs(question, cursor, layout)
                                           AnswerInputs: what follows the video (rest of the user turn, the
                                           question, the answer header; embeddings, not just ids, so a family can
                                           insert e.g. LLaVA-OneVision's image_newline), at its positions, and the
                                           position of the first generated token
    plan_video(cursor, num_frames)         the new video's cursor once its frame count is known (default: as is)
    decoder_kwargs(cursor)                 extra decode() inputs for every call on a video's tokens (prefix, chunks,
                                           answer), e.g. the RoPE base the cursor fixed; {} by default
    text_positions(start, length)          positions of generated tokens (position_rows, length)
    decode(embeds, position_ids, cache, **kwargs) -> hidden,  logits(hidden)
    video_features(frames, frame_size)     vision features of frames (n, hidden): per chunk == whole video. The
                                           only way into the vision tower: chunk_inputs calls it (the query
                                           service counts its calls to prove answering never runs the tower)
    step_features(frames, frame_size, step_frames)
                                           the vision features of several consecutive prefill steps' frames
                                           (`step_frames` each, the last may have fewer) from ONE video_features
                                           call, one entry per step for chunk_inputs(features=...): the tower's
                                           fixed cost is paid once per batch of steps, not once per step. Equal
                                           to encoding each step alone (within float rounding) because in every
                                           family's tower frames never attend to each other

plus class attributes `model_type` (the checkpoint's config.model_type: the registry key), `model_class` (its
transformers class), `frames_per_chunk`, `position_rows` and `layout_version` (bump it whenever the token sequence
the adapter builds for the same frames and question changes: caches record it, and a cache built on another
version is refused with "re-index", statekv.errors.CacheLayoutError), and `options()` (adapter settings that change the
numbers, e.g. RoPE scaling, recorded with the cache's prefill config; resuming with other options is refused).

Layouts (`LAYOUTS`): "prefix-first" is the model's own chat format (system prompt and user header, then the video,
then question and answer header: every chunk also attends to the system prompt); "video-first" is the StateKV
paper's setting: the prefix holds only the tokens that open the video block (for Qwen `<|vision_start|>`; may be
empty), each chunk attends to [that | carried state | itself], and the chat text before the video moves after
it, in front of the question, at answer time. The sequence is then
    video-open, video tokens, video-close, <template text before the video>, <template text after the video>.

How to add a family (one file + one registry entry):
1. statekv/models/<family>.py: subclass `VideoLMAdapter`, set the class attributes, implement the methods above
   (see qwen_vl.py for a complete example with a 3-row position cursor). Read preprocessing parameters from
   `self.preprocessor` (the checkpoint's preprocessor config, `load_preprocessor_config`), not class defaults.
   Set `self.processor` to the family's installed transformers processor, text side
   (`statekv.models.processor_text.text_only`): the text around the video (`split_template`) and the reference
   sequence come from it, and so should a chunk's own text wherever the processor can give it; where it cannot,
   say why in the adapter's docstring and check the adapter's copy against the processor when it loads.
2. Add the class to `ADAPTERS` in statekv/models/__init__.py.
3. Tests: a tiny random checkpoint (statekv/testing/checkpoints.py style: save_pretrained with a locally built
   tokenizer carrying the family's special tokens and real chat template, and a preprocessor config), then call
   `statekv.testing.reference.check_against_transformers(path, frames, fps=..., layout=...)`: it prefills with
   `Full()`, answers, and compares per-chunk K/V, the answer logits at every generated step and the greedy
   tokens with one forward of the plain transformers model over the family's own processor inputs (add the
   family's builder to statekv/testing/reference_inputs.py: the test side, not part of this contract). The
   engine's generic tests (resume bit-exactness, prefill-config refusal, store round trips) are parametrised over
   `ADAPTERS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from statekv.models.processor_text import around_video

logger = logging.getLogger(__name__)

ATTENTION_NAME = "statekv"  # the name our attention function is registered under in transformers
LAYOUTS = ("prefix-first", "video-first")
LINEAR_LAYER_TYPES = ("linear_attention",)  # transformers' layer types whose cache is a recurrent + conv state
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one layer's KV: what a cache must match to be used with this model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # layers with a recurrent state instead of KV (transformers' "linear_attention" layer type, e.g. Gated DeltaNet):
    # the engine carries their exact state from chunk to chunk; policies and chunk KV concern the other layers
    linear_layers: tuple[int, ...] = ()

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Layers with KV (the ones policies bound and the store keeps per chunk)."""
        return tuple(i for i in range(self.num_layers) if i not in self.linear_layers)


@dataclass
class ChunkInputs:
    """What the decoder sees for one prefill step of k chunks (tokens of chunk 0, then chunk 1, ...)."""

    embeds: torch.Tensor  # (n, hidden) on the model's device
    position_ids: torch.Tensor  # (position_rows, n) int64
    chunk_tokens: list[int]  # tokens of each chunk; sums to n
    chunk_frames: list[int]  # sampled frames of each chunk (the last chunk of a video may have fewer)
    cursor: dict[str, Any]  # the cursor after these chunks
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra inputs the family's decoder needs


@dataclass
class AnswerInputs:
    """What follows the video when a question is asked."""

    prompt_ids: torch.Tensor  # (L,) token ids (the rest of the user turn, the question, the answer header)
    embeds: torch.Tensor  # (L', hidden): their embeddings, plus any embedding the family inserts (L' >= L)
    position_ids: torch.Tensor  # (position_rows, L')
    next_position: int  # position of the first generated token


def load_preprocessor_config(name_or_path: str, **hub: Any) -> dict[str, Any]:
    """The checkpoint's own (video) preprocessor config as a dict; {} when it has none (then the adapter's
    family defaults apply, with a warning). `hub`: where a hub id's files come from (revision, cache_dir,
    local_files_only, ...), as for its config and tokenizer: without them a cached id at another revision read
    the default revision's file, and an id cached only in `cache_dir` went to the network."""
    for name in PREPROCESSOR_FILES:
        path = os.path.join(name_or_path, name)
        if not os.path.isdir(name_or_path):
            from transformers.utils import cached_file

            files = {k: v for k, v in hub.items() if k != "trust_remote_code"}
            path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **files)
        if path and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    logger.warning("model %s has no preprocessor config (%s): using the family's defaults", name_or_path,
                   " / ".join(PREPROCESSOR_FILES))
    return {}


@dataclass(frozen=True)
class CursorField:
    """What one field of a stored cursor must be: `what` (for messages) and the check of a value."""

    what: str
    check: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


INT = CursorField("an integer", _is_int)
NATURAL = CursorField("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = CursorField("a number > 0", lambda v: _is_number(v) and v > 0)
SIZE = CursorField("a [height, width] pair of integers > 0",
                   lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))


class VideoLMAdapter:
    """One loaded video VLM, seen through the operations streaming prefill and answering need (see module doc)."""

    model_type: ClassVar[str]
    model_class: ClassVar[type]
    frames_per_chunk: ClassVar[int]
    position_rows: ClassVar[int]
    layout_version: ClassVar[int] = 1  # the token layout's version (see the module docstring)
    # what the family's cursor holds: a cursor read back from a stored cache is checked against it before use
    cursor_fields: ClassVar[dict[str, CursorField]] = {}
    video_token_id: int  # the placeholder token the family's processor expands into video tokens
    processor: Any  # the family's installed transformers processor, text side (statekv.models.processor_text)

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str,
                 preprocessor: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.config = model.config
        self.preprocessor = dict(preprocessor or {})
        text = self.config.text_config
        self.layout = KVLayout(
            num_layers=text.num_hidden_layers,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            linear_layers=tuple(i for i, kind in enumerate(getattr(text, "layer_types", None) or [])
                                if kind in LINEAR_LAYER_TYPES),
        )
        self.eos_token_ids: set[int] = _eos_ids(model, tokenizer)

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

    def options(self) -> dict[str, Any]:
        """Adapter settings that change the numbers (recorded in the cache's prefill config)."""
        return {}

    def cursor_problem(self, cursor: Any, *, prefix_len: int, num_chunks: int) -> str | None:
        """Why a stored cursor cannot be this family's after `num_chunks` chunks behind a `prefix_len`-token prefix,
        or None: a field missing or of the wrong kind (`cursor_fields`), then the family's own rules (subclasses
        extend this). The cursor is opaque to the store, so a manifest's lie about it is caught here, before any
        position is computed from it."""
        if not isinstance(cursor, dict):
            return f"the cursor is {type(cursor).__name__}, not an object"
        for name, spec in self.cursor_fields.items():
            if name not in cursor:
                return f"field {name!r} is missing"
            if not spec.check(cursor[name]):
                return f"field {name!r} is {cursor[name]!r}, not {spec.what}"
        return None

    # --- the family's part (see the module docstring) ----------------------------------------------------------

    def frame_size(self, height: int, width: int, sampling: Any, num_frames: int) -> tuple[int, int]:
        raise NotImplementedError

    def new_cursor(self, *, prefix_len: int, frame_size: tuple[int, int], sampled_fps: float) -> dict[str, Any]:
        raise NotImplementedError

    def plan_video(self, cursor: dict[str, Any], num_frames: int) -> dict[str, Any]:
        """A new video's cursor once its first prefill's frame count is known, before its prefix is prefilled:
        a family may plan for the video's length (InternVL / LLaVA-OneVision dynamic-NTK RoPE). Unchanged here."""
        return cursor

    def decoder_kwargs(self, cursor: dict[str, Any]) -> dict[str, Any]:
        """Extra decode() inputs for every call on this video's tokens: the prefix, each chunk, the answer
        (e.g. the RoPE base a video's cursor fixed). Empty for most families."""
        return {}

    def chunk_inputs(self, frames: np.ndarray, cursor: dict[str, Any], *, timestamps: list[float] | None = None,
                     features: Any = None) -> ChunkInputs:
        raise NotImplementedError

    def step_features(self, frames: np.ndarray, frame_size: tuple[int, int], step_frames: int) -> list[Any]:
        raise NotImplementedError

    def answer_inputs(self, question: str, cursor: dict[str, Any], layout: str) -> AnswerInputs:
        raise NotImplementedError

    def video_features(self, frames: np.ndarray, frame_size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    # --- shared by every family ---------------------------------------------------------------------------

    def text_positions(self, start: int, length: int) -> torch.Tensor:
        """Text tokens: the same position on every row, (position_rows, length)."""
        return torch.arange(start, start + length, dtype=torch.long).view(1, -1).expand(self.position_rows, -1)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens in it become their ids; none added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (L, hidden) of ids (L,)."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
        """Run the decoder stack on embeds (L, hidden) at positions (R, L), extending `cache` in place.

        Returns the final normed hidden states (L, hidden); `cache=None` runs without one (the attention function
        then gets only these tokens' keys: statekv/decoding.py keeps them itself). `kwargs` reach our attention function (statekv_*) or
        the family's decoder (ChunkInputs.decoder_kwargs).
        """
        pos = position_ids.to(self.device)
        pos = pos.unsqueeze(1) if self.position_rows > 1 else pos  # (R, 1, L) for M-RoPE, (1, L) for 1-D
        out = self.language_model(inputs_embeds=embeds.unsqueeze(0), position_ids=pos, cache=cache,
                                  use_cache=cache is not None, **kwargs)
        return out.last_hidden_state[0]

    def rotary(self, position_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The text stack's rotary embedding at positions (R, n): float32 (cos, sin), each (n, rotary dims), as its
        decoder layers apply them (M-RoPE sections or interleaving, partial rotary: the family's `rotary_emb` decides).
        `kwargs`: the video's decoder kwargs (a family whose RoPE base is per video reads it there)."""
        pos = position_ids.to(self.device)
        pos = pos.unsqueeze(1) if self.position_rows > 1 else pos  # as `decode` passes them
        probe = torch.zeros((), dtype=torch.float32, device=self.device)  # rotary_emb reads only its device, dtype
        cos, sin = self.language_model.rotary_emb(probe, pos)
        return cos[0].float(), sin[0].float()

    def unrotate(self, x: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Keys or queries x (H, n, D) as the attention saw them (after RoPE at positions (R, n)) -> the same before
        RoPE, float32 (ReKV scores with pre-RoPE queries and keys; statekv/retrieval.py)."""
        cos, sin = self.rotary(position_ids, **kwargs)
        return unrotate(x, cos.to(x.device), sin.to(x.device))

    @property
    def language_model(self) -> Any:
        return self.model.model.language_model

    def vision_modules(self) -> list[Any]:
        """The modules that turn pixels into the language model's inputs (vision tower, projector): every part of
        the multimodal model but its language model (what `statekv.profiling` times as the vision stage)."""
        return [m for m in self.model.model.children() if m is not self.language_model]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    # --- chat template ----------------------------------------------------------------------------------------

    video_open_tokens: ClassVar[int] = 0  # tokens before the placeholder that belong to the video block
    video_close_tokens: ClassVar[int] = 0  # tokens after the placeholder run that belong to the video block

    def template_kwargs(self) -> dict[str, Any]:
        """Extra variables for the chat template (e.g. Qwen3.5's `enable_thinking`); none by default."""
        return {}

    def chat_text(self, question: str) -> str:
        """The chat template's text for one user turn [video, question] with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.name_or_path!r}: the tokenizer has no chat template")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  **self.template_kwargs())

    def split_template(self, question: str) -> tuple[list[int], list[int]]:
        """(ids before the video, ids after it) of the chat template, as the family's installed processor puts a
        video into its text (`self.processor`; it may consume text around the placeholder, see
        statekv/models/processor_text.py)."""
        try:
            before, after = around_video(self.processor, self.chat_text(question))
        except ValueError as err:
            raise ValueError(f"model {self.name_or_path!r}: {err}") from None
        return self.text_ids(before), self.text_ids(after)

    def prefix_ids(self, layout: str) -> torch.Tensor:
        """Token ids prefilled before the first chunk: the template up to the video, or only the video's opening."""
        _check_layout(layout)
        before, _ = self.split_template("?")
        ids = before if layout == "prefix-first" else before[len(before) - self.video_open_tokens:]
        return torch.tensor(ids, dtype=torch.long)

    def question_ids(self, question: str, layout: str = "prefix-first") -> torch.Tensor:
        """Token ids that follow the video for this layout (see the module docstring)."""
        _check_layout(layout)
        before, after = self.split_template(question)
        if before != self.split_template("?")[0]:
            raise ValueError("the chat template's text before the video depends on the question; "
                             "a stored video prefix cannot be reused with it")
        if layout == "prefix-first":
            return torch.tensor(after, dtype=torch.long)
        close = self.video_close_tokens
        moved = before[:len(before) - self.video_open_tokens]
        return torch.tensor(after[:close] + moved + after[close:], dtype=torch.long)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `x_rot * cos + rotate_half(x_rot) * sin` (transformers' RoPE on the first `cos.shape[-1]` dims; the
    rest pass through): x (..., n, D), cos/sin (n, Dr) -> float32. Dividing by cos² + sin² also undoes a RoPE
    variant's attention scaling (cos and sin scaled alike)."""
    x = x.float()
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)  # rotate_half
    back = (rot * cos - turned * sin) / (cos * cos + sin * sin)
    return torch.cat([back, rest], dim=-1)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")


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


def next_position_problem(cursor: dict[str, Any], *, prefix_len: int, num_chunks: int) -> str | None:
    """For cursors that carry the next text position (1-D families, Qwen3-VL): every chunk holds at least one token
    after the prefix, so the next position is at least prefix_len + num_chunks."""
    nxt = cursor.get("next_position")
    if not is_count(nxt, low=prefix_len + num_chunks):
        return f"next_position {nxt!r:.40} is before the end of {num_chunks} chunks after a {prefix_len}-token prefix"
    return None


def is_count(value: Any, *, low: int = 0, high: int = 1 << 40) -> bool:
    """An int (not a bool) within [low, high]: what a stored cursor's counts and positions must be."""
    return _is_int(value) and low <= value <= high
