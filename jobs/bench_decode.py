"""Decoder benchmark: which backend decodes which real codec, how fast, and with how much host memory.

    python -m jobs.bench_decode --dir /tmp/clips                       # encode the clips, measure every backend
    python -m jobs.bench_decode --dir /tmp/clips --python decord2=/tmp/venv-d2/bin/python

Clips are encoded here with PyAV (H.264 MP4, VP9 WebM, HEVC MKV, AV1 MKV where an encoder exists, a rotated MOV,
variable frame rate, portrait, one frame, a truncated MP4). Each (backend, clip) is measured in its own process,
the way `statekv prefill` reads: open, sample 2 fps by presentation time, decode the sampled frames in batches of
2 (decord: `get_batch` per batch; PyAV: one forward pass). A backend succeeds on a clip when it returns every
sampled frame at the clip's size. `--python NAME=INTERPRETER` measures another installation of the same
`import decord` (decord2 cannot share an environment with decord 0.6). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from fractions import Fraction

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 24, 8


def _frames(n: int, height: int, width: int):
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    for t in range(n):  # a moving texture that codecs cannot flatten to nothing
        r = (x * 3 + t * 5) % 256
        g = (y * 2 + t * 3) % 256
        b = ((x + y) // 4 + t * 7) % 256
        yield np.stack([r, g, b], axis=-1).astype(np.uint8)


def _encode(path: str, codec: str, *, n: int = FPS * SECONDS, height: int = HEIGHT, width: int = WIDTH,
            times: list[float] | None = None, rotate: bool = False, options: dict | None = None) -> None:
    import av

    with av.open(path, mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(_frames(n, height, width)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    if rotate:  # PyAV writes no display matrix: put a 90° one into the MOV track header, as phones do
        import struct

        with open(path, "rb") as f:
            data = bytearray(f.read())
        matrix = data.index(b"tkhd") + 44
        data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
        with open(path, "wb") as f:
            f.write(bytes(data))


def make_clips(root: str) -> dict[str, str]:
    """Encode the benchmark clips under `root` (skipping those already there); {name: path}."""
    import av

    os.makedirs(root, exist_ok=True)
    n = FPS * SECONDS
    vfr = [i / 30 for i in range(n // 2)] + [n // 2 / 30 + 0.25 * i for i in range(n - n // 2)]
    specs = {
        "h264.mp4": dict(codec="libx264"),
        "vp9.webm": dict(codec="libvpx-vp9"),
        "hevc.mkv": dict(codec="libx265"),
        "av1.mkv": dict(codec="libsvtav1"),
        "rotated.mov": dict(codec="libx264", rotate=True),
        "vfr.mp4": dict(codec="libx264", times=vfr),
        "portrait.mp4": dict(codec="libx264", height=WIDTH, width=HEIGHT),
        "one_frame.mp4": dict(codec="libx264", n=1),
        "truncated.mp4": dict(codec="libx264", options={"movflags": "faststart"}),
    }
    clips = {}
    for name, spec in specs.items():
        path = os.path.join(root, name)
        if spec["codec"] not in av.codecs_available:
            continue
        if not os.path.exists(path):
            _encode(path, **spec)
            if name == "truncated.mp4":
                with open(path, "rb") as f:
                    data = f.read()
                with open(path, "wb") as f:
                    f.write(data[: len(data) * 6 // 10])
        clips[name] = path
    return clips


# --- the worker: numpy + decord or PyAV only, so that it runs in another environment -------------------------


def _times_decord(vr, n: int):
    import numpy as np

    return np.asarray(vr.get_frame_timestamp(np.arange(n))[:, 0], dtype=np.float64)


def _sample(times, fps: float):
    """2 fps, uniform in presentation time (the rule `statekv.video.sampling` follows)."""
    import numpy as np

    times = times - times[0]
    duration = times[-1] + (times[-1] - times[-2]) if len(times) > 1 else 1.0 / fps
    n = max(2, int(round(duration, 6) * 2.0) // 2 * 2)
    targets = np.linspace(0.0, times[-1], n)
    return np.clip(np.searchsorted(times, targets), 0, len(times) - 1)


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _worker(backend: str, path: str, repeats: int) -> dict:
    import time

    best = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = _decode_once(backend, path)
        out["seconds"] = round(time.perf_counter() - start, 4)
        if best is None or (out["ok"] and out["seconds"] < best["seconds"]):
            best = out
        if not out["ok"]:
            break
    best["fps"] = round(best["frames"] / best["seconds"], 1) if best["ok"] else 0.0  # sampled frames per second
    best["realtime_x"] = round(best.pop("duration") / best["seconds"], 1) if best["ok"] else 0.0
    best["peak_rss_mb"] = _peak_rss_mb()
    return best


def _decode_once(backend: str, path: str) -> dict:
    """Open, sample 2 fps by presentation time, decode the sampled frames; frames, success, error."""
    import numpy as np

    out = {"ok": False, "frames": 0, "duration": 0.0, "error": ""}
    try:
        if backend == "pyav":
            import av

            with av.open(path) as c:
                s = c.streams.video[0]
                pts = sorted(float(p.pts * s.time_base) for p in c.demux(s) if p.size > 0)
            times = np.asarray(pts)
            want = _sample(times, float(s.average_rate or 1))
            got, k, i = [], 0, 0
            with av.open(path) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                for frame in c.decode(s):
                    while k < len(want) and want[k] == i:
                        got.append(frame.to_ndarray(format="rgb24"))
                        k += 1
                    i += 1
                    if k == len(want):
                        break
            shape = got[0].shape if got else None
            height, width = s.codec_context.height, s.codec_context.width
        else:
            import decord

            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
            n = len(vr)
            want = _sample(_times_decord(vr, n), vr.get_avg_fps())
            got = [vr.get_batch(want[j:j + 2].tolist()).asnumpy() for j in range(0, len(want), 2)]
            got = [f for batch in got for f in batch]
            shape = got[0].shape if got else None
            height, width = shape[:2] if shape else (0, 0)
        out["frames"] = len(got)
        out["duration"] = float(times[-1] - times[0]) if backend == "pyav" else float(vr.get_frame_timestamp(
            [n - 1])[0, 1])
        out["ok"] = len(got) == len(want) and shape == (height, width, 3)
        if not out["ok"]:
            out["error"] = f"{len(got)} of {len(want)} frames"
    except Exception as err:  # noqa: BLE001 - the figure is whether it decodes, and why not
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
    return out


def _version(python: str, backend: str) -> str:
    module = "av" if backend == "pyav" else "decord"
    code = f"import {module}; print({module}.__version__)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "missing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/statekv-bench-decode", help="where the clips are encoded")
    parser.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER",
                        help="also measure `import decord` in another interpreter (e.g. decord2=/venv/bin/python)")
    parser.add_argument("--repeats", type=int, default=3, help="decode each clip this often, keep the fastest")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.repeats)))
        return 0
    clips = make_clips(args.dir)
    backends = {"pyav": ("pyav", sys.executable), "decord": ("decord", sys.executable)}
    for spec in args.python:
        name, python = spec.split("=", 1)
        backends[name] = ("decord", python)
    script = os.path.abspath(__file__)
    results: dict = {"clips": {k: os.path.getsize(v) for k, v in clips.items()}, "backends": {}, "results": {}}
    for name, (kind, python) in backends.items():
        results["backends"][name] = {"module": "av" if kind == "pyav" else "decord",
                                     "version": _version(python, kind)}
        for clip, path in clips.items():
            done = subprocess.run([python, script, "--worker", kind, path, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = {"ok": False, "error": f"worker exited {done.returncode}"}
            results["results"].setdefault(clip, {})[name] = row
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
