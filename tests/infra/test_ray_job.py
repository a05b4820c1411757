"""`ray job submit` of the indexing job to a real Ray head, the way the README's AWS steps do it.

The test starts its own head (`ray start --head --block` on loopback ports, its own temp dir, a dashboard for the
job server and the state API), submits `python -m jobs.index_videos` with the repository as working dir, videos
on the loopback S3 server and the AWS credentials passed as the README says (the runtime env's `env_vars`: the
head is started without any), then submits it again over the committed caches. It stops the head by signalling
the processes it started — never `ray stop`, which would end every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.infra.ray_head import start_head
from tests.pipelines.test_indexing import PIXELS, _videos

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """(dashboard URL, env for the `ray` CLI) of a fresh single-node head on 127.0.0.1 with 2 CPUs."""
    with start_head(auth="disabled") as head:
        yield head.dashboard, head.env


def _submit(url: str, env: dict, runtime_env: dict, *args: str) -> tuple[str, str]:
    """Submit the indexing job and wait for it; (submission id, its logs)."""
    sub = f"index-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", url, "--submission-id", sub, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "jobs.index_videos",
         "--address", "auto", *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:])
    return sub, proc.stdout


def _state(url: str, env: dict, kind: str, *filters: str) -> list[dict]:
    """`ray list <kind>` through the head's state API, as dicts."""
    cmd = ["ray", "list", kind, "--address", url, "--format", "json", "--limit", "10000", "--detail"]
    for f in filters:
        cmd += ["--filter", f]
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)


def _job(url: str, env: dict, sub: str) -> dict:
    (job,) = [j for j in _state(url, env, "jobs") if j.get("submission_id") == sub]
    assert job["status"] == "SUCCEEDED", job
    return job


def _index_actors(url: str, env: dict) -> list[dict]:
    """Every indexing actor the head has seen (alive or dead), whichever job made it."""
    return [a for a in _state(url, env, "actors") if "IndexActor" in a["class_name"]]


def test_ray_job_submit_indexes_from_s3_then_skips_without_actors(ray_head, s3_server, tiny_checkpoints,
                                                                   tmp_path):
    """A real job on a real head: three videos from S3 indexed by one model actor, listing and probing done in the
    driver (no Ray task for them); the same job again skips all three without starting any actor."""
    import s3fs

    from pipelines.indexing import read_report
    from statekv.store import list_caches

    url, env = ray_head
    endpoint, options = s3_server
    prefix = f"job-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(**options.to_fsspec(), skip_instance_cache=True)
    for path in _videos(tmp_path / "src", {"a": 8, "b": 8, "c": 12}).values():
        fs.put_file(str(path), f"caches/{prefix}/videos/{path.name}")
    runtime_env = {"env_vars": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_DEFAULT_REGION": "us-east-1"}}
    args = ["--input", f"s3://caches/{prefix}/videos/", "--output", f"s3://caches/{prefix}/caches",
            "--endpoint-url", endpoint, "--model", tiny_checkpoints["qwen2_vl"], "--capacity", "24", "--fps", "4",
            "--min-pixels", str(PIXELS["min_pixels"]), "--max-pixels", str(PIXELS["max_pixels"])]

    first, logs = _submit(url, env, runtime_env, *args)
    assert "3 video(s) in" in logs and "3 to index" in logs, logs[-3000:]
    assert "3 indexed, 0 skipped, 0 failed" in logs, logs[-3000:]
    assert [e.video_id for e in list_caches(f"s3://caches/{prefix}/caches", storage_options=options)] == \
        ["a", "b", "c"]
    report = logs.rsplit("report: ", 1)[1].split()[0]
    assert {r["status"] for r in read_report(report, options)} == {"ok"}
    job = _job(url, env, first)
    assert [a["job_id"] for a in _index_actors(url, env)] == [job["job_id"]]
    names = [t["name"] for t in _state(url, env, "tasks", f"job_id={job['job_id']}")]
    assert not [n for n in names if "probe" in n.lower() or "expand_shard" in n or "FlatMap" in n], names

    second, logs = _submit(url, env, runtime_env, *args)
    assert "0 to index" in logs and "0 indexed, 3 skipped, 0 failed" in logs, logs[-3000:]
    again = _job(url, env, second)
    assert len(_index_actors(url, env)) == 1, "the rerun started model actors"
    summary = [line for line in logs.splitlines() if "0 indexed, 3 skipped" in line][0]
    print(f"rerun over 3 committed caches: job {(again['end_time'] - again['start_time']) / 1000:.1f} s, "
          f"driver: {summary.split(' in ')[-1].split(' (')[0]} (first run: job "
          f"{(job['end_time'] - job['start_time']) / 1000:.1f} s)")
