"""Checks shared by the InternVL3 and LLaVA-OneVision family tests (one frame per chunk, 1-D RoPE).

Each takes a loaded adapter (and its checkpoint directory) and raises AssertionError with what differs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from statekv.testing.hf_processors import family_processor, processor_inputs
from statekv.testing.reference_inputs import reference_inputs


def check_layout_matches_processor(adapter: Any, path: str | os.PathLike, frames: np.ndarray, question: str) -> None:
    """The adapter's sequence (`reference_inputs`, and prefix + chunk tokens + answer prompt) is token for token and
    pixel for pixel what the family's own transformers processor gives for the same frames and question."""
    expected = processor_inputs(family_processor(path, adapter.preprocess), frames, question)
    got = reference_inputs(adapter, frames, question, "prefix-first", adapter.pixels.size, 1.0)
    assert got["input_ids"].tolist() == expected["input_ids"].tolist(), "input_ids differ from the processor's"
    pixels = "pixel_values" if "pixel_values" in got else "pixel_values_videos"
    assert torch.equal(got[pixels], expected[pixels]), f"{pixels} differ from the processor's"
    # the same sequence assembled the way the engine does it: prefix, each frame's chunk tokens, answer prompt
    ids = expected["input_ids"][0].tolist()
    streamed = adapter.prefix_ids("prefix-first").tolist()
    placeholder = adapter.image_token_id if hasattr(adapter, "image_token_id") else adapter.video_token_id
    for i in range(len(frames)):
        before, after = adapter.frame_text(i)
        streamed += before + [placeholder] * adapter.vision_tokens_per_frame + after
    streamed += [placeholder] * len(adapter.after_video())
    streamed += adapter.question_ids(question, "prefix-first").tolist()
    assert streamed == ids, "prefix + chunk tokens + answer prompt differ from the processor's sequence"


def check_vision_per_chunk(adapter: Any, frames: np.ndarray) -> None:
    """Vision features frame by frame equal those of the whole video at once."""
    whole = adapter.video_features(frames, adapter.pixels.size)
    parts = torch.cat([adapter.video_features(frames[i:i + 1], adapter.pixels.size) for i in range(len(frames))])
    assert whole.shape == (len(frames) * adapter.vision_tokens_per_frame, whole.shape[-1])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)


def load(path: str | os.PathLike, **adapter_options: Any) -> Any:
    """The checkpoint behind its adapter, loaded as the engine loads it (CPU, float32)."""
    from statekv.models import load_adapter

    return load_adapter(path, device="cpu", dtype=torch.float32, adapter_options=adapter_options or None)


# --- through the engine ---------------------------------------------------------------------------------------

def engine(path: str | os.PathLike, policy: Any = None, **kwargs: Any) -> Any:
    from statekv import Engine, Full

    return Engine.from_pretrained(path, policy=policy if policy is not None else Full(), device="cpu",
                                  dtype=torch.float32, **kwargs)


def check_full_equals_transformers(path: str | os.PathLike, frames: np.ndarray, layout: str,
                                   chunks_per_step: int = 1) -> Any:
    """Full(): per-chunk K/V, answer logits at every step and greedy tokens equal ONE forward of the plain model
    over the processor's sequence, the model computing its own (1-D) positions; returns the report."""
    from statekv.testing.reference import check_against_transformers
    from statekv.video import SamplingConfig

    e = engine(path, layout=layout, chunks_per_step=chunks_per_step)
    report = check_against_transformers(str(path), frames, fps=2.0, sampling=SamplingConfig(), layout=layout,
                                        engine=e)
    report.assert_exact(1e-4)
    return report


def check_capacity_covering_the_video_equals_full(path: str | os.PathLike, frames: np.ndarray,
                                                  question: str) -> None:
    """StateKV and Window with a capacity >= every video token carry everything: the same cache and answer."""
    from statekv import StateKV, Window

    full_engine = engine(path)
    full = full_engine.prefill(frames, fps=2.0)
    expected = full_engine.ask(full, question, max_new_tokens=5, output_scores=True)
    for policy in (StateKV(capacity=full.num_video_tokens), Window(capacity=full.num_video_tokens + 7)):
        e = engine(path, policy)
        cache = e.prefill(frames, fps=2.0)
        assert cache.chunk_tokens == full.chunk_tokens and torch.equal(cache.position_ids, full.position_ids)
        for layer in range(e.adapter.layout.num_layers):
            for x, y in zip(cache.layer_kv(layer), full.layer_kv(layer)):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
        got = e.ask(cache, question, max_new_tokens=5, output_scores=True)
        assert got.token_ids == expected.token_ids, policy
        for s, r in zip(got.scores, expected.scores):
            torch.testing.assert_close(s, r, rtol=0, atol=1e-4)


