"""The `statekv` command line on a tiny checkpoint and a synthetic video, local and on the loopback S3 server."""

from __future__ import annotations

import os
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

    code, out, _ = run(capsys, "prefill", video, "--model", model, "--out", uri, "--capacity", "8",
                       "--no-progress", *PIXELS)
    assert code == 0 and "skipped" in out  # a committed cache is left alone by default, as `index` does


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


@pytest.mark.parametrize("command", ["prefill", "ask", "inspect", "ls", "index", "serve", "eval", "tiny-model",
                                     "demo", "keys"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"usage: statekv {command}" in capsys.readouterr().out


def test_console_script_reports_errors_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "inspect", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "statekv inspect: error:" in done.stderr and "Traceback" not in done.stderr


def test_demo_answers_the_proxy_video_right_with_its_evidence(tmp_path):
    """The README's main job: the shipped proxy model + a generated video → stored cache → an answer read back from
    the store that the video confirms, the time range it comes from, and what the video shows to check it."""
    import os
    import re

    from statekv.proxy.task import held_out_seed, make_video
    from statekv.samples import DEMO_FRAMES, DEMO_SEED

    env = {**os.environ, "STATEKV_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--capacity", "8"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    truth = make_video(DEMO_FRAMES, held_out_seed(DEMO_FRAMES, DEMO_SEED))
    shape = truth.questions["shape"].answer
    assert "state:    8 tokens per layer" in out and "question: What shape appeared?" in out
    assert f"answer:   '{shape}'  (right: the video says '{shape}')" in out
    assert truth.describe() in out  # what the video shows, in time ranges the viewer can check
    # the evidence: the chunks retrieval picks, each with its time range in the video (which chunks the question's
    # summary scores pick is the model's doing: the first proxy's picks held the shape's chunk, the retrained one's
    # do not, see docs/benchmarks.md "Proxy model")
    picked = re.findall(r"chunk +(\d+) +(\d+\.\d\d) s - +(\d+\.\d\d) s", out)
    assert picked, out
    assert all(0 <= int(c) < truth.num_chunks and float(a) == int(c) and float(b) == int(c) + 1 for c, a, b in picked)
    assert "statekv ask" in out and "Qwen/" in out and "jobs.train_proxy" in out  # what it is, what next
    assert (tmp_path / "caches" / "sample" / "manifest.json").exists()
    assert (tmp_path / f"proxy-{DEMO_FRAMES}f-{DEMO_SEED}.mp4").exists()


# --- start-up cost and cheap checks (issue 8, point 10) ---------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "ray")


def run_reporting_imports(argv: list[str], env: dict | None = None) -> dict:
    """Run the CLI in a fresh interpreter; return its exit code, stderr and which heavy modules it imported."""
    import json
    import os

    code = ("import json, sys\nfrom jobs.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "stderr": done.stderr}


@pytest.mark.parametrize("argv", [["--help"], ["prefill", "--help"], ["index", "--help"], ["serve", "--help"],
                                  ["eval", "--help"], ["ask", "--help"]])
def test_help_imports_no_torch_transformers_or_ray(argv):
    """Regression: `--help` took 5-9 s importing torch and transformers eagerly."""
    report = run_reporting_imports(argv)
    assert report["rc"] == 0 and report["heavy"] == []


def test_keys_new_prints_the_secret_once_and_stores_only_its_hash(tmp_path, capsys):
    """`statekv keys new` appends a hashed entry and prints the secret on stdout only; `revoke` removes it; neither
    imports torch, transformers or Ray."""
    import json
    import stat

    from pipelines.serving.keys import verify_secret

    path = tmp_path / "keys.json"
    assert main(["keys", "new", "--file", str(path), "--id", "team-a", "--prefix", "a--", "--list"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("team-a.") and secret not in err and secret not in path.read_text()
    (entry,) = json.loads(path.read_text())["keys"]
    assert (entry["id"], entry["prefixes"], entry["roots"], entry["list"]) == ("team-a", ["a--"], ["*"], True)
    assert verify_secret(secret, entry["hash"]) and not verify_secret(secret + "x", entry["hash"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["keys", "new", "--file", str(path), "--id", "team-a", "--all-videos"]) == 1
    assert "exists already" in capsys.readouterr().err
    report = run_reporting_imports(["keys", "new", "--file", str(path), "--id", "bot", "--all-videos",
                                    "--root", "s3://b/caches/"])
    assert report["rc"] == 0 and report["heavy"] == []
    assert [(e["id"], e["roots"], e["prefixes"]) for e in json.loads(path.read_text())["keys"]] == [
        ("team-a", ["*"], ["a--"]), ("bot", ["s3://b/caches"], [""])]
    assert main(["keys", "revoke", "--file", str(path), "--id", "team-a"]) == 0
    assert [e["id"] for e in json.loads(path.read_text())["keys"]] == ["bot"]
    assert main(["keys", "revoke", "--file", str(path), "--id", "team-a"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"key file {path}: no key 'team-a'; ids: bot")


def test_a_missing_video_fails_before_any_model_loads(tmp_path, tiny_checkpoints):
    report = run_reporting_imports(["prefill", str(tmp_path / "missing.mp4"), "--model", tiny_checkpoints["qwen2_vl"],
                                    "--out", str(tmp_path / "caches" / "x")])
    assert report["rc"] == 1 and report["heavy"] == []
    assert report["stderr"].strip() == f"statekv prefill: error: video '{tmp_path / 'missing.mp4'}': no such file"
    assert not (tmp_path / "caches").exists()


def test_an_empty_video_file_fails_before_any_model_loads(tmp_path, tiny_checkpoints):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    report = run_reporting_imports(["prefill", str(empty), "--model", tiny_checkpoints["qwen2_vl"],
                                    "--out", str(tmp_path / "caches" / "x")])
    assert report["rc"] == 1 and report["heavy"] == []
    assert report["stderr"].strip() == f"statekv prefill: error: video '{empty}': empty file (0 bytes)"


def test_kernel_fallback_warnings_are_one_line(tmp_path, video):
    """Qwen3.5's linear-attention kernels each warned that they run transformers' reference PyTorch code (2-4 lines
    on every command): one line without -v, transformers' own lines (naming each kernel) with it."""
    from statekv.testing.checkpoints import save_tiny_checkpoint

    model = str(save_tiny_checkpoint(tmp_path / "qwen3_5", "qwen3_5"))
    argv = [sys.executable, "-m", "jobs.cli", "prefill", video, "--model", model, "--capacity", "8", "--no-progress",
            *PIXELS]
    # CI set: transformers then also propagates its messages to the root logger (our handler): printed twice
    quiet = subprocess.run([*argv, "--out", str(tmp_path / "a" / "clip")], capture_output=True, text=True,
                           timeout=300, cwd=REPO, env={**os.environ, "CI": "true"})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.count("reference PyTorch") == 1 and "-v names them" in quiet.stderr
    verbose = subprocess.run([*argv, "--out", str(tmp_path / "b" / "clip"), "-v"], capture_output=True, text=True,
                             timeout=300, cwd=REPO)
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stderr.count("is falling back to its reference PyTorch implementation") >= 2


def test_a_committed_cache_is_skipped_without_loading_the_model(tmp_path, video, tiny_checkpoints, capsys):
    uri = str(tmp_path / "caches" / "clip")
    code, _, err = run(capsys, "prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--out", uri,
                       "--no-progress", *PIXELS)
    assert code == 0, err
    report = run_reporting_imports(["prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--out", uri])
    assert report["rc"] == 0 and report["heavy"] == []  # not even torch: the store's front door is torch-free


def test_index_with_a_missing_input_fails_before_ray_starts(tmp_path, tiny_checkpoints):
    report = run_reporting_imports(["index", str(tmp_path / "nothing"), str(tmp_path / "out"),
                                    "--model", tiny_checkpoints["qwen2_vl"]])
    assert report["rc"] == 1 and "ray" not in report["heavy"]
    assert "input" in report["stderr"] and "nothing" in report["stderr"] and "Traceback" not in report["stderr"]


def test_a_missing_model_directory_fails_before_torch_loads(tmp_path, video):
    report = run_reporting_imports(["prefill", video, "--model", "./tny-typo", "--out", str(tmp_path / "c" / "x")])
    assert report["rc"] == 1 and report["heavy"] == []
    assert report["stderr"].strip().startswith("statekv prefill: error: model './tny-typo': no such directory")


# --- one-line errors (point 9) ------------------------------------------------------------------------------------

@pytest.fixture
def closed_port():
    """A loopback port that refuses connections (bound, never listening)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup on a laptop or CI runner
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.parametrize("argv", [["ls", "s3://caches/cli"], ["inspect", "s3://caches/cli/clip"]])
def test_missing_s3_credentials_are_one_line(capsys, s3_server, no_aws_credentials, argv):
    endpoint, _ = s3_server
    code, _, err = run(capsys, *argv, "--endpoint-url", endpoint)
    assert code == 1
    assert err.strip() == f"statekv {argv[0]}: error: {argv[1]}: no AWS credentials found (set AWS_ACCESS_KEY_ID " \
                          "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role)"
    code, _, err = run(capsys, "-v", *argv, "--endpoint-url", endpoint)
    assert code == 1 and "Traceback" in err and "NoCredentialsError" in err  # -v shows where


def test_an_unreachable_s3_endpoint_is_one_line(capsys, closed_port, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{closed_port}"
    code, _, err = run(capsys, "ls", "s3://caches/cli", "--endpoint-url", endpoint)
    assert code == 1
    assert err.strip() == f"statekv ls: error: s3://caches/cli: cannot connect to the S3 endpoint {endpoint}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line_before_the_model_loads(tmp_path, video, tiny_checkpoints):
    report = run_reporting_imports(["prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--device", "cuda",
                                    "--out", str(tmp_path / "c" / "x")])
    assert report["rc"] == 1 and "transformers" not in report["heavy"]
    lines = report["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statekv prefill: error: device 'cuda': this torch")


def test_an_undecodable_video_is_one_line_without_decoder_noise(tmp_path, tiny_checkpoints):
    """Regression: decord's FFmpeg printed `moov atom not found` and a C++ log line before our error."""
    import os

    fake = tmp_path / "notes.mp4"
    fake.write_text("a text file renamed .mp4\n")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "prefill", str(fake), "--model",
                           tiny_checkpoints["qwen2_vl"], "--out", str(tmp_path / "caches" / "notes"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"statekv prefill: error: video '{fake}'")
    assert not (tmp_path / "caches" / "notes").exists()


# --- scripting and consistency (point 11) -------------------------------------------------------------------------

def test_ls_of_a_missing_root_is_an_error(capsys, tmp_path):
    code, out, err = run(capsys, "ls", str(tmp_path / "no-such-root"))
    assert code == 1 and out == ""
    assert err.strip() == f"statekv ls: error: '{tmp_path / 'no-such-root'}': no such directory"
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, "ls", str(tmp_path / "empty"), "--json")
    assert code == 0 and __import__("json").loads(out) == {"root": str(tmp_path / "empty"), "caches": []}


def test_json_output_of_prefill_ls_and_ask(capsys, tmp_path, video, tiny_checkpoints):
    import json

    model = tiny_checkpoints["qwen2_vl"]
    root = tmp_path / "caches"
    code, out, err = run(capsys, "prefill", video, "--model", model, "--out", str(root / "clip"), "--capacity", "8",
                         "--no-progress", "--json", *PIXELS)
    assert code == 0, err
    made = json.loads(out)
    assert made["video_id"] == "clip" and made["skipped"] is False and made["totals"]["chunks"] == 4
    assert made["policy"] == {"name": "statekv", "capacity": 8, "decay": None}
    code, out, _ = run(capsys, "prefill", video, "--model", model, "--out", str(root / "clip"), "--json")
    assert code == 0 and json.loads(out)["skipped"] is True

    code, out, _ = run(capsys, "ls", str(root), "--json")
    listed = json.loads(out)["caches"]
    assert code == 0 and [(c["video_id"], c["chunks"], c["tokens"]) for c in listed] == [("clip", 4, 24)]

    code, out, _ = run(capsys, "ask", str(root / "clip"), "What happens?", "--max-new-tokens", "5", "--json")
    assert code == 0
    answer = json.loads(out)
    assert answer["finish_reason"] in ("eos", "length") and 1 <= len(answer["token_ids"]) <= 5
    assert answer["tokens"]["generated"] == len(answer["token_ids"])
    assert set(answer["timings"]) == {"load_model_s", "load_cache_s", "first_token_s", "total_s"}
    code, text, _ = run(capsys, "ask", str(root / "clip"), "What happens?", "--max-new-tokens", "5")
    assert text == answer["answer"] + "\n"


def test_overwrite_redoes_a_committed_cache(capsys, tmp_path, video, tiny_checkpoints):
    uri = str(tmp_path / "caches" / "clip")
    base = ["prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--out", uri, "--no-progress", *PIXELS]
    assert run(capsys, *base, "--capacity", "8")[0] == 0
    code, out, _ = run(capsys, *base, "--capacity", "12", "--overwrite")
    assert code == 0 and out.startswith("committed clip")
    code, out, _ = run(capsys, "inspect", uri)
    assert "statekv (capacity=12)" in out


def test_a_relative_model_path_is_recorded_absolute(capsys, tmp_path, video, tiny_checkpoints, monkeypatch):
    """Regression: `--model ./ckpt` was recorded as typed, so `ask` from another folder looked on the hub."""
    import json
    from pathlib import Path

    model = Path(tiny_checkpoints["qwen2_vl"])
    uri = str(tmp_path / "caches" / "clip")
    monkeypatch.chdir(model.parent)
    assert run(capsys, "prefill", video, "--model", f"./{model.name}", "--out", uri, "--no-progress", *PIXELS)[0] == 0
    code, out, _ = run(capsys, "inspect", uri, "--json")
    assert json.loads(out)["model"]["name_or_path"] == str(model.resolve())
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "ask", uri, "Why?", "--max-new-tokens", "2")
    assert code == 0, err


@pytest.mark.parametrize("out", ["my video", "parts-1", "clip."])
def test_prefill_refuses_an_id_the_service_would_refuse(capsys, tmp_path, video, out):
    uri = str(tmp_path / "caches" / out)
    code, _, err = run(capsys, "prefill", video, "--model", "./unused-model", "--out", uri)
    assert code == 1 and err.startswith(f"statekv prefill: error: cache location {uri!r}: video id {out!r}")
    assert not (tmp_path / "caches").exists()


def test_help_shows_defaults_and_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "run the whole path on embedded defaults (`demo`)." in out
    with pytest.raises(SystemExit):
        main(["prefill", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 4096)", "(default: 2.0)", "(default: statekv)", "(default: 1)"):
        assert shown in out


def test_the_settings_names_are_the_librarys():
    """statekv/settings.py spells them out (the parser imports no torch)."""
    from statekv.cache import ANSWER_FROM as LIBRARY_ANSWER_FROM
    from statekv.models.base import LAYOUTS
    from statekv.policies import POLICIES
    from statekv.compression import Guided
    from statekv.settings import ANSWER_FROM, DEFAULT_GUIDANCE_PROMPT, LAYOUT_NAMES, POLICY_NAMES

    assert list(POLICY_NAMES) == list(POLICIES) and ANSWER_FROM == LIBRARY_ANSWER_FROM
    assert tuple(LAYOUT_NAMES) == tuple(LAYOUTS)
    assert Guided().prompt == DEFAULT_GUIDANCE_PROMPT


def test_threads_flag_sets_torch_threads(capsys, tmp_path, video, tiny_checkpoints):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        uri = str(tmp_path / "caches" / "clip")
        assert run(capsys, "prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--out", uri, "--no-progress",
                   *PIXELS)[0] == 0
        assert torch.get_num_threads() == 1  # the measured default (README, "CPU threads")
        assert run(capsys, "ask", uri, "Why?", "--max-new-tokens", "1", "--threads", "2")[0] == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- tiny models from the command line (point 7) ------------------------------------------------------------------

def test_tiny_model_lists_every_family(capsys):
    from statekv.testing.checkpoints import TINY_CHECKPOINTS

    code, out, _ = run(capsys, "tiny-model", "--list")
    assert code == 0 and out.split() == list(TINY_CHECKPOINTS)


@pytest.mark.parametrize("family", list(__import__("statekv.testing.checkpoints", fromlist=["TINY_CHECKPOINTS"]).TINY_CHECKPOINTS))
def test_tiny_model_writes_a_loadable_checkpoint(capsys, tmp_path, family):
    from statekv.models import load_adapter

    code, out, err = run(capsys, "tiny-model", family, str(tmp_path / "tiny"))
    assert code == 0, err
    assert "random weights" in out and f"--model {tmp_path / 'tiny'}" in out
    adapter = load_adapter(tmp_path / "tiny")
    assert adapter.name_or_path == str(tmp_path / "tiny")
    code, _, err = run(capsys, "tiny-model", family, str(tmp_path / "tiny"))
    assert code == 1 and "holds a checkpoint already" in err


def test_tiny_model_names_the_families_for_an_unknown_one(capsys, tmp_path):
    code, _, err = run(capsys, "tiny-model", "llama", str(tmp_path / "x"))
    assert code == 1 and "'llama'" in err and "qwen2_vl" in err


# --- retrieval and evidence (issue 12, point 4) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_cache(tmp_path_factory, tiny_checkpoints) -> str:
    """A stored cache of 12 chunks (24 frames at 2 fps)."""
    from statekv import Engine
    from statekv.store import prefill_to_store
    from statekv.video import SamplingConfig

    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu",
                                    sampling=SamplingConfig(min_pixels=28 * 28, max_pixels=56 * 84))
    uri = str(tmp_path_factory.mktemp("retrieval") / "caches" / "long")
    prefill_to_store(engine, synthetic_frames(24, 56, 84, seed=3), uri, fps=2.0)
    return uri


def _evidence_lines(evidence) -> list[str]:
    return [f"evidence: {len(evidence)} chunk(s)"] + [
        f"  chunk {e.chunk:>4}  {e.start_s:8.2f} s - {e.end_s:8.2f} s  score {e.score:+.4f}  layers {e.layers}"
        for e in evidence]


@pytest.mark.parametrize("flags, setting", [(["--top-k", "2", "--recent", "1"], ("topk", 2, 1, False)),
                                            (["--top-k", "3", "--adaptive"], ("topk", 3, None, True)),
                                            (["--top-k", "2", "--query", "question"], ("topk-question", 2, None, False)),
                                            (["--segments", "4", "--recent", "0"], ("segments", 4, 0, False))])
def test_ask_with_retrieval_prints_the_evidence(capsys, long_cache, tiny_checkpoints, flags, setting):
    """The answer from the chosen chunks (the engine's), then one line per chunk with its time range; the same in
    --json (with the setting) and after --stream."""
    from dataclasses import asdict

    from statekv import Engine
    from statekv.retrieval import Segments, TopK

    name, k, recent, adaptive = setting
    extra = {} if recent is None else {"recent": recent}
    if name.startswith("topk"):
        retrieval = TopK(k=k, adaptive_budget=adaptive, query="question" if name == "topk-question" else "prompt",
                         **extra)
    else:
        retrieval = Segments(k=k, **extra)
    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu")
    cache = load_cache(long_cache)
    want = engine.ask(cache, "What happens?", max_new_tokens=4, retrieval=retrieval)
    assert 0 < len(want.evidence) < cache.num_chunks
    base = ["ask", long_cache, "What happens?", "--max-new-tokens", "4", *flags]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    assert out.splitlines() == [want.text, *_evidence_lines(want.evidence)]
    code, streamed, _ = run(capsys, *base, "--stream")
    assert code == 0 and streamed == out
    code, out, _ = run(capsys, *base, "--json")
    got = __import__("json").loads(out)
    assert code == 0 and got["token_ids"] == want.token_ids
    assert got["evidence"] == [asdict(e) for e in want.evidence]
    assert got["retrieval"] == retrieval.settings()
    assert got["tokens"]["context"] == cache.prefix_len + sum(cache.chunk_tokens[e.chunk] for e in want.evidence)
    for e, chunk in zip(got["evidence"], (cache.chunks[e.chunk] for e in want.evidence)):  # the source times
        assert e["start_s"] == chunk.timestamps[0] and e["end_s"] == pytest.approx(chunk.timestamps[-1] + 0.5)


def test_ask_without_retrieval_has_no_evidence(capsys, long_cache):
    code, out, _ = run(capsys, "ask", long_cache, "What happens?", "--max-new-tokens", "2", "--json")
    got = __import__("json").loads(out)
    assert code == 0 and got["evidence"] is None and got["retrieval"] is None
    code, out, _ = run(capsys, "ask", long_cache, "What happens?", "--max-new-tokens", "2")
    assert code == 0 and len(out.splitlines()) == 1 and "evidence" not in out


@pytest.mark.parametrize("flags, message", [
    (["--recent", "2"], "--recent needs --top-k or --segments"), (["--adaptive"], "--adaptive needs --top-k"),
    (["--segments", "2", "--adaptive"], "--adaptive goes with --top-k, not --segments"),
    (["--query", "question"], "--query goes with --top-k"), (["--segments", "2", "--query", "question"],
                                                              "--query goes with --top-k"),
    (["--top-k", "2", "--query", "bare"], "argument --query: invalid choice"),
    (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"), (["--top-k", "x"], "argument --top-k: 'x' is not an integer"),
    (["--top-k", "2", "--recent", "-1"], "argument --recent: must be >= 0, got -1"),
    (["--top-k", "2", "--segments", "2"], "argument --segments: not allowed with argument --top-k")])
def test_bad_retrieval_flags_are_usage_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        main(["ask", "some/uri", "q", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: statekv ask" in err and f"statekv ask: error: {message}" in err


def test_retrieval_from_a_state_cache_is_one_line(capsys, tmp_path, tiny_checkpoints):
    from statekv import Engine
    from statekv.store import prefill_to_store
    from statekv.video import SamplingConfig

    engine = Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], device="cpu", answer_from="state",
                                    sampling=SamplingConfig(min_pixels=28 * 28, max_pixels=56 * 84))
    uri = str(tmp_path / "caches" / "state")
    prefill_to_store(engine, synthetic_frames(8, 56, 84, seed=1), uri, fps=2.0)
    capsys.readouterr()  # the setup's own output (its weight-loading bar, when no earlier CLI run turned bars off)
    code, out, err = run(capsys, "ask", uri, "What happens?", "--top-k", "2")
    assert code == 1 and out == ""
    assert err.strip() == ("statekv ask: error: retrieval picks chunks, and this cache keeps none: it answers from "
                           "its carried state (answer_from='state')")


# --- statekv eval (issue 12, point 5) -----------------------------------------------------------------------------

def test_eval_writes_the_harness_report(capsys, tmp_path, video, tiny_checkpoints):
    import json

    out_dir = tmp_path / "report"
    code, out, err = run(capsys, "eval", "--model", tiny_checkpoints["qwen2_vl"], "--video", video, "--question",
                         "Describe the video.", "--settings", "window:8", "--max-new-tokens", "2", "--no-flops",
                         "--no-plot", "--fps", "2", "--store", str(tmp_path / "caches"), "--out", str(out_dir))
    assert code == 0, err
    assert "| full |" in out and "| window:8 |" in out
    assert f"wrote {out_dir / 'report.json'}" in err
    # progress on stderr: what runs, then each prefill and each answer, naming setting, video and question
    progress = [line for line in err.splitlines() if line.startswith("[eval] ")]
    assert progress[0] == "[eval] 2 settings (full, window:8) x 1 video(s), 1 question(s)"
    assert progress[1].startswith("[eval] setting 1/2 full, video 1/1 clip.mp4: prefilled 4 chunks in ")
    assert progress[2].startswith("[eval] setting 1/2 full, video 1/1 clip.mp4: question 1/1 answered in ")
    assert progress[3].startswith("[eval] setting 2/2 window:8, video 1/1 clip.mp4: prefilled 4 chunks")
    assert len(progress) == 5 and "GFLOPs" not in err  # FLOPs are counted only when asked (--flops)
    report = json.loads((out_dir / "report.json").read_text())
    assert (out_dir / "report.md").read_text().strip() in out
    assert "window:8" in json.dumps(report)


def usage_error(capsys, *argv: str) -> str:
    """The last stderr line of a command that must stop with a usage error (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_eval_errors_are_one_line(capsys, tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["qwen2_vl"]
    assert usage_error(capsys, "eval", "--model", model, "--out", str(tmp_path / "r")) == (
        "statekv eval: error: nothing to evaluate: give --video/--question, --questions-file or --dataset")
    line = usage_error(capsys, "eval", "--model", model, "--video", "v.mp4", "--question", "q", "--settings", "lru:4")
    assert line.startswith("statekv eval: error: unknown setting 'lru:4'")
    line = usage_error(capsys, "eval", "--model", model, "--video", "v.mp4")
    assert line == "statekv eval: error: --video and --question go together"
    report = run_reporting_imports(["eval", "--model", "./tny-typo", "--video", "v.mp4", "--question", "q"])
    assert report["rc"] == 1 and report["heavy"] == []
    assert report["stderr"].strip().startswith("statekv eval: error: model './tny-typo': no such directory")


# --- write-time compression and state-only caches from the command line --------------------------------------------

def test_prefill_with_guided_compression_stores_the_kept_fraction(capsys, tmp_path, video, tiny_checkpoints):
    from statekv import Engine
    from statekv.settings import PrefillSettings
    from statekv.store import read_manifest

    model = tiny_checkpoints["qwen2_vl"]
    uri = str(tmp_path / "caches" / "guided")
    code, out, err = run(capsys, "prefill", video, "--model", model, "--out", uri, "--capacity", "8", "--no-progress",
                         "--compress-keep", "0.5", "--guidance-prompt", "Who is there?", *PIXELS)
    assert code == 0, err
    prefill = read_manifest(uri)["prefill"]
    assert prefill["compression"] == {"name": "guided", "prompt": "Who is there?", "keep": 0.5}
    stored = load_cache(uri)
    assert all(chunk.stored_tokens(layer) == 3 for chunk in stored.chunks for layer in range(len(chunk.keys)))
    # the same cache as the library writes with the same settings
    engine = Engine.from_settings(model, PrefillSettings.from_record(stored.config.to_dict()), device="cpu")
    want = engine.prefill(video)
    for got, ref in zip(stored.chunks, want.chunks):
        assert [k.tolist() for k in got.kept] == [k.tolist() for k in ref.kept]
    code, answer, err = run(capsys, "ask", uri, "What happens?", "--max-new-tokens", "4")
    assert code == 0 and answer.strip(), err


def test_prefill_answer_from_state_stores_no_chunks(capsys, tmp_path, video, tiny_checkpoints):
    from statekv.store import read_manifest

    uri = str(tmp_path / "caches" / "state")
    code, out, err = run(capsys, "prefill", video, "--model", tiny_checkpoints["qwen2_vl"], "--out", uri,
                         "--policy", "infinipot", "--capacity", "8", "--answer-from", "state", "--no-progress", *PIXELS)
    assert code == 0, err
    manifest = read_manifest(uri)
    assert manifest["prefill"]["answer_from"] == "state" and manifest["prefill"]["policy"]["name"] == "infinipot"
    assert len(load_cache(uri).chunks) == 0 and manifest["chunks"]["count"] == 4
    code, answer, err = run(capsys, "ask", uri, "What happens?", "--max-new-tokens", "4")
    assert code == 0 and answer.strip(), err


@pytest.mark.parametrize("flags, message", [
    (["--guidance-prompt", "Who?"], "--guidance-prompt needs --compress-keep"),
    (["--compress-keep", "1.5"], "--compress-keep must be a fraction in (0, 1], got 1.5"),
    (["--compress-keep", "0"], "--compress-keep must be a fraction in (0, 1], got 0.0"),
    (["--compress-keep", "0.5", "--guidance-prompt", " "], "--guidance-prompt must not be empty"),
    (["--compress-keep", "0.5", "--answer-from", "state"], "--answer-from state stores none"),
    (["--answer-from", "everything"], "invalid choice: 'everything'"),
])
@pytest.mark.parametrize("command", ["prefill", "index"])
def test_bad_compression_flags_are_usage_errors(capsys, command, flags, message):
    argv = (["prefill", "v.mp4", "--model", "m", "--out", "o"] if command == "prefill"
            else ["index", "in/", "out/", "--model", "m"])
    with pytest.raises(SystemExit) as info:
        main(argv + flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "usage: statekv" in err


def test_index_flags_reach_the_index_config():
    from jobs import index_videos
    from jobs.cli import build_parser
    from pipelines.indexing.config import IndexConfig
    from statekv.settings import PrefillSettings

    parser = build_parser()
    args = parser.parse_args(["index", "in/", "out/", "--model", "m", "--policy", "infinipot", "--capacity", "64",
                              "--compress-keep", "0.25"])
    args.check(args)
    config = index_videos.config_from_args(args)
    assert (config.prefill.policy, config.prefill.capacity, config.prefill.answer_from) == ("infinipot", 64, "chunks")
    assert config.prefill.compression == {"name": "guided", "keep": 0.25}
    assert config.prefill == PrefillSettings(policy="infinipot", capacity=64, compress_keep=0.25)
    assert IndexConfig(**config.to_dict()) == config  # as it travels to the actors
