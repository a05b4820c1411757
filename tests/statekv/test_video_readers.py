"""Video readers: decord and PyAV agree, sources of every kind open, batches are bounded, failures are typed."""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest

from statekv.errors import EmptyVideoError, VideoDecodeError, VideoError, VideoNotFoundError
from statekv.testing.videos import synthetic_frames, write_vfr_video, write_video
from statekv.video import ClipSource, FramesSource, SamplingConfig, iter_frame_batches, open_video, sample_source
from statekv.video.decord_reader import DecordReader
from statekv.video.pyav_reader import PyAVReader
from statekv.video.readers import FallbackReader

NUM_FRAMES, FPS = 24, 8.0
ALL_BACKENDS = ["auto", "decord", "pyav"]


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synthetic_frames(NUM_FRAMES, 56, 84, seed=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, frames: np.ndarray) -> dict[str, Path]:
    """The same clip as MP4 (frame count in the header) and Matroska (no count: packets are counted)."""
    root = tmp_path_factory.mktemp("videos")
    paths = {"mp4": root / "clip.mp4", "mkv": root / "clip.mkv"}
    for path in paths.values():
        write_video(path, frames, FPS)
    paths["zero"] = root / "zero.mp4"
    paths["zero"].write_bytes(b"")
    paths["random"] = root / "random.mp4"
    paths["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["no_stream"] = root / "no_stream.mp4"
    with av.open(str(paths["no_stream"]), mode="w") as container:  # header only: the empty track is dropped
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 84, 56, "yuv420p"
        container.start_encoding()
    return paths


def nearest_source_frame(decoded: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Index of the source frame closest to each decoded frame."""
    diff = np.abs(decoded[:, None].astype(np.int16) - frames[None].astype(np.int16))  # (n, T, H, W, 3)
    return diff.reshape(len(decoded), len(frames), -1).mean(-1).argmin(1)


def test_mkv_really_lacks_a_frame_count(videos: dict[str, Path]) -> None:
    """Guards the test below: Matroska must exercise the packet-counting path."""
    with av.open(str(videos["mkv"])) as container:
        assert container.streams.video[0].frames == 0


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_backends_agree_with_each_other_and_the_source(
    videos: dict[str, Path], frames: np.ndarray, container: str
) -> None:
    indices = np.array([0, 1, 5, 5, 12, 23])
    results = {}
    for backend in ALL_BACKENDS:
        with open_video(videos[container], backend=backend) as video:
            assert (video.num_frames, video.fps, video.height, video.width) == (NUM_FRAMES, FPS, 56, 84)
            assert video.source == str(videos[container])
            results[backend] = video.read(indices)
    for backend, got in results.items():
        assert got.dtype == np.uint8 and got.shape == (len(indices), 56, 84, 3), backend
        assert np.abs(got.astype(int) - frames[indices]).mean() < 4.0, backend  # lossy codec
        np.testing.assert_array_equal(nearest_source_frame(got, frames), indices)
    diff = np.abs(results["decord"].astype(int) - results["pyav"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_unsorted_and_repeated_indices(videos: dict[str, Path]) -> None:
    indices = np.array([20, 3, 3, 0, 20, 7])
    with open_video(videos["mp4"], backend="pyav") as pyav, open_video(videos["mp4"], backend="decord") as dec:
        got = pyav.read(indices)
        np.testing.assert_array_equal(got[1], got[2])
        assert np.abs(got.astype(int) - dec.read(indices).astype(int)).max() <= 2
        assert pyav.read(np.array([], dtype=np.int64)).shape == (0, 56, 84, 3)
        assert dec.read(np.array([], dtype=np.int64)).shape == (0, 56, 84, 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_index(videos: dict[str, Path], backend: str) -> None:
    with open_video(videos["mp4"], backend=backend) as video, pytest.raises(IndexError, match="clip.mp4"):
        video.read(np.array([0, NUM_FRAMES]))


def test_file_objects(videos: dict[str, Path], frames: np.ndarray) -> None:
    data = videos["mp4"].read_bytes()
    with open(videos["mp4"], "rb") as f, open_video(f) as video:
        assert isinstance(video, PyAVReader)  # "auto" streams file objects
        assert video.source == str(videos["mp4"])
        first = video.read(np.array([0, 23]))
    for backend in ALL_BACKENDS:
        with open_video(io.BytesIO(data), backend=backend) as video:
            assert video.num_frames == NUM_FRAMES and video.source == "<file object>"
            assert np.abs(video.read(np.array([0, 23])).astype(int) - first.astype(int)).max() <= 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fsspec_url(
    videos: dict[str, Path], backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote URL (memory:// standing in for s3://): decord reads a temporary copy that close() removes."""
    url = f"memory://bucket/{uuid.uuid4().hex}/clip.mp4"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(path, videos["mp4"].read_bytes())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with open_video(videos["mp4"], backend=backend) as local:
        expected = local.read(np.arange(NUM_FRAMES))
    video = open_video(url, backend=backend, storage_options={"skip_instance_cache": True})
    try:
        assert video.source == url and video.num_frames == NUM_FRAMES
        np.testing.assert_array_equal(video.read(np.arange(NUM_FRAMES)), expected)
        assert len(os.listdir(scratch)) == (0 if backend == "pyav" else 1)
    finally:
        video.close()
    assert os.listdir(scratch) == []
    fs.rm(path)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_remote_object(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"memory://bucket/{uuid.uuid4().hex}/missing.mp4"
    with pytest.raises(VideoNotFoundError, match="missing.mp4"):
        open_video(url, backend=backend)
    assert os.listdir(tmp_path) == []  # no temporary file left behind


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_failed_remote_decode_removes_temporary_file(
    videos: dict[str, Path], backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"memory://bucket/{uuid.uuid4().hex}/random.mp4"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(path, videos["random"].read_bytes())
    with pytest.raises(VideoDecodeError, match="random.mp4"):
        open_video(url, backend=backend)
    assert os.listdir(tmp_path) == []
    fs.rm(path)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("batch_frames", [1, 4, 7, 100])
def test_batches_are_bounded_and_equal_one_read(videos: dict[str, Path], backend: str, batch_frames: int) -> None:
    indices = np.linspace(0, NUM_FRAMES - 1, 10).round().astype(np.int64)
    with open_video(videos["mp4"], backend=backend) as video:
        batches = list(iter_frame_batches(video, indices, batch_frames))
        assert all(0 < len(b) <= batch_frames for b in batches)
        assert [len(b) for b in batches[:-1]] == [batch_frames] * (len(batches) - 1)
        np.testing.assert_array_equal(np.concatenate(batches), video.read(indices))


def test_batch_arguments_are_checked_at_call_time(frames: np.ndarray) -> None:
    video = FramesSource(frames, fps=4.0)
    with pytest.raises(ValueError, match="batch_frames"):
        iter_frame_batches(video, np.arange(4), 0)
    with pytest.raises(IndexError):
        iter_frame_batches(video, np.array([NUM_FRAMES]), 4)


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_pyav_batches_come_from_one_decoding_pass(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                  backend: str) -> None:
    """Regression guard: batch iteration must not re-open and re-decode from the start for every batch."""
    with open_video(videos["mp4"], backend=backend) as video:
        opened = []
        original = PyAVReader._open
        monkeypatch.setattr(PyAVReader, "_open", lambda self: opened.append(1) or original(self))
        batches = list(iter_frame_batches(video, np.arange(NUM_FRAMES), 3))
        assert len(batches) == 8 and len(opened) == 1


def test_frames_source(frames: np.ndarray) -> None:
    video = FramesSource(frames, fps=4.0, source="array")
    assert (video.num_frames, video.fps, video.height, video.width) == (NUM_FRAMES, 4.0, 56, 84)
    np.testing.assert_array_equal(video.read(np.array([3, 1])), frames[[3, 1]])
    batches = list(iter_frame_batches(video, np.arange(NUM_FRAMES), 5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate(batches), frames)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), VideoError),
        (np.zeros((2, 8, 8), np.uint8), VideoError),
        (np.zeros((2, 8, 8, 4), np.uint8), VideoError),
        (np.zeros((0, 8, 8, 3), np.uint8), EmptyVideoError),
    ],
)
def test_frames_source_validation(bad: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error, match="array"):
        FramesSource(bad, fps=4.0, source="array")


def test_frames_source_rejects_bad_fps(frames: np.ndarray) -> None:
    with pytest.raises(VideoError, match="fps"):
        FramesSource(frames, fps=0.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_file(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoNotFoundError, match="nope.mp4") as info:
        open_video(path, backend=backend)
    assert info.value.source == str(path)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(VideoNotFoundError, match="nope.mp4"):
        open_video(f"file://{path}", backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["zero", "random"])
def test_undecodable_bytes(videos: dict[str, Path], backend: str, kind: str) -> None:
    with pytest.raises(VideoDecodeError, match="file object"):
        open_video(io.BytesIO(videos[kind].read_bytes()), backend=backend)
    if kind == "zero":  # a path to an empty file says so before any decoder runs
        with pytest.raises(EmptyVideoError) as empty:
            open_video(videos[kind], backend=backend)
        assert str(empty.value) == f"video {str(videos[kind])!r}: empty file (0 bytes)"
        return
    with pytest.raises(VideoDecodeError) as info:
        open_video(videos[kind], backend=backend)
    assert str(videos[kind]) in str(info.value)
    assert ("decord" if backend == "decord" else "pyav") in info.value.reason


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_container_without_frames_is_empty(videos: dict[str, Path], backend: str) -> None:
    with pytest.raises(EmptyVideoError, match="no_stream.mp4") as info:
        open_video(videos["no_stream"], backend=backend)
    # PyAV's reason alone: decord (FFmpeg too) would add only its C++ check ("st_nb >= 0")
    assert info.value.reason == "container has no video stream"


def test_a_local_copy_is_named_as_its_source(videos: dict[str, Path]) -> None:
    with pytest.raises(EmptyVideoError) as info:
        open_video(videos["no_stream"], name="s3://bucket/videos/a.mp4")
    assert str(info.value) == "video 's3://bucket/videos/a.mp4': container has no video stream"
    with open_video(videos["mp4"], name="s3://bucket/videos/b.mp4") as video:
        assert video.source == "s3://bucket/videos/b.mp4"


def test_auto_reads_with_pyav_and_works_without_decord(videos: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with open_video(videos["mp4"]) as video:
        assert video.backend == "PyAVReader"
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with open_video(videos["mp4"]) as video:
        assert video.backend == "PyAVReader" and video.read(np.array([0])).shape == (1, 56, 84, 3)
    with pytest.raises(VideoDecodeError, match="pyav"):
        open_video(videos["random"])  # no decord to fall back to: PyAV's reason
    with pytest.raises(ImportError):
        open_video(videos["mp4"], backend="decord")


def test_unknown_backend_lists_valid_names(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="auto, decord, pyav"):
        open_video(videos["mp4"], backend="opencv")


# --- presentation time, clips, decoding errors after open ------------------------------------------------------

# 30 fps for 2 s, then a frame every 0.5 s up to 6 s: the frame at 4.0 s is frame 64 (64 / average fps = 5.8 s)
VFR_TIMES = np.concatenate([np.arange(60) / 30.0, 2.0 + 0.5 * np.arange(9)])


@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    frames = synthetic_frames(len(VFR_TIMES), 56, 84, seed=3)
    path = tmp_path_factory.mktemp("vfr") / "phone.mp4"
    write_vfr_video(path, frames, VFR_TIMES)
    return path, frames


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_variable_frame_rate_is_stamped_and_sampled_by_presentation_time(
    vfr_video: tuple[Path, np.ndarray], backend: str
) -> None:
    path, frames = vfr_video
    with open_video(path, backend=backend) as video:
        np.testing.assert_allclose(video.frame_times, VFR_TIMES, atol=1e-3)
        sampling = sample_source(video, SamplingConfig(fps=2.0))
        decoded = video.read(sampling.indices)
    shown = nearest_source_frame(decoded, frames)  # which frame of the clip each sampled frame really is
    np.testing.assert_allclose(sampling.timestamps, VFR_TIMES[shown], atol=1e-3)
    assert 64 in shown.tolist()
    assert sampling.timestamps[shown.tolist().index(64)] == pytest.approx(4.0, abs=1e-3)  # not 5.8 s
    uniform = np.linspace(0.0, VFR_TIMES[-1], sampling.num_frames)
    assert np.abs(sampling.timestamps - uniform).max() <= 0.25 + 1e-3  # half the sparse interval: uniform in time


def test_clip_source_is_a_window_in_presentation_time(vfr_video: tuple[Path, np.ndarray]) -> None:
    path, frames = vfr_video
    with open_video(path, backend="pyav") as video:
        clip = ClipSource(video, 2.0, 4.5)
        assert clip.start_time == pytest.approx(2.0) and clip.num_frames == 5  # 2.0, 2.5, 3.0, 3.5, 4.0
        np.testing.assert_allclose(clip.frame_times, [0.0, 0.5, 1.0, 1.5, 2.0], atol=1e-3)
        got = np.concatenate(list(iter_frame_batches(clip, np.arange(5), 2)))
        np.testing.assert_array_equal(nearest_source_frame(got, frames), np.arange(60, 65))
        with pytest.raises(EmptyVideoError, match="phone.mp4"):
            ClipSource(video, 7.0, 8.0)


@pytest.fixture(scope="module")
def corrupt_vp9(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A VP9 WebM with 2 kB of garbage 30% in: both decoders open it and fail once they reach the bad packets."""
    root = tmp_path_factory.mktemp("vp9")
    frames = synthetic_frames(240, 128, 192)
    clean, corrupt = root / "clean.webm", root / "corrupt.webm"
    write_video(clean, frames, 24.0, codec="libvpx-vp9")
    data = bytearray(clean.read_bytes())
    at = int(len(data) * 0.3)
    data[at : at + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    corrupt.write_bytes(bytes(data))
    return clean, corrupt, frames


def _faststart_mp4(path: Path, frames: np.ndarray) -> None:
    """H.264 MP4 with its index (moov) first, so a cut file still promises every frame."""
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def truncated_mp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    root = tmp_path_factory.mktemp("cut")
    frames = synthetic_frames(120, 56, 84)
    whole, cut = root / "whole.mp4", root / "cut.mp4"
    _faststart_mp4(whole, frames)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    return whole, cut, frames


def test_decoding_error_after_open_continues_with_the_fallback(
    truncated_mp4: tuple[Path, Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """PyAV opens the cut file and fails when its frames run out; the frames read before stay, the rest come from
    the fallback (here decord on the whole file, the same video) at the same indices."""
    whole, cut, frames = truncated_mp4
    indices = np.arange(0, 120, 3)
    reader = FallbackReader(PyAVReader(str(cut), str(cut)), lambda: DecordReader(str(whole), str(whole)))
    with caplog.at_level(logging.WARNING, logger="statekv.video.readers"), reader:
        assert reader.backend == "PyAVReader"
        got = np.concatenate(list(iter_frame_batches(reader, indices, 8)))
        assert reader.backend == "DecordReader"
        np.testing.assert_array_equal(nearest_source_frame(reader.read(indices[-3:]), frames), indices[-3:])
    np.testing.assert_array_equal(nearest_source_frame(got, frames), indices)
    [record] = caplog.records
    assert str(cut) in record.message and "stream ended" in record.message and "DecordReader" in record.message


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_decoding_error_after_open_is_one_line_naming_the_file(
    corrupt_vp9: tuple[Path, Path, np.ndarray], backend: str
) -> None:
    _, corrupt, _ = corrupt_vp9
    with open_video(corrupt, backend=backend) as video, pytest.raises(VideoDecodeError) as info:
        for _ in iter_frame_batches(video, np.arange(0, video.num_frames, 6), 8):
            pass
    message = str(info.value)
    assert str(corrupt) in message and "\n" not in message
    assert "video_reader.cc" not in message  # decord's source locations are not the reader's business
    wanted = {"auto": ["pyav", "decord"], "pyav": ["pyav"], "decord": ["decord"]}[backend]
    assert all(f"{name}: " in message for name in wanted)  # auto: both reasons


def test_truncated_file_is_one_error_naming_the_file(truncated_mp4: tuple[Path, Path, np.ndarray]) -> None:
    """The cut MP4 promises frames it no longer has: PyAV says how far it got, on one line naming the file."""
    _, cut, _ = truncated_mp4
    with pytest.raises(VideoDecodeError) as info:
        with open_video(cut, backend="pyav") as video:
            for _ in iter_frame_batches(video, np.arange(video.num_frames), 8):
                pass
    message = str(info.value)
    assert str(cut) in message and "\n" not in message and "stream ended after" in message


def test_display_rotation_is_applied_by_every_backend(tmp_path: Path) -> None:
    """A phone's portrait clip: landscape pixels plus a 90° display matrix in the MOV track header."""
    import struct

    frames = synthetic_frames(8, 56, 84, seed=5)
    path = tmp_path / "phone.mov"
    write_video(path, frames, FPS)
    data = bytearray(path.read_bytes())
    matrix = data.index(b"tkhd") + 44  # version-0 tkhd: the 3x3 matrix follows 40 bytes of header fields
    assert struct.unpack(">9i", data[matrix : matrix + 36]) == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    upright = np.rot90(frames, -1, axes=(1, 2))  # (T, 84, 56, 3)
    for backend in ALL_BACKENDS:
        with open_video(path, backend=backend) as video:
            assert (video.height, video.width) == (84, 56), backend
            got = video.read(np.arange(8))
        assert got.shape == upright.shape and np.abs(got.astype(int) - upright).mean() < 4.0, backend
