"""What the sampling of a real video leaves in a stored cache: presentation times, requested and sampled fps, the
sources and windows a cache was made of, refusals on resume, the --max-frames warning and flat host memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from statekv import Engine, StateKV
from statekv.errors import VideoError
from statekv.store import load_cache, prefill_to_store, read_manifest
from statekv.testing.videos import synthetic_frames, write_vfr_video, write_video
from statekv.video import ClipSource, SamplingConfig, open_video

MIN_PIXELS, MAX_PIXELS = 28 * 28, 56 * 84
PIXELS = ["--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--capacity", "16", "--no-progress"]
ROOT = Path(__file__).resolve().parents[2]
# 30 fps for 2 s, then a frame every 0.5 s up to 6 s: the frame at 4.0 s is frame 64 (64 / average fps = 5.8 s)
VFR_TIMES = np.concatenate([np.arange(60) / 30.0, 2.0 + 0.5 * np.arange(9)])


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    sampling = SamplingConfig(fps=2.0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=StateKV(capacity=16), device="cpu",
                                  sampling=sampling)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clips")
    paths = {"a": root / "a.mp4", "b": root / "b.mp4", "portrait": root / "portrait.mp4", "vfr": root / "vfr.mp4"}
    write_video(paths["a"], synthetic_frames(16, 56, 84, seed=1), fps=4.0)  # 4 s
    write_video(paths["b"], synthetic_frames(8, 56, 84, seed=2), fps=4.0)  # 2 s, same size
    write_video(paths["portrait"], synthetic_frames(8, 84, 56, seed=3), fps=4.0)  # another frame size
    write_vfr_video(paths["vfr"], synthetic_frames(len(VFR_TIMES), 56, 84, seed=4), VFR_TIMES)
    return {k: str(v) for k, v in paths.items()}


def test_variable_frame_rate_cache_is_stamped_by_presentation_time(engine, clips, tmp_path):
    manifest = prefill_to_store(engine, clips["vfr"], tmp_path / "vfr")
    s = manifest["video"]
    with open_video(clips["vfr"]) as video:
        true_times = np.asarray(video.frame_times)[s["frame_indices"]]
    np.testing.assert_allclose(s["timestamps"], true_times, atol=1e-3)
    assert s["frame_indices"][s["timestamps"].index(pytest.approx(4.0, abs=1e-3))] == 64  # not stamped 5.8 s
    assert s["requested_fps"] == 2.0 and s["duration"] == pytest.approx(6.5, abs=1e-3)
    assert s["sampled_fps"] == pytest.approx(len(s["timestamps"]) / 6.5, rel=1e-3)
    cache = load_cache(tmp_path / "vfr", lazy=False)
    assert cache.chunks[0].timestamps == pytest.approx(s["timestamps"][:2])


def test_resume_records_each_source_and_a_consistent_duration(engine, clips, tmp_path):
    uri = tmp_path / "stream"
    prefill_to_store(engine, clips["a"], uri)
    manifest = prefill_to_store(engine, clips["b"], uri, resume=True)
    s = manifest["video"]
    assert [seg["source"] for seg in s["segments"]] == [clips["a"], clips["b"]]
    assert [seg["window"] for seg in s["segments"]] == [[0.0, 4.0], [0.0, 2.0]]
    assert [seg["frames"] for seg in s["segments"]] == [[0, 8], [8, 12]]
    assert [seg["offset"] for seg in s["segments"]] == [0.0, 4.0]
    assert s["duration"] == pytest.approx(6.0)  # 4 s + 2 s, and the last frame lies inside it
    assert s["timestamps"][8] == pytest.approx(4.0) and s["timestamps"][-1] == pytest.approx(4.0 + 1.75)
    assert load_cache(uri).video.segments == s["segments"]

    # a clip of another frame size is refused, on one line naming it; the committed stream stays as it was
    with pytest.raises(VideoError, match="portrait.mp4.*frame size 56x84 .*cached stream of 84x56"):
        prefill_to_store(engine, clips["portrait"], uri, resume=True)
    code, err, _ = _run_prefill([clips["portrait"], "--model", engine.adapter.name_or_path, "--out", str(uri),
                                 "--resume", *PIXELS])
    [line] = [line for line in err.splitlines() if line.startswith("statekv prefill:")]
    assert code == 1 and line.startswith("statekv prefill: error:") and clips["portrait"] in line
    assert "frame size 56x84" in line and "Traceback" not in err
    assert read_manifest(uri)["video"]["segments"] == s["segments"]


def test_a_manifest_rows_window_maps_the_cache_back_to_its_source(engine, clips, tmp_path):
    with open_video(clips["a"]) as video:
        manifest = prefill_to_store(engine, ClipSource(video, 1.0, 3.0), tmp_path / "clip")
    s = manifest["video"]
    [seg] = s["segments"]
    assert seg["source"] == clips["a"] and seg["window"] == [1.0, 3.0] and seg["frames"] == [0, 4]
    source_times = [seg["window"][0] + t - seg["offset"] for t in s["timestamps"]]
    source_frames = [round(t * 4.0) for t in source_times]  # a is 4 fps
    assert source_frames == [4 + i for i in s["frame_indices"]]  # the frames of a that were prefilled


# Runs the CLI and, at exit, prints this process's peak RSS (VmHWM). ru_maxrss from wait4 would not do: after
# fork + exec it still carries the parent's RSS at fork time, and the parent here holds the frames it encoded.
_WITH_PEAK_RSS = """
import atexit, runpy, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak-rss-kb", line.split()[1], file=sys.stderr)
atexit.register(_peak)
sys.argv = ["statekv", *sys.argv[1:]]
runpy.run_module("jobs.cli", run_name="__main__")
"""


def _run_prefill(args: list[str]) -> tuple[int, str, float]:
    """Run `statekv prefill` in a fresh process: exit code, stderr and that process's peak RSS in MB.

    A process of its own also makes `jobs` this tree's package: inside pytest, `tests/` is on sys.path and
    `import jobs` finds `tests/jobs`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", _WITH_PEAK_RSS, "prefill", *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak-rss-kb ")]
    return done.returncode, done.stderr, int(peaks[-1]) / 1024 if peaks else float("nan")