def check_store(path: str | os.PathLike, video: str, question: str, root: str,
                storage_options: Any = None) -> tuple[Any, Any]:
    """A video file through prefill_to_store -> load_cache -> ask answers exactly as the in-memory cache of the
    same file does. Returns (engine, expected answer) for a check of the query service over the same store."""
    from statekv.store import load_cache, prefill_to_store

    e = engine(path)
    memory = e.prefill(video)
    assert memory.num_chunks == len(memory.video.frame_indices)  # one frame per chunk
    expected = e.ask(memory, question, max_new_tokens=5, output_scores=True)
    uri = f"{root}/clip"
    prefill_to_store(e, video, uri, storage_options=storage_options)
    loaded = load_cache(uri, storage_options=storage_options)
    got = e.ask(loaded, question, max_new_tokens=5, output_scores=True)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    for s, r in zip(got.scores, expected.scores):
        assert torch.equal(s, r)
    return e, expected


# --- long videos: dynamic-NTK RoPE ------------------------------------------------------------------------------

def check_dynamic_ntk(path: str | os.PathLike, frames: np.ndarray, question: str, *, factor: float = 2.0,
                      max_new_tokens: int = 4) -> dict[str, Any]:
    """With rope_scaling="dynamic_ntk" and a video + prompt + answer past max_position_embeddings M:

    - the cursor's base is theta * ((factor * L / M) - (factor - 1)) ** (d / (d - 2)) for the planned length
      L = prefix + video + answer_reserve, computed here directly;
    - positions stay the sequence's 1-D arange;
    - Full() per-chunk K/V and the answer logits equal ONE forward of the plain model with
      rope_type="dynamic" (transformers re-derives the base from that forward's length) over a sequence of
      exactly L tokens (see `dynamic_reference_differences`);
    - the same engine without the option does NOT match (so the check sees the scaling).
    Returns {"theta", "planned_length", "max_positions"}.
    """
    from transformers import AutoConfig

    from statekv.models.single_frame import inv_freq

    probe = engine(path).adapter
    reserve = len(probe.question_ids(question, "prefix-first")) + max_new_tokens + 3
    options = {"rope_scaling": "dynamic_ntk", "rope_factor": factor, "answer_reserve": reserve}
    scaled = engine(path, adapter_options=options)
    a = scaled.adapter
    text = a.config.text_config
    theta, m = float(text.rope_parameters["rope_theta"]), int(text.max_position_embeddings)
    dim = text.hidden_size // text.num_attention_heads
    cache = scaled.prefill(frames, fps=2.0)
    planned = cache.prefix_len + cache.num_video_tokens + len(a.after_video()) + reserve
    assert planned > m, f"the test sequence ({planned}) must run past max_position_embeddings ({m})"
    expected_theta = theta * ((factor * planned / m) - (factor - 1)) ** (dim / (dim - 2))
    rope = cache.cursor["rope"]
    assert rope["planned_length"] == planned and abs(rope["theta"] - expected_theta) <= 1e-9 * expected_theta
    assert torch.equal(cache.position_ids, torch.arange(cache.prefix_len + cache.num_video_tokens).view(1, -1))
    answer = scaled.ask(cache, question, max_new_tokens=max_new_tokens, output_scores=True)

    config = AutoConfig.from_pretrained(path)
    config.text_config.rope_parameters = {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
    dynamic = a.model_class.from_pretrained(path, config=config, dtype=torch.float32,
                                            attn_implementation="sdpa").eval()
    kv, logits = dynamic_reference_differences(a, dynamic, cache, answer, frames, question)
    assert kv <= 1e-4 and logits <= 1e-4, (kv, logits)
    ref_freq = dynamic.model.language_model.rotary_emb.inv_freq  # what transformers derived for length L
    torch.testing.assert_close(ref_freq, inv_freq(expected_theta, dim), rtol=1e-6, atol=0)
    plain = engine(path)
    plain_cache = plain.prefill(frames, fps=2.0)
    plain_answer = plain.ask(plain_cache, question, max_new_tokens=max_new_tokens, output_scores=True)
    kv_plain, logits_plain = dynamic_reference_differences(a, dynamic, plain_cache, plain_answer, frames, question,
                                                           planned=planned)
    assert kv_plain > 1e-3 and logits_plain > 1e-3, (kv_plain, logits_plain)
    return {"theta": rope["theta"], "planned_length": planned, "max_positions": m}


def dynamic_reference_differences(adapter: Any, model: Any, cache: Any, answer: Any, frames: np.ndarray,
                                  question: str, planned: int | None = None) -> tuple[float, float]:
    """(largest K/V difference, largest answer-logit difference) of a prefix-first cache and its answer against
    ONE forward of `model` (a plain model with rope_type "dynamic") over exactly `planned` tokens (default: the
    cache's planned length): the processor's sequence, the generated tokens, then filler; causal attention keeps
    the earlier positions independent of the filler, while transformers derives its base from the whole length."""
    from statekv.testing.reference import model_forward

    planned = planned if planned is not None else cache.cursor["rope"]["planned_length"]
    inputs = reference_inputs(adapter, frames, question, "prefix-first", cache.video.frame_size,
                                      cache.video.sampled_fps)
    prompt_len = inputs["input_ids"].shape[1]
    extra = answer.token_ids[:-1]
    assert prompt_len + len(extra) <= planned, "the planned length leaves no room for the answer"
    extra = extra + [adapter.tokenizer.pad_token_id] * (planned - prompt_len - len(extra))
    n_ctx = cache.prefix_len + cache.num_video_tokens
    with torch.inference_mode():
        out = model_forward(model, inputs, extra)
    kv = max(float((x - getattr(out.past_key_values.layers[layer], name)[0, :, :n_ctx]).abs().max())
             for layer in range(adapter.layout.num_layers)
             for x, name in zip(cache.layer_kv(layer), ("keys", "values")))
    steps = out.logits[0, prompt_len - 1:prompt_len - 1 + len(answer.scores)].float()
    return kv, max(float((s - r).abs().max()) for s, r in zip(answer.scores, steps))


def check_checkpoint_dynamic_rope(path: str | os.PathLike, frames: np.ndarray, question: str) -> None:
    """A checkpoint whose own config asks for transformers' "dynamic" RoPE (factor f) gets dynamic_ntk with f by
    default, and matches the plain model loaded from that checkpoint as it is (one forward over the planned
    length); rope_scaling="none" opts out (plain RoPE, recorded as such)."""
    from statekv.testing.reference import reference_model

    default = engine(path)
    factor = float(default.adapter.config.text_config.rope_parameters["factor"])
    assert default.adapter.options() == {"rope_scaling": "dynamic_ntk", "rope_factor": factor, "answer_reserve": 1024}
    cache = default.prefill(frames, fps=2.0)
    answer = default.ask(cache, question, max_new_tokens=4, output_scores=True)
    kv, logits = dynamic_reference_differences(default.adapter, reference_model(str(path)), cache, answer, frames,
                                               question)
    assert kv <= 1e-4 and logits <= 1e-4, (kv, logits)
    plain = engine(path, adapter_options={"rope_scaling": "none"})
    assert plain.adapter.options() == {"rope_scaling": "none"}
    assert plain.prefill(frames[:1], fps=2.0).cursor["rope"] == {"theta": plain.adapter.rope_theta,
                                                                  "planned_length": None}


def check_rope_option_is_recorded(path: str | os.PathLike, frames: np.ndarray) -> None:
    """The RoPE option is part of the cache's prefill config: resuming with another is refused naming the field,
    and a resumed stream keeps the base its first prefill planned (the stored keys were rotated with it)."""
    import pytest

    from statekv.errors import PrefillConfigMismatchError

    options = {"rope_scaling": "dynamic_ntk", "rope_factor": 2.0, "answer_reserve": 8}
    scaled = engine(path, adapter_options=options)
    first = scaled.prefill(frames[:2], fps=2.0)
    assert first.config.adapter == options
    with pytest.raises(PrefillConfigMismatchError, match=r"field .adapter\."):
        engine(path, adapter_options=dict(options, rope_scaling="none")).prefill(frames[2:], fps=2.0,
                                                                                 resume_from=first)
    resumed = scaled.prefill(frames[2:], fps=2.0, resume_from=first)
    assert resumed.cursor["rope"] == first.cursor["rope"]
    assert resumed.cursor["frames"] == len(frames)
