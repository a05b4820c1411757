"""Prefill benchmark: `Full`, `Window` and `StateKV` on synthetic videos of growing length.

For each policy and video length it measures
- wall time of the whole prefill and of every chunk (timestamped through `Engine.prefill(progress=...)`), the median
  of `repeats` runs, with the policies interleaved (every repetition runs every length and policy once, the policy
  order rotating between repetitions) after one untimed warm-up prefill per policy;
- FLOPs (`statekv.profiling.count_flops`, in a separate run since counting is slow), in total and per chunk;
- peak device tensor memory (`statekv.profiling.peak_memory`, chunks sent to a no-op sink, none kept);
- the same frames through ONE forward of the plain transformers model (the checkpoint's own class, SDPA
  attention, `use_cache=True`) over the same prefix + video tokens, preprocessing included as in streaming, timed in
  the same repetitions: each policy's `ratio_to_one_shot` per length, and the `crossover`, the shortest length at
  which streaming StateKV is faster than the one-shot forward (log-interpolated between measured lengths).

The model is a random Qwen2-VL built with `statekv.testing.checkpoints.save_tiny_checkpoint` ("tiny": the test
config, "mid": hidden 512, 8 layers), so nothing is downloaded, with either weight init (`BenchConfig.init`): "wide"
(the tests' N(0, 0.2): peaked attention) or "default" (the model class's own init: flat attention). A cost that
only one of them shows (the key-score softmax's subnormal probabilities on peaked heads, issue #21) cannot hide:
`run_inits` runs the benchmark once per init and `format_crossovers` prints the crossovers side by side.
`run_benchmark` returns (and writes) a JSON-ready dict; `plot_results` draws the PNG; `format_table` renders the
printed summary. Every report records the load average (`os.getloadavg`) before and after its run: timings on a
shared machine mean little without it.

Chunk 0's latency and FLOPs include the text prefix's prefill (the engine reports no progress before chunk 0).
FLOPs are counted with the torch attention backend on every device (a Triton kernel is invisible to the counter);
timings use the engine's default backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statekv.engine import Engine
from statekv.policies import Full, Policy, StateKV, Window
from statekv.profiling import count_flops, peak_memory
from statekv.testing.checkpoints import INITS, save_tiny_checkpoint
from statekv.testing.reference_inputs import reference_inputs
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

FPS = 2.0
POLICY_NAMES = ("full", "window", "statekv")
ONE_SHOT = "one-shot"  # one forward of the plain transformers model over the same tokens
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

# random Qwen2-VL configs (keyword arguments of save_tiny_checkpoint) and the frame size each is fed
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vision_depth=2, vision_dim=32),
    "mid": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, vision_depth=4, vision_dim=256),
}
FRAME_SIZES: dict[str, tuple[int, int]] = {"tiny": (56, 84), "mid": (112, 168)}  # 6 and 24 tokens per chunk
DEFAULT_FRAMES = (8, 16, 32, 64, 128)
DEFAULT_CAPACITY_CHUNKS = 4  # default capacity: the tokens of this many chunks, so it is reached early


@dataclass
class BenchConfig:
    """What to run. `capacity=None` means `DEFAULT_CAPACITY_CHUNKS` chunks' worth of tokens."""

    size: str = "tiny"
    frames: Sequence[int] = DEFAULT_FRAMES
    capacity: int | None = None
    repeats: int = 3
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # "float32" / "bfloat16"; default: bfloat16 on cuda, float32 otherwise
    height: int | None = None  # frame size; default per size (FRAME_SIZES)
    width: int | None = None
    seed: int = 0
    # torch CPU threads (torch.set_num_threads): default 1 on CPU, where the small ops of these models gain little
    # from threads and a busy machine makes multi-threaded timings swing by 10x; 0 keeps torch's own setting
    threads: int | None = None
    checkpoint: str | None = None  # an existing checkpoint directory instead of a fresh random one
    # weights of the fresh random checkpoint: "wide" (N(0, 0.2), peaked attention) or "default" (the class's own)
    init: str = "wide"
    measure_flops: bool = True
    measure_memory: bool = True
    policies: Sequence[str] = POLICY_NAMES  # which of full / window / statekv to run
    # "wall" (time.perf_counter) or "cpu" (time.process_time: this process's CPU seconds, which other jobs on a
    # shared machine do not inflate; meaningful on CPU with one thread, not for CUDA)
    clock: str = "wall"
    one_shot: bool = True  # also time one plain transformers forward over the same tokens (ratios, crossover)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "BenchConfig":
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {', '.join(MODEL_SIZES)}")
        frames = sorted({int(n) for n in self.frames})
        if not frames or frames[0] < 2 or any(n % 2 for n in frames):
            raise ValueError(f"frame counts must be even and >= 2 (one chunk = two frames), got {list(self.frames)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {dtype!r}")
        height, width = FRAME_SIZES[self.size]
        policies = [p for p in POLICY_NAMES if p in set(self.policies)]
        unknown = set(self.policies) - set(POLICY_NAMES)
        if unknown or not policies:
            raise ValueError(f"unknown or no policies {sorted(unknown) or list(self.policies)}; "
                             f"valid: {', '.join(POLICY_NAMES)}")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; valid: {', '.join(CLOCKS)}")
        threads = self.threads if self.threads is not None else (1 if torch.device(device).type == "cpu" else 0)
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        return BenchConfig(size=self.size, frames=frames, capacity=self.capacity, repeats=self.repeats,
                           device=device, dtype=dtype, height=self.height or height, width=self.width or width,
                           seed=self.seed, threads=threads, checkpoint=self.checkpoint, init=self.init,
                           measure_flops=self.measure_flops,
                           measure_memory=self.measure_memory, policies=policies, clock=self.clock,
                           one_shot=self.one_shot, extra=dict(self.extra))


