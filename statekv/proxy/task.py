"""The proxy task: synthetic videos and questions whose one-word answers sit in known frames.

A video is a run of colour *segments* (each a few two-frame chunks of one solid colour, 8 colours) with one to
three *needle* chunks carrying the same white shape (4 shapes). Exactly one colour comes back: it fills two
segments with at least one other colour between them. Every question has one exact one-word answer and names the
chunks that hold its evidence:

| type | question | needs |
| --- | --- | --- |
| shape | What shape appeared? | the needle chunk(s) |
| after | What colour came right after the first shape? | the chunk after the first needle (order) |
| first | What colour was the first frame? | chunk 0 |
| last | What colour was the last frame? | the last chunk |
| count | How many shapes appeared? | every needle chunk (counting) |
| repeat | Which colour came back later? | two distant segments of one colour (a relation, see below) |

"repeat" is the question whose evidence is a relation across distant frames: no single chunk shows it. The
direct way for a question token to find it is a video token that already encodes "my colour was here before",
and a chunk can only encode that while it is prefilled, and only if the earlier segment is still in what it
attends to (with `Window`, the recent window; with `StateKV`, the carried state): per-chunk KV stored afterwards
cannot add it.

A chunk is the Qwen2-VL temporal patch (2 frames); the first needle ends its segment, so "after" is never the
needle's own background. Generation is a pure function of the seed (numpy's PCG64), so held-out sets are fixed by
their seed. The frames are uint8 (T, H, W, 3) RGB, usable directly as `Engine.prefill(frames, fps=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FRAME_SIZE = 56  # pixels per side: with 28-px merged cells, 4 video tokens per chunk
FRAMES_PER_CHUNK = 2  # Qwen2-VL's temporal patch: the chunk is drawn as one unit
FPS = 2.0  # the sampling rate the videos are stamped with (statekv's default), so chunk i spans [i, i + 1) s

COLOURS: dict[str, tuple[int, int, int]] = {  # well apart in RGB, none near the shapes' white
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 215, 40),
    "cyan": (40, 200, 210), "magenta": (200, 40, 190), "orange": (240, 130, 20), "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "triangle", "cross")
SHAPE_RGB = (250, 250, 250)
COUNT_WORDS = ("one", "two", "three")
MAX_NEEDLES = len(COUNT_WORDS)

QUESTIONS: dict[str, str] = {
    "shape": "What shape appeared?",
    "after": "What colour came right after the first shape?",
    "first": "What colour was the first frame?",
    "last": "What colour was the last frame?",
    "count": "How many shapes appeared?",
    "repeat": "Which colour came back later?",
}
QUESTION_TYPES = tuple(QUESTIONS)
ANSWER_WORDS = (*COLOURS, *SHAPES, *COUNT_WORDS)  # every answer is one of these


@dataclass(frozen=True)
class Question:
    """One question about a video: its type, text, exact answer, and the chunks holding the evidence."""

    type: str
    text: str
    answer: str
    evidence: tuple[int, ...]  # chunk indices


@dataclass
class ProxyVideo:
    """A generated video, what is in it, and its questions."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    chunk_colours: list[str]  # background colour of each chunk
    needles: list[int]  # chunks carrying the shape, increasing
    shape: str
    repeat_segments: tuple[int, int]  # first chunk of the two segments of the colour that comes back
    fps: float = FPS
    questions: dict[str, Question] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_colours)

    def chunk_time(self, chunk: int) -> tuple[float, float]:
        """Start and end (seconds) of a chunk in the video."""
        return chunk * FRAMES_PER_CHUNK / self.fps, (chunk + 1) * FRAMES_PER_CHUNK / self.fps

    def describe(self) -> str:
        """What the video shows, in words a viewer can check: the segments' colours and where the shapes are."""
        parts, start = [], 0
        for i in range(1, self.num_chunks + 1):
            if i == self.num_chunks or self.chunk_colours[i] != self.chunk_colours[start]:
                a, b = self.chunk_time(start)[0], self.chunk_time(i - 1)[1]
                parts.append(f"{self.chunk_colours[start]} {a:g}-{b:g} s")
                start = i
        shapes = ", ".join(f"{self.chunk_time(c)[0]:g}-{self.chunk_time(c)[1]:g} s" for c in self.needles)
        return f"colours: {'; '.join(parts)}. A white {self.shape} at {shapes}."


