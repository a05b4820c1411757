"""Streaming prefill and answering against one full forward pass of the whole sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import statekv
from statekv import Engine, Full, StateKV, Window
from statekv.errors import EmptyVideoError, ModelMismatchError, UnsupportedModelError, VideoDecodeError, VideoNotFoundError
from statekv.profiling import count_flops, peak_memory
from statekv.retrieval import TopK
from statekv.testing.videos import synthetic_frames, write_video
from statekv.testing.reference import check_against_transformers
from statekv.video import SamplingConfig

# 56x84 frames stay 56x84: a 4x6 patch grid, 6 LLM tokens per chunk (two frames)
SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
FPS = 2.0
QUESTION = "What happens after the dog enters?"


def make_engine(path: str, policy, **kwargs) -> Engine:
    return Engine.from_pretrained(path, policy=policy, device="cpu", dtype=torch.float32, sampling=SMALL, **kwargs)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synthetic_frames(12, 56, 84, seed=3)  # 6 chunks of 6 tokens


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
@pytest.mark.parametrize("fps", [2.0, 0.7])
def test_full_policy_equals_one_forward_of_the_plain_model(tiny_checkpoint, frames, layout, fps):
    """Full(): per-chunk K/V, answer logits at every step and greedy tokens equal ONE forward of the plain
    transformers model over the processor's sequence (pads, pixel_values_videos, grids, mm_token_type_ids,
    second_per_grid_ts), the model computing its own positions. fps 0.7 gives Qwen2.5-VL a fractional interval."""
    report = check_against_transformers(tiny_checkpoint, frames, fps=fps, sampling=SMALL, layout=layout)
    report.assert_exact(1e-4)
    assert report.context_tokens == (20 if layout == "prefix-first" else 1) + 36


@torch.inference_mode()
def test_the_reference_check_sees_positions(tiny_checkpoints, frames):
    """The original Qwen rule (text after the video at max position + 1) is not what transformers 5.x computes:
    the same check must then fail, so it does compare positions, not just token order."""
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SMALL, adapter_options={"position_rule": "qwen"})
    report = check_against_transformers(tiny_checkpoints["qwen2_vl"], frames, fps=FPS, sampling=SMALL,
                                        layout="prefix-first", engine=engine)
    assert report.max_key_diff <= 1e-4  # the video's own positions agree
    assert report.max_logit_diff > 1e-3  # the question's do not


@torch.inference_mode()
def test_vision_per_chunk_equals_whole_video(tiny_checkpoint, frames):
    adapter = make_engine(tiny_checkpoint, Full()).adapter
    size = adapter.frame_size(56, 84, SMALL)
    whole = adapter.video_features(frames, size)
    per_chunk = [adapter.video_features(frames[t:t + 2], size) for t in range(0, len(frames), 2)]
    assert (torch.cat(per_chunk) - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_preprocessing_reads_the_checkpoints_preprocessor_config(tmp_path, frames):
    """mean/std and pixel bounds come from the checkpoint's video_preprocessor_config.json, not CLIP defaults."""
    from statekv.testing.checkpoints import preprocessor_config, save_tiny_checkpoint

    config = preprocessor_config("qwen2_vl", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                 min_pixels=28 * 28, max_pixels=56 * 56)
    path = save_tiny_checkpoint(tmp_path / "half", "qwen2_vl", preprocessor=config)
    adapter = Engine.from_pretrained(path, policy=Full(), device="cpu", dtype=torch.float32).adapter
    assert adapter.vision.image_mean == (0.5, 0.5, 0.5) and adapter.vision.image_std == (0.5, 0.5, 0.5)
    assert adapter.frame_size(56, 84, SamplingConfig()) == (28, 56)  # max_pixels from the config
    assert adapter.frame_size(56, 84, SMALL) == (56, 84)  # a SamplingConfig bound overrides it
    pixels = adapter._pixels(frames[:2], (56, 84)).pixel_values
    assert float(pixels.min()) >= -1.0 - 1e-6 and float(pixels.max()) <= 1.0 + 1e-6  # (x - 0.5) / 0.5
    assert float(pixels.min()) < -0.5


