"""Small deterministic synthetic videos for tests: frames in memory and files encoded with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np


def synthetic_frames(num_frames: int, height: int = 56, width: int = 84, *, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB: a seeded colour gradient with a bright square moving diagonally.

    Each frame also carries its index in a top-left bar's brightness, so frames stay distinguishable after lossy
    encoding and long clips (where the square's path repeats).
    """
    if num_frames < 0 or height < 8 or width < 8:
        raise ValueError(f"need num_frames >= 0 and sides >= 8, got {num_frames}x{height}x{width}")
    rng = np.random.default_rng(seed)
    lo, hi = rng.uniform(0, 96, size=3), rng.uniform(160, 255, size=3)
    ys = np.linspace(0.0, 1.0, height)[:, None, None]  # (H, 1, 1)
    xs = np.linspace(0.0, 1.0, width)[None, :, None]  # (1, W, 1)
    mix = np.array([1.0, 0.0, 0.5]) * xs + np.array([0.0, 1.0, 0.5]) * ys  # (H, W, 3)
    background = (lo + (hi - lo) * mix / mix.max()).astype(np.uint8)  # (H, W, 3)
    side = max(4, min(height, width) // 4)
    square = rng.integers(200, 256, size=3, dtype=np.uint8)
    frames = np.broadcast_to(background, (num_frames, height, width, 3)).copy()  # (T, H, W, 3)
    bar_h, bar_w = max(2, height // 8), max(4, width // 4)
    for t in range(num_frames):
        y = (2 * t) % (height - side)
        x = (3 * t) % (width - side)
        frames[t, y : y + side, x : x + side] = square
        frames[t, :bar_h, :bar_w] = (t * 37) % 256
    return frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 4.0, *, codec: str = "libx264",
                lossless: bool = False) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames to `path` as yuv420p (H and W must be even); `lossless=True` stores
    the RGB exactly instead (H.264 RGB at qp 0: decoders give back the very pixels), whatever `codec` says."""
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {height}x{width}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else codec,
                                      rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24" if lossless else "yuv420p"
        if lossless:
            stream.options = {"qp": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


def write_vfr_video(path: str | os.PathLike, frames: np.ndarray, times: list[float] | np.ndarray, *,
                    codec: str = "libx264") -> None:
    """Encode frames shown at irregular `times` (seconds, increasing), as phones record variable frame rate.

    Timestamps are stored in milliseconds; the container's average rate is then far from any one interval.
    """
    import av

    if len(times) != len(frames) or np.any(np.diff(times) <= 0):
        raise ValueError("need one increasing time per frame")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    base = Fraction(1, 1000)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = base
        stream.codec_context.time_base = base
        for rgb, t in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(float(t) * 1000), base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
