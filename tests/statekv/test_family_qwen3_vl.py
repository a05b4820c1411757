"""Qwen3-VL against transformers' own processor and model: tokens, positions, pixels, K/V, logits, answers.

(Resume bit-exactness, prefill-config refusal and the store round trip run for Qwen3-VL in test_families.py, the
StateKV selection check in test_selection.py, both parametrised over the adapters registry.)

The reference is the real `Qwen3VLProcessor` (torchvision kernels swapped for torch ones, see
statekv/testing/qwen3_vl_reference.py) and ONE forward of the plain `Qwen3VLForConditionalGeneration` over the
whole sequence, the model computing its own positions.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from statekv import Engine, Full, StateKV, Window
from statekv.testing.checkpoints import (QWEN3_VL_ADDED_TOKENS, QWEN3_VL_EXTRA_SPECIAL_TOKENS, SPECIAL_TOKENS,
                                         save_tiny_checkpoint)
from statekv.testing.qwen3_vl_reference import (load_reference_model, load_reference_processor, processor_inputs,
                                                reference_forward)
from statekv.testing.reference import check_against_transformers
from statekv.testing.videos import synthetic_frames, write_video
from statekv.video import SamplingConfig

FPS = 2.0
QUESTION = "What happens after the dog enters?"
SAMPLING = SamplingConfig(fps=FPS)  # sizes from the checkpoint's own video preprocessor config
LAYOUTS = ["prefix-first", "video-first"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_vl") / "tiny", "qwen3_vl"))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """7 frames (an odd last chunk) of 70x100: the processor resizes them to 64x96, 2x3 merged cells per chunk."""
    return synthetic_frames(7, 70, 100, seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_reference_model(checkpoint)


@pytest.fixture(scope="module")
def processor(checkpoint):
    return load_reference_processor(checkpoint)


def make_engine(path: str, policy, **kwargs) -> Engine:
    return Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, sampling=SAMPLING, **kwargs)


# --- the checkpoint -----------------------------------------------------------------------------------------------

def test_tiny_checkpoint_has_the_family_tokens_template_and_processor_config(checkpoint, processor):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    assert config.model_type == "qwen3_vl" and config.vision_config.patch_size == 16
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    text = config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert 0 < len(config.vision_config.deepstack_visual_indexes) < text.num_hidden_layers
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS + QWEN3_VL_EXTRA_SPECIAL_TOKENS + QWEN3_VL_ADDED_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    # the Qwen3-VL Instruct template: no default system prompt, the video block, the generation prompt
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Why?<|im_end|>\n<|im_start|>assistant\n")
    assert "Video 1: <|vision_start|>" in tok.apply_chat_template(messages, add_vision_id=True, tokenize=False)
    video = json.loads(open(f"{checkpoint}/video_preprocessor_config.json").read())
    assert video["image_mean"] == video["image_std"] == [0.5, 0.5, 0.5]
    assert (video["patch_size"], video["merge_size"], video["temporal_patch_size"]) == (16, 2, 2)
    assert processor.video_processor.size.longest_edge == video["size"]["longest_edge"]


# --- the adapter's reproduction of the processor and get_rope_index --------------------------------------------

def trained_layout_text(times: list[list[float]], cells: int, question: str, layout: str) -> str:
    """The sequence Qwen3-VL was trained on (Qwen's release, transformers 4.57 and 5.25), written out: each frame
    pair's `<t seconds><|vision_start|>pads<|vision_end|>` block in place of the template's whole video wrapper."""
    blocks = "".join(f"<{(t[0] + t[-1]) / 2:.1f} seconds><|vision_start|>" + "<|video_pad|>" * cells + "<|vision_end|>"
                     for t in times)
    before, after = "<|im_start|>user\n", f"{question}<|im_end|>\n<|im_start|>assistant\n"
    return before + blocks + after if layout == "prefix-first" else blocks + before + after


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.inference_mode()
def test_chunks_are_the_processors_tokens_at_the_models_positions(checkpoint, processor, model, frames, layout):
    """Prefix + every chunk's tokens (timestamp text, vision start/end, pads) + question == the processor's
    input_ids == the trained layout (no doubled vision start/end around the video), and the positions the engine
    gives them == `get_rope_index` over the whole sequence."""
    engine = make_engine(checkpoint, Full(), layout=layout)
    cache = engine.prefill(frames, fps=FPS)
    a = engine.adapter
    cells = 2 * 3  # 64x96 frames: 2x3 merged cells
    times = [[i / FPS for i in range(2 * chunk, min(2 * chunk + 2, len(frames)))] for chunk in range(cache.num_chunks)]
    ids = a.prefix_ids(layout).tolist()
    for chunk, tokens in enumerate(cache.chunk_tokens):
        opening, closing = a.patch_ids(tuple(times[chunk]), cells)
        assert tokens == len(opening) + cells + len(closing)
        ids += list(opening) + [a.video_token_id] * cells + list(closing)
    answer = a.answer_inputs(QUESTION, cache.cursor, layout)
    ids += answer.prompt_ids.tolist()
    ref = processor_inputs(processor, frames, list(range(len(frames))), FPS, QUESTION, layout=layout)
    trained = processor.tokenizer(trained_layout_text(times, cells, QUESTION, layout), add_special_tokens=False)
    assert ref.input_ids[0].tolist() == trained["input_ids"]  # the installed processor builds the trained layout
    assert ids == ref.input_ids[0].tolist()
    assert processor.tokenizer.decode(ids).count("<|vision_start|>") == cache.num_chunks == 4
    positions = torch.cat([cache.position_ids, answer.position_ids], dim=1)
    expected, _ = model.model.get_rope_index(ref.input_ids, ref.mm_token_type_ids, video_grid_thw=ref.video_grid_thw)
    assert torch.equal(positions, expected[:, 0])
    assert answer.next_position == int(expected.max()) + 1


def test_pixels_equal_the_video_processor(checkpoint, processor, frames):
    engine = make_engine(checkpoint, Full())
    size = engine.adapter.frame_size(70, 100, SAMPLING, num_frames=len(frames))
    ref = processor_inputs(processor, frames, list(range(len(frames))), FPS, QUESTION)
    assert size == ref.frame_size == (64, 96)
    assert torch.equal(engine.adapter.preprocess(frames, size).pixel_values, ref.pixel_values_videos)


@pytest.mark.parametrize(("indices", "fps"), [([0, 1], 2.0), ([2, 3], 0.7), ([17, 21], 7.0), ([29], 7.0),
                                             ([5], 30.0)])
def test_timestamps_are_the_processors(checkpoint, processor, indices, fps):
    """A chunk's time (pairs, an odd last frame, uneven sampling) is `_calculate_timestamps`, written `{:.1f}`."""
    a = make_engine(checkpoint, Full()).adapter
    want = processor._calculate_timestamps(list(indices), fps, 2)[0]
    opening, closing = a.patch_ids(tuple(i / fps for i in indices), 3)
    assert processor.tokenizer.decode(list(opening)) == f"<{want:.1f} seconds><|vision_start|>"
    assert processor.tokenizer.decode(list(closing)) == "<|vision_end|>"


# --- exactness against one forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fps", [FPS, 0.7])
def test_full_equals_one_forward_of_the_plain_model(checkpoint, model, frames, layout, fps):
    """Per-chunk K/V, the answer logits at every generated step and the greedy tokens equal one forward."""
    report = check_against_transformers(checkpoint, frames, fps=fps, sampling=SAMPLING, layout=layout,
                                        question=QUESTION, max_new_tokens=6, model=model)
    report.assert_exact(1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_variant_equals_one_forward_of_the_plain_model(tmp_path_factory, frames, layout):
    """Qwen3-VL-MoE (model_type qwen3_vl_moe): same layout and positions, expert MLPs in the text layers."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_vl_moe") / "tiny", "qwen3_vl_moe")
    model = load_reference_model(path)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    report = check_against_transformers(str(path), frames, fps=FPS, sampling=SAMPLING, layout=layout,
                                        question=QUESTION, max_new_tokens=6, model=model)
    report.assert_exact(1e-4)


@torch.inference_mode()
def test_several_chunks_per_step_equal_one_per_step_for_full(checkpoint, frames):
    """Deepstack features and the visual mask of k chunks in one decoder call land on each chunk's own tokens."""
    one = make_engine(checkpoint, Full()).prefill(frames, fps=FPS)
    three = make_engine(checkpoint, Full(), chunks_per_step=3).prefill(frames, fps=FPS)
    assert three.chunk_tokens == one.chunk_tokens and torch.equal(three.position_ids, one.position_ids)
    for layer in range(one.model.num_layers):
        for x, y in zip(three.layer_kv(layer), one.layer_kv(layer)):
            assert (x - y).abs().max() <= 1e-5


@torch.inference_mode()
def test_a_video_file_equals_the_processor_on_its_sampled_frames(checkpoint, processor, model, tmp_path):
    """From a file sampled unevenly (30 frames at 7 fps -> 8 frames, indices 0, 4, 8, 12, 17, ...), the chunks'
    timestamps are source index / source fps as the processor writes them, not multiples of 1 / sampled fps."""
    from statekv.video import open_video

    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_frames(30, 64, 96, seed=4), fps=7.0)
    engine = make_engine(checkpoint, Full())
    cache = engine.prefill(str(path))
    answer = engine.ask(cache, QUESTION, max_new_tokens=4, output_scores=True)
    indices = cache.video.frame_indices
    assert indices[:5] == [0, 4, 8, 12, 17]
    with open_video(str(path)) as source:
        frames = source.read(np.asarray(indices))
    inputs = processor_inputs(processor, frames, indices, cache.video.video_fps, QUESTION)
    assert "<1.4 seconds>" in processor.tokenizer.decode(inputs.input_ids[0])  # (8/7 + 12/7) / 2; j/fps gives 1.3
    ref = reference_forward(model, inputs.with_answer(answer.token_ids[:-1]))
    n_ctx = cache.prefix_len + cache.num_video_tokens
    assert torch.equal(cache.position_ids, ref.position_ids[:, :n_ctx])
    for layer in range(cache.model.num_layers):
        keys, values = cache.layer_kv(layer)
        assert (keys - ref.keys[layer][:, :n_ctx]).abs().max() <= 1e-4
        assert (values - ref.values[layer][:, :n_ctx]).abs().max() <= 1e-4
    steps = ref.logits[inputs.prompt_len - 1:]
    assert max(float((s - r).abs().max()) for s, r in zip(answer.scores, steps)) <= 1e-4
    assert steps.argmax(-1).tolist() == answer.token_ids


@torch.inference_mode()
def test_vision_and_deepstack_per_chunk_equal_the_whole_video(checkpoint, frames):
    a = make_engine(checkpoint, Full()).adapter
    size = (64, 96)
    whole, whole_deep = a.video_features(frames, size, deepstack=True)
    parts = [a.video_features(frames[t:t + 2], size, deepstack=True) for t in range(0, len(frames), 2)]
    scale = whole.abs().max()
    assert (torch.cat([p[0] for p in parts]) - whole).abs().max() <= 1e-5 * scale
    assert len(whole_deep) == len(a.config.vision_config.deepstack_visual_indexes)
    for layer, deep in enumerate(whole_deep):
        assert (torch.cat([p[1][layer] for p in parts]) - deep).abs().max() <= 1e-5 * deep.abs().max()
    assert torch.equal(a.video_features(frames, size), whole)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", [StateKV(capacity=10_000), Window(capacity=10_000)])
@torch.inference_mode()
def test_policies_with_room_for_everything_equal_full(checkpoint, frames, policy, layout):
    full_engine = make_engine(checkpoint, Full(), layout=layout)
    full = full_engine.prefill(frames, fps=FPS)
    engine = make_engine(checkpoint, policy, layout=layout)
    cache = engine.prefill(frames, fps=FPS)
    assert cache.num_video_tokens <= policy.capacity
    assert torch.equal(cache.position_ids, full.position_ids) and cache.chunk_tokens == full.chunk_tokens
    for layer in range(cache.model.num_layers):
        for x, y in zip(cache.layer_kv(layer), full.layer_kv(layer)):
            assert (x - y).abs().max() <= 1e-5
    want = full_engine.ask(full, QUESTION, max_new_tokens=6, output_scores=True)
    got = engine.ask(cache, QUESTION, max_new_tokens=6, output_scores=True)
    assert got.token_ids == want.token_ids
    assert max(float((x - y).abs().max()) for x, y in zip(got.scores, want.scores)) <= 1e-4


@pytest.mark.parametrize(("budget", "size"), [({"size": {"shortest_edge": 4096, "longest_edge": 7 * 48 * 64}}, (32, 64)),
                                            ({"cap_pixels_per_frame": True, "max_video_tokens": 2}, (32, 64))])
def test_frame_size_follows_the_whole_video_pixel_budget(checkpoint, tmp_path, frames, model, budget, size):
    """Qwen3-VL's `size` bounds T·H·W over all frames (and `cap_pixels_per_frame` each frame's share): with a
    small budget the engine shrinks frames exactly as the processor does for the same number of frames, and still
    equals one forward."""
    small = tmp_path / "small_budget"
    shutil.copytree(checkpoint, small)
    config_path = small / "video_preprocessor_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **budget}))
    engine = make_engine(str(small), Full())
    assert engine.prefill(frames, fps=FPS).video.frame_size == size
    processor = load_reference_processor(str(small))
    assert processor_inputs(processor, frames, list(range(7)), FPS, QUESTION).frame_size == size  # its own choice
    report = check_against_transformers(str(small), frames, fps=FPS, sampling=SAMPLING, layout="prefix-first",
                                        question=QUESTION, max_new_tokens=3, model=model, engine=engine)
    report.assert_exact(1e-4)


@torch.inference_mode()
def test_reference_forward_is_the_models_own_generation(checkpoint, processor, model, frames):
    """The harness's one forward agrees with `generate` of the plain model (greedy, its own positions)."""
    inputs = processor_inputs(processor, frames, list(range(len(frames))), FPS, QUESTION)
    model.model.rope_deltas = None
    generated = model.generate(**inputs.as_model_inputs(), max_new_tokens=4, do_sample=False)[0, inputs.prompt_len:]
    out = reference_forward(model, inputs.with_answer(generated[:-1].tolist()))
    assert out.logits[inputs.prompt_len - 1:].argmax(-1).tolist() == generated.tolist()


# --- through the store and the service ------------------------------------------------------------------------------

@torch.inference_mode()
def test_store_and_service_answer_like_the_in_memory_cache(checkpoint, frames, store_root):
    """prefill_to_store -> load_cache -> ask == ask on the in-memory cache; the query service answers the same."""
    from pipelines.serving.service import QueryService
    from statekv.store import load_cache, prefill_to_store

    root, options = store_root
    engine = make_engine(checkpoint, StateKV(capacity=16))
    want = engine.ask(engine.prefill(frames, fps=FPS), QUESTION, max_new_tokens=6, output_scores=True)
    prefill_to_store(engine, frames, f"{root}/clip", fps=FPS, storage_options=options)
    loaded = load_cache(f"{root}/clip", storage_options=options)
    assert loaded.model.model_type == "qwen3_vl"
    got = engine.ask(loaded, QUESTION, max_new_tokens=6, output_scores=True)
    assert got.token_ids == want.token_ids
    assert max(float((x - y).abs().max()) for x, y in zip(got.scores, want.scores)) == 0.0
    service = QueryService(engine, root, storage_options=options, lru_bytes=16 << 20)
    reply = service.ask(video_id="clip", question=QUESTION, max_new_tokens=6)
    assert reply["token_ids"] == want.token_ids and reply["answer"] == want.text
    assert service.counters["vision_tower_calls"] == service.counters["prefill_calls"] == 0
    engine.prefill(frames[:4], fps=FPS)  # every tower call goes through video_features, which the service counts
    assert service.counters["vision_tower_calls"] == 1  # both chunks' frames in one batch (vision_batch_frames)