def make_policies(capacity: int) -> dict[str, Policy]:
    return {"full": Full(), "window": Window(capacity), "statekv": StateKV(capacity=capacity)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(engine: Engine, frames: np.ndarray, clock: Callable[[], float] = time.perf_counter
                 ) -> tuple[float, list[float]]:
    """(total seconds, seconds of each chunk) of one prefill by `clock`; chunk 0 includes the text prefix."""
    device = engine.device
    stamps: list[float] = []

    def progress(done: int, total: int) -> None:
        _sync(device)
        stamps.append(clock())

    _sync(device)
    start = clock()
    engine.prefill(frames, fps=FPS, sink=lambda chunk: None, keep_chunks=False, progress=progress)
    _sync(device)
    total = clock() - start
    chunk_s = np.diff([start, *stamps]).tolist()
    return total, chunk_s


def plain_model(path: str | Path, model_class: type, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The checkpoint as its own transformers class with transformers' SDPA attention (no statekv code)."""
    return model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def one_shot_inputs(adapter: Any, frames: np.ndarray, frame_size: tuple[int, int], tokens: int) -> dict[str, Any]:
    """The plain model's inputs for the first `tokens` tokens of the processor's sequence (prefix + video: the
    question is cut off)."""
    inputs = reference_inputs(adapter, frames, "?", "prefix-first", frame_size, FPS)
    length = inputs["input_ids"].shape[1]
    return {k: v[:, :tokens] if torch.is_tensor(v) and v.shape == (1, length) else v for k, v in inputs.items()}


def time_one_shot(adapter: Any, model: Any, frames: np.ndarray, frame_size: tuple[int, int], tokens: int,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one plain transformers forward (its own attention, a KV cache built) over the tokens streaming
    prefills, preprocessing included (streaming's time includes it too)."""
    device = adapter.device
    _sync(device)
    start = clock()
    with torch.inference_mode():
        inputs = one_shot_inputs(adapter, frames, frame_size, tokens)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None  # positions from these input ids, not carried from a last call
        model.model(**inputs, use_cache=True)
    _sync(device)
    return clock() - start


def crossover(lengths: Sequence[int], ratios: Sequence[float]) -> dict[str, Any]:
    """Where `ratios` (streaming / one-shot, by increasing length) first drops below 1: the first measured length
    below 1 and the length log-interpolated between it and the one before (None when never below 1)."""
    for i, (n, r) in enumerate(zip(lengths, ratios)):
        if r < 1.0:
            if i == 0:
                return {"first_measured": n, "interpolated": None, "below_shortest": True}
            n0, r0 = lengths[i - 1], ratios[i - 1]
            at = math.exp(math.log(n0) + (r0 - 1.0) / (r0 - r) * (math.log(n) - math.log(n0)))
            return {"first_measured": n, "interpolated": at, "below_shortest": False}
    return {"first_measured": None, "interpolated": None, "below_shortest": False}


def flops_prefill(engine: Engine, frames: np.ndarray) -> tuple[int, list[int]]:
    """(total FLOPs, FLOPs of each chunk) of one prefill; chunk 0 includes the text prefix."""
    marks: list[int] = []
    with torch.inference_mode(), count_flops() as counter:
        engine.prefill(frames, fps=FPS, sink=lambda chunk: None, keep_chunks=False,
                       progress=lambda done, total: marks.append(counter.get_total_flops()))
        total = counter.get_total_flops()
    return int(total), np.diff([0, *marks]).astype(int).tolist()


def memory_prefill(engine: Engine, frames: np.ndarray) -> int:
    """Peak bytes of device tensors allocated during one prefill (chunks go to a no-op sink, none kept)."""
    with torch.inference_mode(), peak_memory(engine.device) as report:
        engine.prefill(frames, fps=FPS, sink=lambda chunk: None, keep_chunks=False)
    return int(report.peak_bytes)


def _growth(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """How a policy's FLOPs grow: longest / shortest video, log-log slope, and per-chunk marginal FLOPs."""
    if not entries or entries[0].get("flops") is None:
        return {}
    frames = np.array([e["frames"] for e in entries], dtype=float)
    flops = np.array([e["flops"] for e in entries], dtype=float)
    out: dict[str, Any] = {
        "frames_ratio": float(frames[-1] / frames[0]),
        "flops_ratio": float(flops[-1] / flops[0]),
        "loglog_slope": float(np.polyfit(np.log(frames), np.log(flops), 1)[0]) if len(frames) > 1 else None,
    }
    per_chunk = entries[-1]["chunk_flops"]  # the longest video
    n = len(per_chunk)
    # chunk 0 carries the text prefix, so the start is chunk 1 (when there is one)
    start, middle, end = per_chunk[min(1, n - 1)], per_chunk[n // 2], per_chunk[-1]
    out.update(marginal_flops_start=int(start), marginal_flops_middle=int(middle), marginal_flops_end=int(end),
               marginal_end_over_start=float(end / start), marginal_end_over_middle=float(end / middle))
    return out


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    import statekv

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "statekv": statekv.__version__,
           "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def run_benchmark(config: BenchConfig, out_dir: str | Path | None = None, *,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; with `out_dir`, write `prefill.json` and `prefill.png` there. Returns the results."""
    cfg = config.resolved()
    log = log or (lambda msg: None)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out_dir, log)
    finally:
        torch.set_num_threads(threads_before)


def run_inits(config: BenchConfig, inits: Sequence[str] = INITS, out_dir: str | Path | None = None, *,
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """`run_benchmark` once per checkpoint init (`config.init` replaced), one after the other; with `out_dir`, each
    writes into `out_dir/<init>/`. Returns {init: report}."""
    if not inits or set(inits) - set(INITS):
        raise ValueError(f"inits must be a non-empty subset of {', '.join(INITS)}, got {list(inits)}")
    log = log or (lambda msg: None)
    reports = {}
    for init in dict.fromkeys(inits):
        log(f"checkpoint init {init!r}")
        cfg = dataclasses.replace(config, init=init)
        reports[init] = run_benchmark(cfg, None if out_dir is None else Path(out_dir) / init,
                                      log=lambda msg, init=init: log(f"[{init}] {msg}"))
    return reports


def _run(cfg: BenchConfig, out_dir: str | Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    load_before = os.getloadavg()
    dtype = getattr(torch, cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="statekv-bench-") as tmp:
        if cfg.checkpoint is None:
            path = save_tiny_checkpoint(Path(tmp) / cfg.size, "qwen2_vl", seed=cfg.seed, init=cfg.init,
                                        **MODEL_SIZES[cfg.size])
        else:
            path = Path(cfg.checkpoint)
        log(f"loading {path}")
        # pixels: keep the synthetic frames at their own size (rounded to the 28-pixel grid)
        sampling = SamplingConfig(fps=FPS, min_pixels=28 * 28, max_pixels=max(28 * 28, cfg.height * cfg.width))
        base = Engine.from_pretrained(path, policy=Full(), device=cfg.device, dtype=dtype, sampling=sampling)
        plain = plain_model(path, base.adapter.model_class, device=base.device, dtype=dtype) if cfg.one_shot else None
    adapter = base.adapter
    device = adapter.device
    h, w = adapter.frame_size(cfg.height, cfg.width, sampling)
    with torch.inference_mode():  # tokens of one chunk, as the family lays it out (vision + per-frame text)
        probe = synthetic_frames(adapter.frames_per_chunk, cfg.height, cfg.width, seed=cfg.seed)
        cursor = adapter.new_cursor(prefix_len=0, frame_size=(h, w), sampled_fps=FPS)
        tokens_per_chunk = adapter.chunk_inputs(probe, cursor).chunk_tokens[0]
    capacity = cfg.capacity if cfg.capacity is not None else DEFAULT_CAPACITY_CHUNKS * tokens_per_chunk
    policies = {name: p for name, p in make_policies(capacity).items() if name in cfg.policies}
    # one loaded model shared by every policy; FLOPs use the torch attention backend (countable everywhere)
    engines = {name: Engine(adapter, policy=p, sampling=sampling) for name, p in policies.items()}
    flop_engines = {name: Engine(adapter, policy=p, sampling=sampling, attention_backend="torch")
                    for name, p in policies.items()}
    videos = {n: synthetic_frames(n, cfg.height, cfg.width, seed=cfg.seed) for n in cfg.frames}

    timings: dict[str, dict[int, list[tuple[float, list[float]]]]] = {p: {n: [] for n in cfg.frames} for p in policies}
    started = time.perf_counter()
    prefix_tokens = len(adapter.prefix_ids("prefix-first"))
    clock = CLOCKS[cfg.clock]
    one_shot: dict[int, list[float]] = {n: [] for n in cfg.frames}

    def run_one_shot(n: int) -> float:
        tokens = prefix_tokens + math.ceil(n / adapter.frames_per_chunk) * tokens_per_chunk
        return time_one_shot(adapter, plain, videos[n], (h, w), tokens, clock)

    for name, engine in engines.items():  # warm-up: first-call costs (allocator, kernels) stay out of the figures
        time_prefill(engine, videos[cfg.frames[0]])
    if plain is not None:
        run_one_shot(cfg.frames[0])
    names = list(policies)
    timed = names + ([ONE_SHOT] if plain is not None else [])
    for rep in range(cfg.repeats):
        order = timed[rep % len(timed):] + timed[:rep % len(timed)]  # rotate who goes first
        for n in cfg.frames:
            for name in order:
                if name == ONE_SHOT:
                    one_shot[n].append(run_one_shot(n))
                else:
                    timings[name][n].append(time_prefill(engines[name], videos[n], clock))
        log(f"timing repetition {rep + 1}/{cfg.repeats} done ({time.perf_counter() - started:.1f} s)")

    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        entries = []
        for n in cfg.frames:
            runs = timings[name][n]
            chunks = len(runs[0][1])
            entry: dict[str, Any] = {
                "frames": n, "chunks": chunks, "video_tokens": chunks * tokens_per_chunk,
                "total_s": statistics.median(r[0] for r in runs),
                "total_s_runs": [r[0] for r in runs],
                "chunk_s": np.median(np.array([r[1] for r in runs]), axis=0).tolist(),
                "chunk_s_runs": [r[1] for r in runs],
                "flops": None, "chunk_flops": None, "peak_bytes": None,
            }
            if plain is not None:
                entry["ratio_to_one_shot"] = entry["total_s"] / statistics.median(one_shot[n])
            if cfg.measure_flops:
                entry["flops"], entry["chunk_flops"] = flops_prefill(flop_engines[name], videos[n])
            if cfg.measure_memory:
                entry["peak_bytes"] = memory_prefill(engines[name], videos[n])
            entries.append(entry)
        results[name] = entries
        log(f"{name}: FLOPs and memory measured ({time.perf_counter() - started:.1f} s)")

    layout = adapter.layout
    report = {
        "benchmark": "prefill",
        "config": {
            "size": cfg.size, "model": {"family": "qwen2_vl", "random": cfg.checkpoint is None,
                                        "checkpoint": cfg.checkpoint,
                                        "init": cfg.init if cfg.checkpoint is None else None, **MODEL_SIZES[cfg.size],
                                        "head_dim": layout.head_dim},
            "frames": list(cfg.frames), "capacity": capacity, "capacity_chunks": capacity / tokens_per_chunk,
            "repeats": cfg.repeats, "device": str(device), "dtype": cfg.dtype, "fps": FPS,
            "frame_size_in": [cfg.height, cfg.width], "frame_size": [h, w], "tokens_per_chunk": tokens_per_chunk,
            "prefix_tokens": int(len(adapter.prefix_ids("prefix-first"))), "chunks_per_step": 1,
            "threads": torch.get_num_threads(), "clock": cfg.clock,
            "timing_attention_backend": "auto", "flops_attention_backend": "torch",
            "policies": {name: p.settings() for name, p in policies.items()}, "seed": cfg.seed, **cfg.extra,
        },
        "environment": environment(device),
        "notes": "times in seconds (median of repeats, policies interleaved, one warm-up each); chunk 0 includes "
                 "the text prefix; peak_bytes = peak device tensor bytes allocated during prefill; flops counted "
                 "by torch.utils.flop_counter (matmul/attention), not elementwise ops or top-k.",
        "results": results,
        "growth": {name: _growth(entries) for name, entries in results.items()},
        "one_shot": None if plain is None else [
            {"frames": n, "tokens": prefix_tokens + math.ceil(n / adapter.frames_per_chunk) * tokens_per_chunk,
             "total_s": statistics.median(one_shot[n]), "total_s_runs": one_shot[n]} for n in cfg.frames],
        "crossover": None if plain is None else {
            name: {**crossover([e["chunks"] for e in entries], [e["ratio_to_one_shot"] for e in entries]),
                   "unit": "chunks"} for name, entries in results.items()},
        "wall_s": time.perf_counter() - started,
        # 1, 5 and 15 minute load averages of the machine: timings mean little without them on a shared machine
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out / "prefill.json", out / "prefill.png"
        report["files"] = {"json": str(json_path), "png": str(png_path)}
        plot_results(report, png_path)
        json_path.write_text(json.dumps(report, indent=1))
    return report


COLORS = {"full": "tab:red", "window": "tab:blue", "statekv": "tab:green"}
LINES = {"full": "-", "window": "--", "statekv": "-"}  # window dashed: it overlaps statekv in FLOPs and memory


def plot_results(report: dict[str, Any], path: str | Path) -> Path:
    """A 2x2 PNG: per-chunk latency (longest video), total time, FLOPs and peak memory against frames."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    cfg, results = report["config"], report["results"]
    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_chunk, ax_total), (ax_flops, ax_mem) = fig.subplots(2, 2)
    longest = cfg["frames"][-1]
    for name, entries in results.items():
        style = dict(color=COLORS.get(name), linestyle=LINES.get(name, "-"), label=name)
        last = entries[-1]
        ms = np.array(last["chunk_s"]) * 1e3
        ax_chunk.plot(np.arange(len(ms)), ms, marker=".", **style)
        frames = [e["frames"] for e in entries]
        ax_total.plot(frames, [e["total_s"] for e in entries], marker="o", **style)
        if entries[0]["flops"] is not None:
            ax_flops.plot(frames, [e["flops"] / 1e9 for e in entries], marker="o", **style)
        if entries[0]["peak_bytes"] is not None:
            ax_mem.plot(frames, [e["peak_bytes"] / 2**20 for e in entries], marker="o", **style)
    if report.get("one_shot"):
        ax_total.plot([o["frames"] for o in report["one_shot"]], [o["total_s"] for o in report["one_shot"]],
                      marker="s", color="black", linestyle=":", label=ONE_SHOT)
    cap_chunk = math.ceil(cfg["capacity"] / cfg["tokens_per_chunk"])  # first chunk attending to a full state
    ax_chunk.axvline(cap_chunk, color="grey", linestyle=":", label=f"capacity reached ({cfg['capacity']} tokens)")
    ax_chunk.set(title=f"(a) per-chunk latency, {longest} frames ({longest // 2} chunks)", xlabel="chunk index",
                 ylabel="ms per chunk (median of repeats)")
    ax_chunk.set_ylim(bottom=0)
    ax_total.set(title="(b) total prefill time", xlabel="sampled frames", ylabel="seconds (median)",
                 xscale="log", yscale="log")
    ax_flops.set(title="(c) prefill FLOPs", xlabel="sampled frames", ylabel="GFLOPs", xscale="log", yscale="log")
    ax_mem.set(title="(d) peak device tensor memory", xlabel="sampled frames", ylabel="MiB", xscale="log")
    for ax in (ax_total, ax_flops, ax_mem):
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(cfg["frames"], [str(n) for n in cfg["frames"]])
    for ax in (ax_chunk, ax_total, ax_flops, ax_mem):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # FLOPs / memory panels are empty with --no-flops / --no-memory
            ax.legend()
    env = report["environment"]
    model = cfg["model"]
    fig.suptitle(f"statekv prefill — {cfg['size']} random Qwen2-VL (hidden {model['hidden_size']}, "
                 f"{model['num_layers']} layers), {cfg['tokens_per_chunk']} tokens/chunk, capacity "
                 f"{cfg['capacity']}, {cfg['dtype']} on {env['device']} ({env['device_name']}, {cfg['threads']} threads), "
                 f"torch {env['torch']}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: one row per length and policy, then the FLOPs growth per policy."""
    cfg, results = report["config"], report["results"]
    lines = [f"prefill benchmark: size={cfg['size']} device={cfg['device']} dtype={cfg['dtype']} "
             f"threads={cfg['threads']} tokens/chunk={cfg['tokens_per_chunk']} capacity={cfg['capacity']} "
             f"repeats={cfg['repeats']} clock={cfg.get('clock', 'wall')} init={cfg['model'].get('init')}"
             + _load_text(report.get("load_average")),
             f"{'frames':>6} {'chunks':>6} {'policy':>8} {'total ms':>10} {'first ms':>9} {'last ms':>8} "
             f"{'GFLOPs':>9} {'last-chunk MFLOPs':>17} {'peak MiB':>9} {'/one-shot':>9}"]
    one_shot = report.get("one_shot")
    for i, n in enumerate(cfg["frames"]):
        if one_shot:
            o = one_shot[i]
            lines.append(f"{n:>6} {results[next(iter(results))][i]['chunks']:>6} {ONE_SHOT:>8} "
                         f"{o['total_s'] * 1e3:>10.1f} {'-':>9} {'-':>8} {'-':>9} {'-':>17} {'-':>9} {1.0:>9.2f}")
        for name, entries in results.items():
            e = entries[i]
            chunk_ms = np.array(e["chunk_s"]) * 1e3
            tail = chunk_ms[-max(1, len(chunk_ms) // 4):]  # last quarter of the chunks, median
            gf = "-" if e["flops"] is None else f"{e['flops'] / 1e9:.3f}"
            mf = "-" if e["chunk_flops"] is None else f"{e['chunk_flops'][-1] / 1e6:.2f}"
            mem = "-" if e["peak_bytes"] is None else f"{e['peak_bytes'] / 2**20:.2f}"
            ratio = f"{e['ratio_to_one_shot']:.2f}" if "ratio_to_one_shot" in e else "-"
            lines.append(f"{n:>6} {e['chunks']:>6} {name:>8} {e['total_s'] * 1e3:>10.1f} {chunk_ms[0]:>9.2f} "
                         f"{float(np.median(tail)):>8.2f} {gf:>9} {mf:>17} {mem:>9} {ratio:>9}")
    growth = report["growth"]
    if any(growth.values()):
        first, last = cfg["frames"][0], cfg["frames"][-1]
        lines.append(f"FLOPs growth {first}->{last} frames (x{last / first:g}):")
        for name, g in growth.items():
            if g:
                lines.append(f"  {name:>8}: total x{g['flops_ratio']:.2f} (log-log slope {g['loglog_slope']:.2f}); "
                             f"per-chunk marginal end/start x{g['marginal_end_over_start']:.2f}, "
                             f"end/middle x{g['marginal_end_over_middle']:.3f}")
    for name, c in (report.get("crossover") or {}).items():
        lines.append(f"crossover {name} vs one-shot forward: {_crossover_text(c)}")
    lines.append(f"wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


def _load_text(load: dict[str, list[float]] | None) -> str:
    if not load:
        return ""
    return (" load average (1/5/15 min) before " + "/".join(f"{x:.2f}" for x in load["before"])
            + " after " + "/".join(f"{x:.2f}" for x in load["after"]))


def _crossover_text(c: dict[str, Any]) -> str:
    if c["below_shortest"]:
        return f"already faster at the shortest length ({c['first_measured']} chunks)"
    if c["first_measured"] is None:
        return "not faster at any measured length"
    return f"~{c['interpolated']:.1f} chunks (first measured faster: {c['first_measured']} chunks)"


def format_crossovers(reports: dict[str, dict[str, Any]]) -> str:
    """One line per checkpoint init and policy: ratios to the one-shot forward by length, and the crossover."""
    lines = []
    for init, report in reports.items():
        if not report.get("crossover"):
            continue
        lines.append(f"checkpoint init {init}:{_load_text(report.get('load_average'))}")
        for name, entries in report["results"].items():
            ratios = ", ".join(f"{e['chunks']}: {e['ratio_to_one_shot']:.2f}x" for e in entries)
            lines.append(f"  {name:>8} / one-shot by chunks {ratios}; crossover "
                         f"{_crossover_text(report['crossover'][name])}")
    return "\n".join(lines)