def shape_mask(shape: str, size: int = FRAME_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a centred shape about 2/3 of the frame wide."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c, r = size / 2, size / 3  # centre, half extent
    dy, dx = y - c, x - c
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return (np.abs(dy) <= r) & (np.abs(dx) <= r / 3) | (np.abs(dx) <= r) & (np.abs(dy) <= r / 3)  # cross


def _partition(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """`total` split into `parts` positive integers, uniformly over compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([])
    edges = [0, *cuts.tolist(), total]
    return [int(b - a) for a, b in zip(edges, edges[1:])]


def make_video(num_frames: int, seed: int, *, jitter: float = 0.0, noise: float = 0.0) -> ProxyVideo:
    """A video of `num_frames` frames (even, >= 8) and its questions, a pure function of `seed`.

    `jitter` moves each segment's colour by up to that many levels per channel and `noise` adds per-pixel Gaussian
    noise of that std (training augmentation: robustness to a codec's small colour shifts); 0 draws exact colours.
    """
    if num_frames < 8 or num_frames % FRAMES_PER_CHUNK:
        raise ValueError(f"num_frames must be even and >= 8, got {num_frames}")
    rng = np.random.default_rng(seed)
    n_chunks = num_frames // FRAMES_PER_CHUNK
    n_segments = int(rng.integers(3, min(len(COLOURS), n_chunks) + 1))
    # colours: n_segments - 1 distinct ones, one of them placed again at a later, non-adjacent segment
    distinct = [str(c) for c in rng.permutation(list(COLOURS))[:n_segments - 1]]
    first_seg = int(rng.integers(0, n_segments - 2))
    back_seg = int(rng.integers(first_seg + 2, n_segments))
    order = distinct[:back_seg] + [distinct[first_seg]] + distinct[back_seg:]
    lengths = _partition(rng, n_chunks, n_segments)
    seg_start = np.cumsum([0, *lengths[:-1]]).tolist()
    chunk_colours = [c for c, n in zip(order, lengths) for _ in range(n)]
    # needles: the first one ends a segment that is not the last, the others anywhere after it
    needle_seg = int(rng.integers(0, n_segments - 1))
    first_needle = seg_start[needle_seg] + lengths[needle_seg] - 1
    later = np.arange(first_needle + 1, n_chunks)
    count = int(rng.integers(1, MAX_NEEDLES + 1))
    count = min(count, 1 + len(later))
    needles = sorted([first_needle, *rng.choice(later, size=count - 1, replace=False).tolist()])
    shape = str(SHAPES[int(rng.integers(len(SHAPES)))])

    frames = np.empty((num_frames, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)  # (T, H, W, 3)
    mask = shape_mask(shape)
    seg_rgb = {}
    for s, colour in enumerate(order):
        rgb = np.array(COLOURS[colour], dtype=np.float64)
        seg_rgb[s] = np.clip(rgb + rng.uniform(-jitter, jitter, size=3), 0, 255) if jitter else rgb
    chunk_seg = [s for s, n in enumerate(lengths) for _ in range(n)]
    for c in range(n_chunks):
        for f in range(c * FRAMES_PER_CHUNK, (c + 1) * FRAMES_PER_CHUNK):
            img = np.broadcast_to(seg_rgb[chunk_seg[c]], (FRAME_SIZE, FRAME_SIZE, 3)).copy()
            if c in needles:
                img[mask] = SHAPE_RGB
            if noise:
                img = img + rng.normal(0.0, noise, size=img.shape)
            frames[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    video = ProxyVideo(frames, chunk_colours, needles, shape, (seg_start[first_seg], seg_start[back_seg]))
    back = distinct[first_seg]
    video.questions = {
        "shape": Question("shape", QUESTIONS["shape"], shape, tuple(needles)),
        "after": Question("after", QUESTIONS["after"], chunk_colours[first_needle + 1], (first_needle + 1,)),
        "first": Question("first", QUESTIONS["first"], chunk_colours[0], (0,)),
        "last": Question("last", QUESTIONS["last"], chunk_colours[-1], (n_chunks - 1,)),
        "count": Question("count", QUESTIONS["count"], COUNT_WORDS[len(needles) - 1], tuple(needles)),
        "repeat": Question("repeat", QUESTIONS["repeat"], back,
                           tuple(c for c in range(n_chunks) if chunk_seg[c] in (first_seg, back_seg))),
    }
    return video


def token_labels(video: ProxyVideo, tokens_per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per video token (chunk-major), the index of its chunk's colour in COLOURS and of its shape in
    ("none", *SHAPES): the targets of the training's auxiliary vision head."""
    colour_ids = [list(COLOURS).index(c) for c in video.chunk_colours]
    shape_ids = [1 + SHAPES.index(video.shape) if c in video.needles else 0 for c in range(video.num_chunks)]
    return (np.repeat(np.array(colour_ids), tokens_per_chunk), np.repeat(np.array(shape_ids), tokens_per_chunk))


def held_out_seed(length: int, index: int, *, base: int = 1_000_000) -> int:
    """The seed of held-out video `index` at `length` frames: far from any training seed (those are < base)."""
    return base + length * 10_000 + index
