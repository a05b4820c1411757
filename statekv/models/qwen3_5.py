"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`, model_type "qwen3_5"): Qwen3-VL's video layout on a hybrid text stack.

What is the same as Qwen3-VL (and reused by subclassing `Qwen3VLAdapter`): the processor (`Qwen3VLProcessor`,
`Qwen3VLVideoProcessor` config: patch 16, merge 2, two-frame temporal patches, a whole-video pixel budget), the
token layout taken from the installed processor (`<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` per
frame pair, replacing the template's video wrapper; layout version 2) and the 3-D positions (`get_rope_index` is
Qwen3-VL's rule).

What differs:
- no DeepStack: the vision tower returns only the merged features; chunks carry no extra decoder inputs;
- the text stack is hybrid (`text_config.layer_types`): Gated DeltaNet "linear_attention" layers (a short causal
  convolution state and a delta-rule recurrent state) and gated "full_attention" layers. The adapter only reports
  which layers are linear (`layout.linear_layers`, from `layer_types`); the engine carries their exact states from
  chunk to chunk and applies the policy to the full-attention layers alone (see statekv/engine.py);
- the chat template's generation prompt opens a thinking block: `<think>\n` by default, `<think>\n\n</think>\n\n`
  with `enable_thinking=False`. The adapter renders the template's default (thinking on: what the processor and
  `apply_chat_template` give without arguments, so `Full()` equals the plain model on its default prompt);
  `adapter_options={"enable_thinking": False}` renders the non-thinking prompt. It changes only the text after the
  video, never the cache, so it is not part of the prefill config: one cache serves both.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from statekv.models.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    model_type = "qwen3_5"
    model_class = Qwen3_5ForConditionalGeneration

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str, preprocessor: dict[str, Any] | None = None,
                 enable_thinking: bool = True) -> None:
        super().__init__(model, tokenizer, name_or_path=name_or_path, preprocessor=preprocessor)
        self.enable_thinking = bool(enable_thinking)

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.enable_thinking else {"enable_thinking": False}


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5-MoE (e.g. Qwen3.5-35B-A3B): the same processor, vision tower, positions and hybrid layer layout; only
    the text layers' MLPs are mixtures of experts (plus a shared expert), which changes nothing the engine sees."""

    model_type = "qwen3_5_moe"
    model_class = Qwen3_5MoeForConditionalGeneration
