"""Qwen2-VL preprocessing without torchvision, checked against NumPy restatements of the published formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statekv.testing.videos import synthetic_frames
from statekv.video import (
    IMAGE_MEAN,
    IMAGE_STD,
    PreprocessedFrames,
    VisionLayout,
    patchify,
    preprocess_frames,
    resize_frames,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


# --- NumPy references -------------------------------------------------------------------------------------------


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel; antialiased resizes (Pillow, torch) use a = -0.5."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of antialiased bicubic weights: the kernel's support stretches by the downscale factor."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = keys_cubic((np.arange(lo, hi) - center + 0.5) / stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def numpy_resize(frames: np.ndarray, height: int, width: int, *, round_between_passes: bool) -> np.ndarray:
    """uint8 (n, H, W, 3) -> uint8 (n, 3, height, width): horizontal pass, then vertical."""
    x = np.einsum("ow,nhwc->nhoc", resize_weights(frames.shape[2], width), frames.astype(np.float64))
    if round_between_passes:  # uint8 kernels (Pillow, torch on CPU) store the intermediate image as uint8
        x = np.clip(np.floor(x + 0.5), 0, 255)
    x = np.einsum("oh,nhwc->nowc", resize_weights(frames.shape[1], height), x)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)


def numpy_patchify(frames: np.ndarray, ps: int = 14, tp: int = 2, m: int = 2) -> np.ndarray:
    """Rescale, normalise and cut (n, 3, h, w) frames patch by patch, in the processor's (t, h/2, w/2, 2, 2) order."""
    x = frames.astype(np.float64) / 255.0
    x = (x - np.array(IMAGE_MEAN)[:, None, None]) / np.array(IMAGE_STD)[:, None, None]
    if len(x) % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - len(x) % tp, axis=0)])
    grid_t, grid_h, grid_w = len(x) // tp, x.shape[2] // ps, x.shape[3] // ps
    rows = []
    for t in range(grid_t):
        for bh in range(grid_h // m):
            for bw in range(grid_w // m):
                for i in range(m):
                    for j in range(m):
                        y0, x0 = (bh * m + i) * ps, (bw * m + j) * ps
                        block = x[t * tp : (t + 1) * tp, :, y0 : y0 + ps, x0 : x0 + ps]  # (tp, C, ps, ps)
                        rows.append(block.transpose(1, 0, 2, 3).reshape(-1))  # C, tp, ps, ps
    return np.stack(rows)


# --- smart_resize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "min_pixels", "max_pixels", "expected"),
    [
        (480, 640, MIN_PIXELS, MAX_PIXELS, (476, 644)),  # within bounds: nearest multiples of 28
        (360, 640, MIN_PIXELS, MAX_PIXELS, (364, 644)),
        (1080, 1920, MIN_PIXELS, MAX_PIXELS, (560, 1008)),  # max_pixels clamp
        (720, 1280, MIN_PIXELS, MAX_PIXELS, (560, 1008)),
        (1920, 1080, MIN_PIXELS, MAX_PIXELS, (1008, 560)),
        (56, 84, MIN_PIXELS, MAX_PIXELS, (280, 392)),  # min_pixels clamp
        (10, 1000, MIN_PIXELS, MAX_PIXELS, (56, 3192)),
        (56, 84, 4 * 784, 16 * 784, (56, 84)),
        (100, 100, 784, 784, (28, 28)),
    ],
)
def test_smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, expected: tuple[int, int]) -> None:
    h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0


def test_smart_resize_refuses_extreme_aspect_ratio() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


# --- resize -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "size"),
    [
        ((56, 84), (28, 56)),  # downscale: the kernel widens
        ((120, 160), (56, 84)),
        ((56, 84), (84, 56)),  # up one way, down the other
        ((56, 84), (112, 168)),  # upscale
        ((56, 84), (280, 392)),
    ],
)
def test_resize_matches_numpy_bicubic(source: tuple[int, int], size: tuple[int, int]) -> None:
    frames = synthetic_frames(3, *source, seed=2)
    got = resize_frames(frames, *size)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 3, *size)
    expected = numpy_resize(frames, *size, round_between_passes=True)
    assert np.abs(got.numpy().astype(int) - expected).max() <= 1


