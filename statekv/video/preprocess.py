"""Qwen-style video preprocessing without torchvision: resize, rescale, normalise, patchify.

Reproduces transformers' `Qwen2VLVideoProcessor` (torchvision backend) on decoded uint8 frames: `smart_resize`,
antialiased bicubic resize, fused rescale+normalise with the layout's mean/std, odd-count padding and the
processor's patch order. Takes frames, returns model inputs; knows nothing about files or models: the family
adapter builds the `VisionLayout` from the checkpoint's preprocessor config (CLIP mean/std are only the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from statekv.profiling import PREPROCESS, timed

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen2-VL refuses more elongated frames


@dataclass(frozen=True)
class VisionLayout:
    """Vision-tower patch geometry and normalisation; defaults are the Qwen2-VL processor's."""

    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch
    merge_size: int = 2  # patches merged per side into one LLM token
    image_mean: tuple[float, float, float] = IMAGE_MEAN  # per channel, on the 0-1 scale
    image_std: tuple[float, float, float] = IMAGE_STD

    @property
    def factor(self) -> int:
        """Resized sides must be multiples of this (28 by default)."""
        return self.patch_size * self.merge_size


@dataclass
class PreprocessedFrames:
    """Model-ready pixels for one clip and the grid the vision tower needs."""

    pixel_values: torch.Tensor  # float32 (grid_t*grid_h*grid_w, 3*temporal_patch_size*patch_size**2)
    grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches
    size: tuple[int, int]  # resized (height, width) in pixels
    merge_size: int = 2  # patches merged per side into one LLM token

    @property
    def tokens(self) -> int:
        """LLM tokens these frames become after the vision merger."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Nearest (height, width) with both sides multiples of `factor` and area in [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} for {height}x{width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _as_nchw(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) array -> uint8 (n, 3, H, W) tensor view."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (n, H, W, 3) RGB, got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


def resize_frames(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize: uint8 (n, H, W, 3) -> uint8 (n, 3, height, width), as torchvision does it.

    On CPU torchvision hands uint8 bicubic straight to `interpolate`'s native uint8 kernel (Pillow's algorithm:
    Keys a=-0.5, rounded to uint8 between the horizontal and vertical passes); elsewhere it interpolates in
    float32, clamps and rounds. Both are reproduced, so outputs match transformers' processor on either device.
    """
    x = _as_nchw(frames)  # (n, 3, H, W)
    if tuple(x.shape[-2:]) == (height, width):
        return x.contiguous()
    if x.device.type == "cpu":
        out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.contiguous()  # (n, 3, height, width)


def patchify(
    frames: torch.Tensor, layout: VisionLayout = VisionLayout()
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Rescale, normalise and cut resized frames into flat patches in the Qwen2-VL processor's order.

    `frames`: uint8, or float on the same 0-255 scale, (n, 3, h, w) with h and w multiples of `layout.factor`.
    An odd n is padded by repeating the last frame. Returns float32 (grid_t*grid_h*grid_w, 3*tp*ps*ps) and
    (grid_t, grid_h, grid_w).
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (n>0, 3, h, w), got {tuple(frames.shape)}")
    n, c, h, w = frames.shape
    ps, tp, m = layout.patch_size, layout.temporal_patch_size, layout.merge_size
    if h % layout.factor or w % layout.factor:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {layout.factor}; resize it first")
    # Fused rescale + normalise as transformers does it: (x - 255*mean) / (255*std), in float32.
    mean = torch.tensor(layout.image_mean, dtype=torch.float32, device=frames.device) * 255.0
    std = torch.tensor(layout.image_std, dtype=torch.float32, device=frames.device) * 255.0
    x = frames.to(torch.float32).sub(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))  # (n, 3, h, w)
    if pad := -n % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        n += pad
    grid_t, grid_h, grid_w = n // tp, h // ps, w // ps
    x = x.view(grid_t, tp, c, grid_h // m, m, ps, grid_w // m, m, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (grid_t, gh/m, gw/m, m, m, C, tp, ps, ps)
    patches = x.reshape(grid_t * grid_h * grid_w, c * tp * ps * ps)
    return patches, (grid_t, grid_h, grid_w)


@timed(PREPROCESS)
def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    *,
    min_pixels: int,
    max_pixels: int,
    layout: VisionLayout = VisionLayout(),
    size: tuple[int, int] | None = None,
) -> PreprocessedFrames:
    """Resize uint8 (n, H, W, 3) frames (to `size`, else `smart_resize` of their own size) and patchify them.

    Preprocessing a clip in even-sized chunks and concatenating `pixel_values` equals doing it in one call.
    """
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if size is None:
        size = smart_resize(height, width, factor=layout.factor, min_pixels=min_pixels, max_pixels=max_pixels)
    elif size[0] % layout.factor or size[1] % layout.factor or min(size) <= 0:
        raise ValueError(f"size {size} must be positive multiples of {layout.factor}")
    resized = resize_frames(frames, size[0], size[1])  # (n, 3, h, w) uint8
    pixel_values, grid = patchify(resized, layout)
    return PreprocessedFrames(pixel_values=pixel_values, grid_thw=grid, size=tuple(size), merge_size=layout.merge_size)