def test_max_frames_that_lowers_the_fps_warns_on_stderr_and_is_recorded(tiny_checkpoints, tmp_path):
    video = tmp_path / "ten.mp4"
    write_video(video, synthetic_frames(40, 56, 84), fps=4.0)  # 10 s: 20 frames at 2 fps
    uri = tmp_path / "ten"
    code, err, _ = _run_prefill([str(video), "--model", tiny_checkpoints["qwen2_vl"], "--out", str(uri),
                                 "--max-frames", "4", "--backend", "decord", *PIXELS])
    assert code == 0, err
    assert f"video {video}: max_frames=4 lowers the sampling rate from 2 to 0.4 fps" in err
    s = read_manifest(uri)["video"]
    assert s["requested_fps"] == 2.0 and s["sampled_fps"] == pytest.approx(0.4) and len(s["timestamps"]) == 4


def _long_gop_video(path: Path, seconds: int) -> None:
    """8 fps, 364x308 (the issue's clip size), one keyframe: decoders that buffer until the next seek show it."""
    frames = synthetic_frames(8 * seconds, 308, 364)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8, options={"g": "100000", "keyint_min": "100000"})
        stream.width, stream.height, stream.pix_fmt = 364, 308, "yuv420p"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def test_prefill_to_a_store_keeps_host_memory_flat_in_video_length(tiny_checkpoints, tmp_path):
    """`statekv prefill --out` of a 4x longer video peaks within a small margin of the short one's RSS."""
    peaks = {}
    for seconds in (20, 80):
        video = tmp_path / f"v{seconds}.mp4"
        _long_gop_video(video, seconds)
        code, err, peaks[seconds] = _run_prefill([str(video), "--model", tiny_checkpoints["qwen2_vl"],
                                                  "--out", str(tmp_path / f"c{seconds}"), *PIXELS])
        assert code == 0, err
        assert read_manifest(tmp_path / f"c{seconds}")["totals"]["chunks"] == seconds  # 2 fps, 2 frames a chunk
    print(f"peak RSS: 1x {peaks[20]:.0f} MB, 4x {peaks[80]:.0f} MB")
    assert peaks[80] <= peaks[20] * 1.03 + 16, peaks
