"""Where a checkpoint comes from (statekv.locate, used by load_adapter): local directories, the hub cache, the hub.

Regressions: a mistyped local folder got "Repo id must be in the form..."; `--model tiny` spent ~30 s in the hub
client's retries and ended in an error naming no model; relative paths were recorded as typed, so a later `ask`
from another folder went to the hub; `revision` / `cache_dir` reached the weights but not the config or tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from statekv.errors import DeviceError, ModelNotFoundError
from statekv.locate import check_device, locate_checkpoint, looks_like_path
from statekv.models import load_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["./tny-typo", "~/no-such-checkpoint-dir", "models/sub/ckpt", "/no/such/dir",
                                  "C:\\models\\x", "bad name with spaces"])
def test_a_missing_local_path_is_one_error_naming_it(name):
    with pytest.raises(ModelNotFoundError, match="no such directory") as info:
        locate_checkpoint(name)
    assert repr(name) in str(info.value) and "\n" not in str(info.value)


def test_a_file_is_not_a_checkpoint(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_adapter(weights)


@pytest.mark.parametrize("name,path", [("Qwen/Qwen2-VL-2B-Instruct", False), ("gpt2", False),
                                       ("./ckpt", True), ("a/b/c", True), ("~/x", True)])
def test_hub_ids_and_paths_are_told_apart(name, path):
    assert looks_like_path(name) is path


def test_a_relative_directory_is_recorded_absolute(tmp_path, monkeypatch, tiny_checkpoints):
    src = Path(tiny_checkpoints["qwen2_vl"])
    monkeypatch.chdir(src.parent)
    adapter = load_adapter(f"./{src.name}")
    assert adapter.name_or_path == str(src.resolve())
    assert locate_checkpoint(f"./{src.name}")[0] == str(src.resolve())


def _hub_cache(cache_dir: Path, repo_id: str, snapshots: dict[str, Path]) -> None:
    """A Hugging Face cache folder holding `repo_id` with one snapshot per ref (as huggingface_hub lays it out)."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for i, (ref, src) in enumerate(snapshots.items()):
        commit = f"{i:040x}"
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_revision_and_cache_dir_reach_config_and_tokenizer(tmp_path, tiny_checkpoints):
    """Ref "main" holds a Qwen2-VL, ref "v1" a Qwen2.5-VL whose tokenizer has a marker: revision="v1" must give
    the Qwen2.5-VL config (AutoConfig) and the marked tokenizer (AutoTokenizer), from cache_dir only."""
    v1 = tmp_path / "v1"
    shutil.copytree(tiny_checkpoints["qwen2_5_vl"], v1)
    config_path = v1 / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["model_max_length"] = 1234
    config_path.write_text(json.dumps(tok_config))
    pre_path = v1 / "video_preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre["statekv_marker"] = "v1"
    pre_path.write_text(json.dumps(pre))
    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-vl", {"main": Path(tiny_checkpoints["qwen2_vl"]), "v1": v1})

    adapter = load_adapter("acme/tiny-vl", cache_dir=str(cache), revision="v1", local_files_only=True)
    assert adapter.model_type == "qwen2_5_vl" and adapter.tokenizer.model_max_length == 1234
    assert adapter.preprocessor.get("statekv_marker") == "v1"  # the preprocessor config of that revision too
    assert adapter.name_or_path == "acme/tiny-vl"  # a hub id is recorded as the hub id
    main = load_adapter("acme/tiny-vl", cache_dir=str(cache))  # cached: loaded with no network
    assert main.model_type == "qwen2_vl" and "statekv_marker" not in main.preprocessor


def test_a_cached_hub_id_loads_without_asking_the_hub(tmp_path, tiny_checkpoints, monkeypatch):
    """Regression: the preprocessor config ignored cache_dir and revision, asked the hub, and waited out 90 s of
    retries with no network (then read the default cache's file, if any)."""
    import huggingface_hub.file_download as download

    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-vl", {"main": Path(tiny_checkpoints["qwen2_vl"])})

    def no_network(*args, **kwargs):
        raise AssertionError(f"asked the hub: {args} {kwargs}")

    monkeypatch.setattr(download, "get_hf_file_metadata", no_network)
    assert load_adapter("acme/tiny-vl", cache_dir=str(cache)).model_type == "qwen2_vl"


def test_an_uncached_hub_id_offline_fails_at_once_naming_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"'acme/absent'.*local_files_only"):
        locate_checkpoint("acme/absent", cache_dir=str(tmp_path), local_files_only=True)


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True])
def test_an_unreachable_hub_is_one_line_naming_the_model(tmp_path, closed_port, offline):
    """The CLI as a user runs it: a hub id that is not cached, with the hub unreachable (or HF_HUB_OFFLINE)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not read: the model is checked first")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "prefill", str(video), "--model", "tiny",
                           "--out", str(tmp_path / "caches" / "clip")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("statekv prefill: error: model 'tiny': not a local directory")
    assert ("HF_HUB_OFFLINE" if offline else "unreachable") in lines[0]
    assert "statekv tiny-model" in lines[0]
    assert not (tmp_path / "caches").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_a_device_error():
    with pytest.raises(DeviceError, match="CPU-only build"):
        check_device("cuda")


def test_a_misspelled_device_is_a_device_error():
    with pytest.raises(DeviceError, match="'cdua'"):
        check_device("cdua")
    assert check_device("cpu") == torch.device("cpu")
