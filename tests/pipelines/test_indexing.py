"""The Ray Data indexing pipeline: inputs, end to end on S3, resume after a killed driver, bounded actor memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.indexing import (IndexActor, IndexConfig, IndexRunError, list_inputs, probe_inputs, read_report,
                                read_summary, run_index)
from pipelines.indexing.report import SHARE_NAMES, STAGE_NAMES
from pipelines.indexing.inputs import expand_shard
from statekv.settings import PrefillSettings
from statekv.store import list_caches, load_cache, read_manifest, sweep
from statekv.testing.videos import synthetic_frames, write_video
from statekv.video_ids import validate_video_id, video_id_from_path

PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 84}
REPO = Path(__file__).resolve().parents[2]


def _config(model: str, input: str, output: str, **kw) -> IndexConfig:
    return IndexConfig(input=input, output=output, model=model,
                       prefill=PrefillSettings(capacity=24, fps=4.0, **PIXELS), **kw)


def _videos(folder: Path, lengths: dict[str, int]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, n) in enumerate(lengths.items()):
        out[name] = folder / f"{name}.mp4"
        write_video(out[name], synthetic_frames(n, seed=i), fps=4.0)
    return out


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    from statekv import Engine
    from statekv.policies import make_policy
    from statekv.video import SamplingConfig

    return Engine.from_pretrained(tiny_checkpoints["qwen2_vl"], policy=make_policy("statekv", capacity=24),
                                  device="cpu", sampling=SamplingConfig(fps=4.0, **PIXELS))


def _answer(engine, cache) -> list[int]:
    return engine.ask(cache, "What happens?", max_new_tokens=6).token_ids


def test_video_ids_are_stable_and_safe():
    assert video_id_from_path("a.mp4") == "a"
    assert video_id_from_path("x/y/z.mkv") == "x--y--z"
    odd = video_id_from_path("dir/clip 1 (final).mp4")
    assert odd == video_id_from_path("dir/clip 1 (final).mp4") and validate_video_id(odd)
    assert odd.startswith("dir--clip_1_final_-")
    assert validate_video_id(video_id_from_path("../parts-1.mp4"))
    with pytest.raises(ValueError):
        validate_video_id("../etc")


def test_actor_on_a_hand_made_batch_without_ray(tiny_checkpoints, tmp_path, engine):
    """The actor is a plain class: one call on a batch of two rows (one good, one zero bytes) gives two rows."""
    videos = _videos(tmp_path / "in", {"a": 8})
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    config = _config(tiny_checkpoints["qwen2_vl"], str(tmp_path / "in"), str(tmp_path / "out"), track_memory=True)
    rows = probe_inputs(list_inputs(config.input), config)
    from pipelines.indexing.actor import _columns

    actor = IndexActor(config)
    out = actor(_columns(rows, list(rows[0])))
    by_id = dict(zip(out["video_id"], out["status"]))
    assert by_id == {"a": "ok", "empty": "failed"}
    assert "zero-length" in out["error"][list(out["video_id"]).index("empty")]
    assert out["peak_bytes"][list(out["video_id"]).index("a")] > 0
    ok = list(out["video_id"]).index("a")
    assert out["lm_s"][ok] > 0 and out["store_s"][ok] > 0 and out["fetch_s"][ok] == 0  # a local file: no fetch
    assert sum(out[f"{name}_s"][ok] for name in SHARE_NAMES) == pytest.approx(out["seconds"][ok])
    actor.config.stage_times = False  # the same row again (now committed: skipped), unmeasured
    again = actor(_columns(rows[:1] if rows[0]["video_id"] == "a" else rows[1:], list(rows[0])))
    assert again["seconds"][0] > 0 and all(again[f"{name}_s"][0] == 0 for name in SHARE_NAMES)
    direct = engine.prefill(str(videos["a"]))
    assert _answer(engine, load_cache(str(tmp_path / "out" / "a"))) == _answer(engine, direct)


def test_end_to_end_on_s3(ray_cluster, tiny_checkpoints, s3_server, tmp_path, engine):
    """Five videos on S3, one corrupt and one empty: three committed caches equal to direct prefill, two failures."""
    import s3fs

    endpoint, options = s3_server
    videos = _videos(tmp_path / "src", {"v0": 8, "v1": 12, "v2": 16})
    (tmp_path / "src" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "src" / "empty.mp4").write_bytes(b"")
    fs = s3fs.S3FileSystem(**options.to_fsspec(), skip_instance_cache=True)
    for p in sorted((tmp_path / "src").iterdir()):
        fs.put_file(str(p), f"caches/e2e-in/sub/{p.name}")
    config = _config(tiny_checkpoints["qwen2_vl"], "s3://caches/e2e-in/", "s3://caches/e2e-out",
                     storage_options=options, actors=2)
    printed: list[str] = []
    summary = run_index(config, echo=printed.append)
    assert (summary.ok, summary.failed, summary.skipped) == (3, 2, 0)
    report = {r["video_id"]: r for r in read_report(summary.report_uri, options)}
    _check_stage_shares(report, read_summary(summary.report_uri, options), printed)
    assert {k: r["status"] for k, r in report.items()} == {
        "sub--v0": "ok", "sub--v1": "ok", "sub--v2": "ok", "sub--corrupt": "failed", "sub--empty": "failed"}
    assert "zero-length" in report["sub--empty"]["error"]
    assert "VideoDecodeError" in report["sub--corrupt"]["error"]
    entries = list_caches("s3://caches/e2e-out", storage_options=options)
    assert [e.video_id for e in entries] == ["sub--v0", "sub--v1", "sub--v2"]
    for name, path in videos.items():
        stored = load_cache(f"s3://caches/e2e-out/sub--{name}", storage_options=options)
        assert report[f"sub--{name}"]["chunks"] == stored.num_chunks
        assert _answer(engine, stored) == _answer(engine, engine.prefill(str(path)))
    # the same job again skips everything committed
    again = run_index(config, echo=lambda s: None)
    assert (again.ok, again.skipped, again.failed) == (0, 3, 2)


def _check_stage_shares(report: dict, summary: dict, printed: list[str]) -> None:
    """Every ok video's actor time is split into fetch, decode, preprocess, vision, lm, store and other, each
    measured (> 0; other >= 0) and adding up to the video's seconds; summary.json and the printed summary show the
    same shares per video and over the run."""
    ok = [r for r in report.values() if r["status"] == "ok"]
    for r in ok:
        parts = {name: r[f"{name}_s"] for name in SHARE_NAMES}
        assert all(v >= 0 for v in parts.values()), parts
        assert all(parts[name] > 0 for name in STAGE_NAMES), parts  # the input is on S3: fetch is measured too
        assert sum(parts.values()) == pytest.approx(r["seconds"], rel=1e-6)
    assert sum(summary["stage_shares"].values()) == pytest.approx(1.0)
    assert summary["busy_s"] == pytest.approx(sum(r["seconds"] for r in ok))
    per_video = {v["video_id"]: v for v in summary["per_video"]}
    assert sorted(per_video) == sorted(r["video_id"] for r in ok)
    for r in ok:
        v = per_video[r["video_id"]]
        assert set(v["stage_shares"]) == set(SHARE_NAMES) and all(x >= 0 for x in v["stage_shares"].values())
        assert sum(v["stage_shares"].values()) == pytest.approx(1.0)
        assert v["stage_shares"]["lm"] == pytest.approx(r["lm_s"] / r["seconds"])
    text = "\n".join(printed)
    assert "actor time" in text and all(f"{name} " in text for name in SHARE_NAMES)
    progress, summary_lines = printed[:-1], printed[-1].splitlines()
    for r in ok:  # a line with its shares as the video finishes, and one in the summary
        for lines in (progress, summary_lines):
            assert any(f" {r['video_id']}" in line and "vision " in line for line in lines), lines


def test_manifest_input_with_ids_and_time_ranges(ray_cluster, tiny_checkpoints, tmp_path, engine):
    videos = _videos(tmp_path / "in", {"long": 16, "short": 8})
    manifest = tmp_path / "in" / "list.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"uri": "long.mp4", "video_id": "first-half", "start": 0.0, "end": 2.0},
        {"uri": str(videos["short"])},
        {"uri": "missing.mp4", "video_id": "gone"},
        {"uri": "short.mp4", "video_id": "../bad"},
    ]))
    config = _config(tiny_checkpoints["qwen2_vl"], str(manifest), str(tmp_path / "out"))
    summary = run_index(config, echo=lambda s: None)
    statuses = {r["video_id"]: (r["status"], r["error"]) for r in summary.rows}
    assert statuses["first-half"][0] == "ok" and statuses["short"][0] == "ok"
    assert statuses["gone"] == ("failed", "missing: no such file")
    assert [s for s, _ in statuses.values()].count("failed") == 2
    clip = load_cache(str(tmp_path / "out" / "first-half"))
    assert clip.video.total_frames == 8  # 2 s at 4 fps
    frames = synthetic_frames(16, seed=0)[:8]
    assert clip.num_chunks == engine.prefill(frames, fps=4.0).num_chunks


def test_tar_shard_input(ray_cluster, tiny_checkpoints, tmp_path, engine):
    videos = _videos(tmp_path / "src", {"a": 8, "b": 12})
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        for name, path in videos.items():
            tar.add(path, arcname=f"clips/{name}.mp4")
            info = tarfile.TarInfo(f"clips/{name}.json")
            payload = b'{"caption": "x"}'
            info.size = len(payload)
            import io

            tar.addfile(info, io.BytesIO(payload))
    rows = list_inputs(str(shards))
    assert [r["member"] for r in rows] == ["*"]
    members = expand_shard(rows[0])
    assert [r["video_id"] for r in members] == ["shard-000--clips--a", "shard-000--clips--b"]
    config = _config(tiny_checkpoints["qwen2_vl"], str(shards / "*.tar"), str(tmp_path / "out"))
    summary = run_index(config, echo=lambda s: None)
    assert (summary.ok, summary.failed) == (2, 0)
    for name, path in videos.items():
        stored = load_cache(str(tmp_path / "out" / f"shard-000--clips--{name}"))
        assert _answer(engine, stored) == _answer(engine, engine.prefill(str(path)))


def _index_cmd(model: str, input: str, output: str, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.index_videos", "--input", input, "--output", output, "--model", model,
            "--address", address, "--capacity", "24", "--fps", "4", "--min-pixels", str(PIXELS["min_pixels"]),
            "--max-pixels", str(PIXELS["max_pixels"]), "--decode-cpus", "1", *extra]


def _fingerprint(uri: str) -> tuple:
    m = read_manifest(uri)
    cache = load_cache(uri)
    keys = torch.stack([torch.cat([c.keys[0].flatten() for c in cache.chunks])]).sum().item()
    return m["totals"]["chunks"], m["totals"]["tokens"], round(keys, 4)


def _processes() -> dict[int, tuple[int, bytes]]:
    """{pid: (parent pid, command line)} of this machine's processes."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            out[int(proc.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), (proc / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return out


