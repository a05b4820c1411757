"""`statekv index --address` and `statekv serve --address` joining a running cluster, as a user does it: Ray's own
head (`ray start --head`) with token authentication on and no AWS variables, videos on the loopback S3 server, and
the credentials only in the shell that runs the command (issue #20, points 1 and 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.infra.ray_head import REPO, free_ports, start_head
from tests.pipelines.test_indexing import PIXELS, _videos

pytestmark = pytest.mark.slow
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def shell_env(head_env: dict[str, str], home) -> dict[str, str]:
    """The submitting shell: the credentials and the cluster's token file, but no RAY_AUTH_MODE (statekv infers it
    from the token, as `ray start --head` does) and a HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in head_env.items() if k != "RAY_AUTH_MODE"}
    return {**env, **CREDENTIALS, "HOME": str(home), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def token_head():
    """One token-auth head for this module's tests (a head takes ~12 s to start and ~4 s to stop)."""
    with start_head(auth="token") as head:
        yield head


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_index_and_serve_join_a_token_auth_cluster_with_the_shells_credentials(s3_server, tiny_checkpoints, tmp_path,
                                                                               token_head):
    import s3fs

    from statekv.store import list_caches

    endpoint, options = s3_server
    prefix = f"join-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(**options.to_fsspec(), skip_instance_cache=True)
    for path in _videos(tmp_path / "src", {"a": 8, "b": 8}).values():
        fs.put_file(str(path), f"caches/{prefix}/videos/{path.name}")
    model = tiny_checkpoints["qwen2_vl"]
    caches = f"s3://caches/{prefix}/caches"
    (tmp_path / "home").mkdir()
    head = token_head
    env = shell_env(head.env, tmp_path / "home")
    index = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "index", f"s3://caches/{prefix}/videos/", caches, "--address", head.gcs,
         "--endpoint-url", endpoint, "--model", model, "--capacity", "24", "--fps", "4",
         "--min-pixels", str(PIXELS["min_pixels"]), "--max-pixels", str(PIXELS["max_pixels"])],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert index.returncode == 0, (index.stdout[-3000:], index.stderr[-3000:])
    assert "2 indexed, 0 skipped, 0 failed" in index.stdout + index.stderr, index.stdout[-3000:]
    assert "InvalidAuthToken" not in index.stderr and "Found credentials" not in index.stderr
    assert "testing" not in index.stdout + index.stderr  # no credential is printed
    assert [e.video_id for e in list_caches(caches, storage_options=options)] == ["a", "b"]

    port = free_ports(1)[0]
    serve = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", "--caches", caches, "--model", model, "--address", head.gcs,
         "--endpoint-url", endpoint, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while not any("answering questions" in line for line in lines):
            assert serve.poll() is None and time.time() < deadline, "".join(lines)[-4000:]
            lines.append(serve.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/v1/videos", timeout=120) as response:
            listing = json.loads(response.read())
        assert [v["video_id"] for v in listing["videos"]] == ["a", "b"]
        answer = post(f"{base}/v1/ask", {"video_id": "a", "question": "What happens?", "max_new_tokens": 4})
        assert answer["video_id"] == "a" and len(answer["token_ids"]) >= 1
    finally:
        os.killpg(serve.pid, signal.SIGTERM)  # a container stop: the service says it stops, and does
        out, _ = serve.communicate(timeout=120)
    logs = "".join(lines) + out
    assert serve.returncode == 0, logs[-4000:]
    assert "statekv serve: stopping" in logs


def test_a_join_without_the_token_is_one_line(tmp_path, token_head):
    """A client with no token for a token-auth cluster: Ray retries for 20 s and fails; the error is one line
    naming the address and what to set."""
    head = token_head
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))  # no ~/.ray/auth_token
    code = ("import sys\nfrom pipelines.cluster import init_ray\n"
            f"try:\n    init_ray({head.gcs!r})\nexcept ConnectionError as err:\n    print(err)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 3, done.stderr[-3000:]
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith(f"cannot join the Ray cluster at '{head.gcs}'")
    assert "RAY_AUTH_MODE=unset, no token found" in line and "RAY_AUTH_MODE=token" in line