def _assert_same_cache(a: statekv.VideoKVCache, b: statekv.VideoKVCache, atol: float = 1e-5) -> None:
    assert a.num_chunks == b.num_chunks and a.chunk_tokens == b.chunk_tokens
    assert torch.equal(a.position_ids, b.position_ids)
    for layer in range(a.model.num_layers):
        for x, y in zip(a.layer_kv(layer), b.layer_kv(layer)):
            assert (x - y).abs().max() <= atol


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
@pytest.mark.parametrize("policy", [StateKV(capacity=10_000), Window(capacity=10_000), StateKV(capacity=36, decay=0.5)])
@torch.inference_mode()
def test_policies_with_room_for_everything_equal_full(tiny_checkpoint, frames, policy, layout):
    full_engine = make_engine(tiny_checkpoint, Full(), layout=layout)
    full = full_engine.prefill(frames, fps=FPS)
    engine = make_engine(tiny_checkpoint, policy, layout=layout)
    cache = engine.prefill(frames, fps=FPS)
    assert cache.num_video_tokens <= policy.capacity
    _assert_same_cache(full, cache)
    want = full_engine.ask(full, QUESTION, max_new_tokens=6, output_scores=True)
    got = engine.ask(cache, QUESTION, max_new_tokens=6, output_scores=True)
    assert got.token_ids == want.token_ids
    assert max((x - y).abs().max() for x, y in zip(got.scores, want.scores)) <= 1e-4


@pytest.mark.parametrize("policy", [StateKV(capacity=8), Window(capacity=8), StateKV(capacity=8, decay=0.9)])
@torch.inference_mode()
def test_small_capacity_bounds_the_state(tiny_checkpoints, frames, policy):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], policy)
    seen: list[int] = []
    cache = engine.prefill(frames, fps=FPS, progress=lambda done, total: seen.append(done))
    assert seen == list(range(1, 7))
    assert cache.state_sizes() == [8] * engine.adapter.layout.num_layers
    for state in cache.state:
        assert state.keys.shape[:2] == (engine.adapter.layout.num_kv_heads, 8)
        assert bool((state.token_index.diff(dim=1) > 0).all())  # temporal order, no duplicates
    # every chunk's own KV is kept in full for answering
    assert len(cache.chunks) == cache.num_chunks == 6
    assert cache.frame_keys(0).shape[1] == cache.num_video_tokens == 36


@torch.inference_mode()
def test_chunks_per_step_equals_one_chunk_per_step_for_full(tiny_checkpoints, frames):
    one = make_engine(tiny_checkpoints["qwen2_5_vl"], Full()).prefill(frames, fps=FPS)
    three = make_engine(tiny_checkpoints["qwen2_5_vl"], Full(), chunks_per_step=3).prefill(frames, fps=FPS)
    _assert_same_cache(one, three)
    assert [c.frame_range for c in three.chunks] == [(i, i + 2) for i in range(0, 12, 2)]


@torch.inference_mode()
def test_asking_does_not_change_the_cache_and_stream_matches(tiny_checkpoints, frames):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    cache = engine.prefill(frames, fps=FPS)
    before = [t.clone() for layer in range(2) for t in cache.layer_kv(layer)]
    first = engine.ask(cache, QUESTION, max_new_tokens=8)
    other = engine.ask(cache, "Describe the video.", max_new_tokens=8)
    again = engine.ask(cache, QUESTION, max_new_tokens=8)
    after = [t for layer in range(2) for t in cache.layer_kv(layer)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert first.token_ids == again.token_ids and first.text == again.text
    assert other.prompt_ids != first.prompt_ids
    events = list(engine.stream(cache, QUESTION, max_new_tokens=8))
    assert [e.token_id for e in events] == first.token_ids
    assert "".join(e.text for e in events) == first.text
    assert len(first.token_ids) == 8 or first.finish_reason == "eos"


@pytest.mark.parametrize("retrieval", [None, TopK(k=2, recent=1)])
def test_a_stream_resumed_by_other_threads(tiny_checkpoints, frames, retrieval):
    """Regression (issue 18, point 1): `Engine.stream` yielded from inside `torch.inference_mode()`. A server resumes
    a stream's generator on whichever pool thread is free, and inference mode is per thread: the mode stayed on in
    the thread that ran a step and was off where the next step ran (on inference tensors: "Inplace update to
    inference tensor outside InferenceMode"). Now each step enters it, and no thread is left in it."""
    import threading

    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    with torch.inference_mode():
        cache = engine.prefill(frames, fps=FPS)
        want = engine.ask(cache, QUESTION, max_new_tokens=8, retrieval=retrieval).token_ids
    events = engine.stream(cache, QUESTION, max_new_tokens=8, retrieval=retrieval)

    got, modes, errors = [], [], []

    def step() -> None:
        try:
            event = next(events, None)
        except Exception as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)
            event = None
        if event is not None:
            got.append(event.token_id)
        modes.append(torch.is_inference_mode_enabled())  # what the step left in its thread

    while not errors and len(modes) == len(got):  # each step on a thread of its own, until the stream ends
        thread = threading.Thread(target=step)
        thread.start()
        thread.join(60)
    assert not errors, errors[0]
    assert got == want and not any(modes)
    assert not torch.is_inference_mode_enabled()