def _job_actor_pids() -> list[int]:
    """Indexing actors of this session's Ray (workers are children of its raylet, a child of this process)."""
    procs = _processes()
    raylets = {pid for pid, (ppid, cmd) in procs.items() if ppid == os.getpid() and b"raylet" in cmd}
    return [pid for pid, (ppid, cmd) in procs.items()
            if ppid in raylets and b"ray::" in cmd and b"IndexActor" in cmd]


def test_killed_driver_then_rerun_commits_each_cache_once(ray_cluster, tiny_checkpoints, tmp_path):
    """SIGKILL of the driver mid-run: its report so far survives (rows are written as videos finish), Ray ends the
    killed job's actors, and the same job again commits every cache once, like a clean run.

    The killed run's report used to be lost, so the videos it finished showed only as "skipped" on the rerun.
    """
    names = {f"k{i}": 48 for i in range(4)}  # long enough that the run is still going when the first row lands
    _videos(tmp_path / "in", names)
    address = ray_cluster.get_runtime_context().gcs_address
    model = tiny_checkpoints["qwen2_vl"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_index_cmd(model, str(tmp_path / "in"), str(out), address), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    partial: list[dict] = []
    while time.time() < deadline and not any(r["status"] == "ok" for r in partial):
        assert proc.poll() is None, "the job ended before it was killed"
        runs = list((out / "_reports").glob("run-*"))
        partial = read_report(str(runs[0])) if runs and list(runs[0].glob("parts/part-*.parquet")) else []
        time.sleep(0.05)
    assert _job_actor_pids(), "the killed job's actors should be running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = list((out / "_reports").glob("run-*"))
    partial = read_report(str(run))  # what the killed driver had received, read from its parts
    ok = [r["video_id"] for r in partial if r["status"] == "ok"]
    assert ok and all((out / vid / "manifest.json").exists() for vid in ok)
    deadline = time.time() + 120  # Ray ends a dead driver's actors once it notices the driver is gone
    while _job_actor_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert not _job_actor_pids(), "actors of the killed job are still running"
    committed_before = len(list(out.glob("*/manifest.json")))
    assert 1 <= committed_before <= len(names)
    rerun = subprocess.run(_index_cmd(model, str(tmp_path / "in"), str(out), address), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    clean = tmp_path / "clean"
    run_index(_config(model, str(tmp_path / "in"), str(clean)), echo=lambda s: None)
    entries = list_caches(str(out))
    assert sorted(e.video_id for e in entries) == sorted(names)
    for name in names:
        folder = out / name
        m = read_manifest(str(folder))
        named = {f["path"].split("/")[0] for f in m["files"]}
        sweep(str(folder), grace_s=0)  # a killed attempt is deleted by a later sweep (after a grace period)
        on_disk = {p.name for p in folder.iterdir() if p.name not in ("manifest.json", ".lock")}
        assert on_disk == named, "leftover attempt folders"
        assert _fingerprint(str(folder)) == _fingerprint(str(clean / name))


def test_actor_memory_does_not_grow_with_video_length(ray_cluster, tiny_checkpoints, tmp_path):
    """Peak tensor memory of a model actor for a 4x longer video stays within a small margin of the short one's."""
    _videos(tmp_path / "in", {"short": 16, "long": 64})
    config = _config(tiny_checkpoints["qwen2_vl"], str(tmp_path / "in"), str(tmp_path / "out"), track_memory=True,
                     prefetch_batches=2)
    summary = run_index(config, echo=lambda s: None)
    rows = {r["video_id"]: r for r in summary.rows}
    assert rows["long"]["chunks"] == 4 * rows["short"]["chunks"]
    short, long = rows["short"]["peak_bytes"], rows["long"]["peak_bytes"]
    assert 0 < short and long <= 1.25 * short, (short, long)


# --- one video's failure, of any kind, is that video's row (issue 9, point 4) ---------------------------------


def test_one_failure_of_any_kind_fails_only_that_video(ray_cluster, tiny_checkpoints, s3_server, tmp_path, engine):
    """A missing decoder, an S3 permission error on one object, an out-of-memory and a plain bug on one video each:
    four failed rows naming the exception, the fifth video committed, the run finished and its report written.

    Each of these used to end the whole run with a traceback and no report (only the expected video and store
    errors were caught). The unreadable object is a real one: archived to the GLACIER storage class, S3 answers
    its GET with 403 InvalidObjectState, which s3fs raises as PermissionError (its HEAD still works, so the
    failure happens in the actor, where the object is read).
    """
    import boto3
    import s3fs

    endpoint, options = s3_server
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    _videos(tmp_path / "src", {"ok": 8, "oom": 8, "nodecoder": 8, "denied": 8, "bug": 8})
    fs = s3fs.S3FileSystem(**options.to_fsspec(), skip_instance_cache=True)
    for p in sorted((tmp_path / "src").iterdir()):
        fs.put_file(str(p), f"caches/{prefix}/in/{p.name}")
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").put_object(Bucket="caches", Key=f"{prefix}/in/denied.mp4",
                                                     Body=(tmp_path / "src" / "denied.mp4").read_bytes(),
                                                     StorageClass="GLACIER")
    with pytest.raises(PermissionError):
        fs.cat_file(f"caches/{prefix}/in/denied.mp4")
    config = _config(tiny_checkpoints["qwen2_vl"], f"s3://caches/{prefix}/in/", f"s3://caches/{prefix}/out",
                     storage_options=options, backend="decord", video_hook="pipelines.indexing.faults:inject",
                     video_hook_args={"faults": {"oom": "oom", "nodecoder": "no_decoder", "bug": "error"}})
    summary = run_index(config, echo=lambda s: None)
    rows = {r["video_id"]: r for r in read_report(summary.report_uri, options)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "ok": "ok", "oom": "failed", "nodecoder": "failed", "denied": "failed", "bug": "failed"}
    assert rows["oom"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert rows["nodecoder"]["error"] == "ModuleNotFoundError: import of decord halted; None in sys.modules"
    assert rows["denied"]["error"].startswith("PermissionError: ")
    assert rows["bug"]["error"] == "ValueError: injected bug for bug"
    assert [e.video_id for e in list_caches(f"s3://caches/{prefix}/out", storage_options=options)] == ["ok"]
    stored = load_cache(f"s3://caches/{prefix}/out/ok", storage_options=options)
    assert _answer(engine, stored) == _answer(engine, engine.prefill(str(tmp_path / "src" / "ok.mp4")))


def test_a_run_that_cannot_proceed_still_writes_its_report(ray_cluster, tiny_checkpoints, tmp_path):
    """Model actors that cannot start (the video hook names no function) end the run with IndexRunError, after the
    report — probe failures included, the unindexed videos as failed rows — has been written."""
    _videos(tmp_path / "in", {"a": 8})
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    config = _config(tiny_checkpoints["qwen2_vl"], str(tmp_path / "in"), str(tmp_path / "out"),
                     video_hook="pipelines.indexing.faults:no_such_hook")
    with pytest.raises(IndexRunError, match=r"the run stopped after 0 of 1 video\(s\).*report: ") as err:
        run_index(config, echo=lambda s: None)
    report = str(err.value).rsplit("report: ", 1)[1]
    rows = {r["video_id"]: (r["status"], r["error"]) for r in read_report(report)}
    assert rows["empty"] == ("failed", "zero-length file")
    assert rows["a"][0] == "failed" and rows["a"][1].startswith("not indexed: the run stopped")


def test_missing_credentials_are_one_clear_line(tmp_path):
    """No AWS credentials in the job's environment: exit 1 and one line that says how to pass them, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(REPO), AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "jobs.index_videos", "--input", "s3://archive/videos/",
                           "--output", str(tmp_path / "out"), "--model", "unused", "--endpoint-url",
                           "http://127.0.0.1:9"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("index_videos: error: no AWS credentials to list 's3://archive/videos/'")
    assert "runtime env's env_vars" in lines[0]
