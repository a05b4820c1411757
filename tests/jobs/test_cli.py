"""The `statekv` command line on a tiny checkpoint and a synthetic video, local and on the loopback S3 server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import main
from statekv.store import load_cache
from statekv.testing.videos import synthetic_frames, write_video

PIXELS = ["--min-pixels", str(28 * 28), "--max-pixels", str(56 * 84)]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    write_video(path, synthetic_frames(16, 56, 84), fps=4.0)  # 4 s → 8 frames at 2 fps → 4 chunks
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prefill_inspect_ls_ask_local(capsys, tmp_path, video, tiny_checkpoints):
    model = tiny_checkpoints["qwen2_vl"]
    uri = str(tmp_path / "caches" / "clip")
    code, out, err = run(capsys, "prefill", video, "--model", model, "--out", uri, "--capacity", "8", *PIXELS)
    assert code == 0, err
    assert "committed clip: 4 chunks, 24 video tokens" in out
    assert "prefill" in err  # the progress bar

    code, out, _ = run(capsys, "inspect", uri)
    assert code == 0
    for expected in ("qwen2_vl", "statekv (capacity=8)", "8 sampled at 2.00 fps", "duration: 4.0 s",
                     "24 video tokens in 4 chunks", "state:    8 tokens", "native"):
        assert expected in out

    code, out, _ = run(capsys, "ls", str(tmp_path / "caches"))
    assert code == 0 and out.startswith("clip\t") and uri in out

    code, answer, _ = run(capsys, "ask", uri, "What happens?", "--max-new-tokens", "6")
    assert code == 0
    from statekv import Engine

    engine = Engine.from_pretrained(model, device="cpu")
    want = engine.ask(load_cache(uri), "What happens?", max_new_tokens=6).text
    assert answer == want + "\n"
    code, streamed, _ = run(capsys, "ask", uri, "What happens?", "--max-new-tokens", "6", "--stream")
    assert code == 0 and streamed == answer

    code, out, _ = run(capsys, "prefill", video, "--model", model, "--out", uri, "--capacity", "8", "--mode", "skip",
                       "--no-progress", *PIXELS)
    assert code == 0 and "skipped" in out


def test_prefill_int8_on_s3(capsys, video, tiny_checkpoints, s3_server, monkeypatch):
    endpoint, _ = s3_server
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)  # credentials the usual way; the endpoint from the command line
    uri = "s3://caches/cli/clip"
    code, out, err = run(capsys, "prefill", video, "--model", tiny_checkpoints["qwen2_5_vl"], "--out", uri,
                         "--int8", "--policy", "window", "--capacity", "12", "--no-progress",
                         "--endpoint-url", endpoint, *PIXELS)
    assert code == 0, err
    code, out, _ = run(capsys, "inspect", uri, "--endpoint-url", endpoint)
    assert code == 0 and "int8" in out and "window (capacity=12)" in out
    code, out, _ = run(capsys, "ls", "s3://caches/cli", "--endpoint-url", endpoint)
    assert code == 0 and "clip" in out


def test_missing_cache_and_video_are_clear_errors(capsys, tmp_path, tiny_checkpoints):
    code, out, err = run(capsys, "inspect", str(tmp_path / "nothing"))
    assert code == 1 and "no committed cache" in err and "Traceback" not in err
    code, out, err = run(capsys, "ask", str(tmp_path / "nothing"), "why?")
    assert code == 1 and "nothing" in err
    code, out, err = run(capsys, "prefill", str(tmp_path / "missing.mp4"), "--model", tiny_checkpoints["qwen2_vl"],
                         "--out", str(tmp_path / "c"), "--no-progress")
    assert code == 1 and "missing.mp4" in err and "no such file" in err


@pytest.mark.parametrize("argv", [[], ["prefill"], ["ask", "only-uri"], ["prefill", "v.mp4", "--model", "m",
                                                                           "--out", "o", "--policy", "lru"]])
def test_bad_arguments_exit_2_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: statekv" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prefill", "ask", "inspect", "ls", "demo"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"usage: statekv {command}" in capsys.readouterr().out


def test_console_script_reports_errors_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "inspect", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "statekv inspect: error:" in done.stderr and "Traceback" not in done.stderr


def test_demo_runs_the_main_job_on_embedded_defaults(tmp_path):
    """The README's main job: tiny model + sample video → stored cache → answer read back from the store."""
    import os

    env = {**os.environ, "STATEKV_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--capacity", "64"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "state:    64 tokens per layer" in done.stdout and "answer:" in done.stdout
    assert (tmp_path / "caches" / "sample" / "manifest.json").exists()