def test_resize_to_own_size_is_identity() -> None:
    frames = synthetic_frames(2, 56, 84)
    np.testing.assert_array_equal(resize_frames(frames, 56, 84).numpy(), frames.transpose(0, 3, 1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resize_on_cuda_matches_float_bicubic() -> None:
    """Off the CPU torchvision resizes uint8 in float32 (no intermediate rounding); so must we."""
    frames = synthetic_frames(3, 56, 84, seed=2)
    got = resize_frames(torch.from_numpy(frames).cuda(), 112, 168).cpu().numpy()
    expected = numpy_resize(frames, 112, 168, round_between_passes=False)
    assert np.abs(got.astype(int) - expected).max() <= 1


# --- patchify and the whole pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 2, 5])
def test_patchify_matches_numpy_reference(num_frames: int) -> None:
    frames = resize_frames(synthetic_frames(num_frames, 56, 84, seed=3), 56, 112)  # (n, 3, 56, 112)
    patches, grid = patchify(frames)
    assert grid == ((num_frames + 1) // 2, 4, 8)
    assert patches.dtype == torch.float32 and tuple(patches.shape) == (grid[0] * 4 * 8, 3 * 2 * 14 * 14)
    np.testing.assert_allclose(patches.numpy(), numpy_patchify(frames.numpy()), rtol=0, atol=1e-5)
    float_patches, _ = patchify(frames.float())
    torch.testing.assert_close(float_patches, patches, rtol=0, atol=0)


def test_odd_frame_count_repeats_the_last_frame() -> None:
    frames = synthetic_frames(5, 56, 84)
    padded = np.concatenate([frames, frames[-1:]])
    odd = preprocess_frames(frames, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, size=(56, 84))
    even = preprocess_frames(padded, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, size=(56, 84))
    torch.testing.assert_close(odd.pixel_values, even.pixel_values, rtol=0, atol=0)
    assert odd.grid_thw == (3, 4, 6) and odd.tokens == 18


def test_patchify_rejects_sizes_off_the_grid() -> None:
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(torch.zeros(2, 3, 56, 70, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("source", "num_frames", "grid", "tokens"),
    [
        ((56, 84), 4, (2, 20, 28), 280),  # min_pixels clamp: upscaled to 280x392
        ((300, 410), 3, (2, 22, 30), 330),  # odd count; within bounds: 308x420
    ],
)
def test_preprocess_frames_matches_numpy_pipeline(
    source: tuple[int, int], num_frames: int, grid: tuple[int, int, int], tokens: int
) -> None:
    frames = synthetic_frames(num_frames, *source, seed=4)
    out = preprocess_frames(frames, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert isinstance(out, PreprocessedFrames)
    assert out.grid_thw == grid and out.tokens == tokens
    assert out.size == (grid[1] * 14, grid[2] * 14)
    assert tuple(out.pixel_values.shape) == (grid[0] * grid[1] * grid[2], 1176)
    resized = numpy_resize(frames, *out.size, round_between_passes=True)
    expected = numpy_patchify(resized)
    # One uint8 level of resize difference is at most 1 / (255 * min(std)) after normalisation.
    tolerance = 1.0 / (255 * min(IMAGE_STD)) + 1e-5
    assert np.abs(out.pixel_values.numpy() - expected).max() <= tolerance


def test_chunked_preprocessing_equals_one_call() -> None:
    frames = synthetic_frames(8, 56, 84, seed=5)
    whole = preprocess_frames(frames, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    parts = [preprocess_frames(frames[i : i + 4], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for i in (0, 4)]
    torch.testing.assert_close(torch.cat([p.pixel_values for p in parts]), whole.pixel_values, rtol=0, atol=0)
    assert sum(p.grid_thw[0] for p in parts) == whole.grid_thw[0]


def test_custom_layout() -> None:
    layout = VisionLayout(patch_size=16, temporal_patch_size=2, merge_size=2)
    out = preprocess_frames(synthetic_frames(2, 64, 96), min_pixels=64 * 96, max_pixels=64 * 96, layout=layout)
    assert out.size == (64, 96) and out.grid_thw == (1, 4, 6) and out.pixel_values.shape[1] == 3 * 2 * 16 * 16


def test_explicit_size_must_be_on_the_grid() -> None:
    with pytest.raises(ValueError, match="multiples of 28"):
        preprocess_frames(synthetic_frames(2), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, size=(50, 84))


def test_matches_transformers_video_processor() -> None:
    """Where torchvision exists, our output must equal transformers' own Qwen2-VL video processor."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    min_pixels, max_pixels = 16 * 28 * 28, 64 * 28 * 28
    processor = Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    kwargs = {"cap_pixels_per_frame": False} if hasattr(processor, "cap_pixels_per_frame") else {}
    for frames in (synthetic_frames(5, 56, 84, seed=6), synthetic_frames(4, 240, 320, seed=7)):
        expected = processor(videos=[frames], return_tensors="pt", do_sample_frames=False, **kwargs)
        ours = preprocess_frames(frames, min_pixels=min_pixels, max_pixels=max_pixels)
        assert expected["video_grid_thw"].tolist() == [list(ours.grid_thw)]
        torch.testing.assert_close(ours.pixel_values, expected["pixel_values_videos"])