@torch.inference_mode()
def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny_checkpoints, frames):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    cache = engine.prefill(frames[:4], fps=FPS)
    greedy = engine.ask(cache, QUESTION, max_new_tokens=6)
    a = engine.ask(cache, QUESTION, max_new_tokens=6, temperature=1.0, seed=7)
    b = engine.ask(cache, QUESTION, max_new_tokens=6, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    nucleus = engine.ask(cache, QUESTION, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus.token_ids == greedy.token_ids


@torch.inference_mode()
def test_eos_stops_generation(tiny_checkpoints, frames):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    cache = engine.prefill(frames[:4], fps=FPS)
    greedy = engine.ask(cache, QUESTION, max_new_tokens=3)
    engine.adapter.eos_token_ids = {greedy.token_ids[1]}
    stopped = engine.ask(cache, QUESTION, max_new_tokens=3)
    assert stopped.token_ids == greedy.token_ids[:2] and stopped.finish_reason == "eos"


def test_prefill_from_a_video_file_samples_at_fps(tiny_checkpoints, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_frames(20, 56, 84), fps=4.0)  # 5 s at 4 fps → 10 frames at 2 fps
    engine = make_engine(tiny_checkpoints["qwen2_5_vl"], StateKV(capacity=8))
    cache = engine.prefill(str(path))
    assert len(cache.video.frame_indices) == 10 and cache.num_chunks == 5
    assert cache.video.sampled_fps == pytest.approx(2.0)
    assert cache.cursor["second_per_grid_t"] == pytest.approx(1.0)
    assert cache.chunks[1].timestamps == pytest.approx([cache.video.frame_indices[2] / 4.0,
                                                        cache.video.frame_indices[3] / 4.0])
    assert engine.ask(cache, QUESTION, max_new_tokens=2).token_ids


@pytest.mark.parametrize("rule", ["transformers", "qwen"])
def test_qwen2_5_vl_temporal_positions_follow_time(tiny_checkpoints, frames, rule):
    """Qwen2.5-VL: temporal patch t sits at start + ⌊t · seconds-per-patch · tokens-per-second⌋. Text after the
    video: start + max(grid_h, grid_w) / merge as transformers 5.x computes it, or max(positions) + 1 (rule "qwen")."""
    def prefill(family):
        engine = Engine.from_pretrained(tiny_checkpoints[family], policy=Full(), device="cpu", dtype=torch.float32,
                                        sampling=SMALL, adapter_options={"position_rule": rule})
        cache = engine.prefill(frames, fps=1.0)  # 2 s per temporal patch, 2 tokens per second → step 4
        first_text = int(engine.adapter.answer_inputs(QUESTION, cache.cursor, "prefix-first").position_ids[0, 0])
        return cache, first_text

    cache, first_text = prefill("qwen2_5_vl")
    start = cache.prefix_len
    assert [int(c.position_ids[0, 0]) for c in cache.chunks] == [start + 4 * t for t in range(6)]
    merged_w = 3  # 4x6 patches merged 2x2: 2x3
    assert first_text == (start + 4 * 5 + 1 if rule == "qwen" else start + merged_w)
    default = Engine.from_pretrained(tiny_checkpoints["qwen2_5_vl"], policy=Full(), device="cpu", sampling=SMALL)
    answer = default.adapter.answer_inputs(QUESTION, cache.cursor, "prefix-first")
    assert int(answer.position_ids[0, 0]) == first_text  # answers follow the rule the cache was made with
    qwen2, first_text = prefill("qwen2_vl")
    assert [int(c.position_ids[0, 0]) for c in qwen2.chunks] == [qwen2.prefix_len + t for t in range(6)]
    assert first_text == (qwen2.prefix_len + 5 + 1 if rule == "qwen" else qwen2.prefix_len + merged_w)


def _prefill_peak(engine: Engine, frames: np.ndarray) -> int:
    with torch.inference_mode(), peak_memory(engine.device) as report:
        engine.prefill(frames, fps=FPS, sink=lambda chunk: None, keep_chunks=False)
    return report.peak_bytes


def test_prefill_peak_memory_does_not_grow_with_video_length(tiny_checkpoints):
    short, long = synthetic_frames(8, 56, 84), synthetic_frames(32, 56, 84)  # 4 and 16 chunks
    # the vision tower's batch (vision_batch_frames) bounds its memory; both videos span several batches (the
    # first batch is encoded before the step cache exists, every later one beside it)
    statekv_engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8), vision_batch_frames=4)
    layout = statekv_engine.adapter.layout
    token_kv_bytes = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * 4  # K and V, float32
    extra_tokens = (32 - 8) // 2 * 6
    short_peak, long_peak = _prefill_peak(statekv_engine, short), _prefill_peak(statekv_engine, long)
    # less than one chunk's KV of difference: nothing on the device scales with the video
    assert abs(long_peak - short_peak) < 6 * token_kv_bytes, (short_peak, long_peak)
    full_engine = make_engine(tiny_checkpoints["qwen2_vl"], Full(), vision_batch_frames=4)
    full_short, full_long = _prefill_peak(full_engine, short), _prefill_peak(full_engine, long)
    # the same measurement sees Full's carried state grow by (at least) the KV of the extra tokens
    assert full_long - full_short >= extra_tokens * token_kv_bytes, (full_short, full_long)


