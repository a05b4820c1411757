"""Checking an adapter against the plain transformers model: the exactness standard every family must meet.

`check_against_transformers` prefills frames with `Full()` through the engine, answers a question, and compares
with ONE forward of the checkpoint's own transformers class (transformers' SDPA attention) over the sequence the
family's processor lays out (`statekv.testing.reference_inputs`), the model computing its own positions:
per-chunk K/V at every attention layer, the answer logits at every generated step, and the greedy tokens.
Family tests call it with their tiny checkpoint (see statekv/models/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from statekv.testing.reference_inputs import reference_inputs

QUESTION = "What happens after the dog enters?"


@dataclass
class ReferenceReport:
    """Largest absolute differences engine vs plain model, and whether the greedy tokens agree."""

    max_key_diff: float
    max_value_diff: float
    max_logit_diff: float
    tokens: list[int]
    reference_tokens: list[int]
    context_tokens: int  # prefix + video tokens compared

    def assert_exact(self, atol: float = 1e-4) -> None:
        assert self.max_key_diff <= atol, f"keys differ by {self.max_key_diff}"
        assert self.max_value_diff <= atol, f"values differ by {self.max_value_diff}"
        assert self.max_logit_diff <= atol, f"answer logits differ by {self.max_logit_diff}"
        assert self.tokens == self.reference_tokens, (self.tokens, self.reference_tokens)


def reference_model(path: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> Any:
    """The same checkpoint loaded as its plain transformers class (no statekv attention), on the CPU."""
    from transformers import AutoConfig

    from statekv.models import ADAPTERS

    cls = ADAPTERS[AutoConfig.from_pretrained(path).model_type].model_class
    return cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).eval()


def model_forward(model: Any, inputs: dict[str, Any], extra_ids: list[int] | None = None, **kwargs: Any) -> Any:
    """One forward of the plain model over `inputs` (+ `extra_ids` appended as text), positions its own."""
    inputs = dict(inputs)
    if extra_ids:
        extra = torch.tensor([extra_ids], dtype=torch.long)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None  # positions are recomputed from input_ids, not carried from a last call
    return model(**inputs, use_cache=True, **kwargs)


@torch.inference_mode()
def check_against_transformers(path: str, frames: np.ndarray, *, fps: float, sampling: Any, layout: str,
                               question: str = QUESTION, max_new_tokens: int = 5, engine: Any = None,
                               model: Any = None) -> ReferenceReport:
    """Prefill `frames` (already sampled, at `fps`) with `Full()` and compare with the plain model (see module)."""
    from statekv import Engine, Full

    if engine is None:
        engine = Engine.from_pretrained(path, policy=Full(), device="cpu", dtype=torch.float32, sampling=sampling,
                                        layout=layout)
    cache = engine.prefill(frames, fps=fps)
    answer = engine.ask(cache, question, max_new_tokens=max_new_tokens, output_scores=True)
    model = model if model is not None else reference_model(path)
    inputs = reference_inputs(engine.adapter, frames, question, layout, cache.video.frame_size, cache.video.sampled_fps)
    out = model_forward(model, inputs, answer.token_ids[:-1])
    logits = out.logits[0].float()  # (L + generated - 1, V)
    prompt_end = inputs["input_ids"].shape[1] - 1
    steps = logits[prompt_end:prompt_end + len(answer.token_ids)]
    n_ctx = cache.prefix_len + cache.num_video_tokens
    key_diff = value_diff = 0.0
    for layer in engine.adapter.layout.attention_layers:  # linear-attention layers have no KV (their states:
        keys, values = cache.layer_kv(layer)               # tests/statekv/test_family_qwen3_5.py)
        ref = out.past_key_values.layers[layer]
        key_diff = max(key_diff, float((keys - ref.keys[0, :, :n_ctx]).abs().max()))
        value_diff = max(value_diff, float((values - ref.values[0, :, :n_ctx]).abs().max()))
    logit_diff = max(float((s - r).abs().max()) for s, r in zip(answer.scores, steps))
    return ReferenceReport(key_diff, value_diff, logit_diff, answer.token_ids,
                           [int(i) for i in steps.argmax(-1)], n_ctx)