def _prefill_flops(engine: Engine, frames: np.ndarray) -> int:
    with torch.inference_mode(), count_flops() as counter:
        engine.prefill(frames, fps=FPS, keep_chunks=False)
    return counter.get_total_flops()


def test_statekv_flops_grow_linearly_full_faster(tiny_checkpoints):
    sizes = [8, 16, 32]  # frames → 4, 8, 16 chunks
    statekv_engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    full_engine = make_engine(tiny_checkpoints["qwen2_vl"], Full())
    s = [_prefill_flops(statekv_engine, synthetic_frames(n, 56, 84)) for n in sizes]
    f = [_prefill_flops(full_engine, synthetic_frames(n, 56, 84)) for n in sizes]
    # linear: the cost of chunks 8..16 is twice the cost of chunks 4..8
    assert (s[2] - s[1]) == pytest.approx(2 * (s[1] - s[0]), rel=1e-3)
    # quadratic part: the same doubling costs Full clearly more than twice
    assert (f[2] - f[1]) > 2.05 * (f[1] - f[0])
    assert f[2] > s[2]


def test_bad_inputs_raise_clear_errors(tiny_checkpoints, tmp_path):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoNotFoundError, match="nope.mp4"):
        engine.prefill(str(missing))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        engine.prefill(str(junk))
    with pytest.raises(EmptyVideoError, match="no frames"):
        engine.prefill(np.zeros((0, 56, 84, 3), np.uint8), fps=2.0)
    with pytest.raises(statekv.VideoError, match="fps"):
        engine.prefill(synthetic_frames(4, 56, 84))


def test_unsupported_model_type_is_named(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*qwen2_5_vl, qwen2_vl") as info:
        Engine.from_pretrained(tmp_path, device="cpu")
    assert str(tmp_path) in str(info.value)


def test_cache_from_another_model_is_refused(tiny_checkpoints, frames):
    engine = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8))
    other = make_engine(tiny_checkpoints["qwen2_5_vl"], StateKV(capacity=8))
    cache = engine.prefill(frames[:4], fps=FPS)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        other.ask(cache, QUESTION)


@pytest.mark.parametrize("policy", [StateKV(capacity=8), Full(), Window(capacity=8)])
@torch.inference_mode()
def test_resuming_a_stream_equals_one_prefill(tiny_checkpoints, frames, policy):
    """Frames [0, 2n) in one go == [0, n) then resume with [n, 2n): same chunks, state, positions, answers."""
    engine = make_engine(tiny_checkpoints["qwen2_5_vl"], policy)
    whole = engine.prefill(frames, fps=FPS)
    first = engine.prefill(frames[:6], fps=FPS)
    resumed = engine.prefill(frames[6:], fps=FPS, resume_from=first)
    assert first.num_chunks == 3 and len(first.chunks) == 3  # the cache resumed from is left as it was
    _assert_same_cache(whole, resumed, atol=0.0)
    assert resumed.video.frame_indices == whole.video.frame_indices
    assert resumed.video.timestamps == pytest.approx(whole.video.timestamps)
    assert [c.frame_range for c in resumed.chunks] == [c.frame_range for c in whole.chunks]
    for a, b in zip(whole.state, resumed.state):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.token_index, b.token_index)
    assert resumed.cursor == whole.cursor
    assert engine.ask(resumed, QUESTION, max_new_tokens=5).token_ids == engine.ask(whole, QUESTION, max_new_tokens=5).token_ids


def test_resume_refuses_another_policy(tiny_checkpoints, frames):
    first = make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=8)).prefill(frames[:4], fps=FPS)
    with pytest.raises(ModelMismatchError, match="policy"):
        make_engine(tiny_checkpoints["qwen2_vl"], StateKV(capacity=16)).prefill(frames[4:], fps=FPS, resume_from=first)
