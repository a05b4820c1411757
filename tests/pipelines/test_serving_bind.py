"""Closed by default, through the real entry point: `statekv serve` without keys refuses to listen beyond loopback;
`--no-auth` listens on every interface with one warning; a service without keys answers loopback clients only."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from jobs import serve as serve_job
from jobs.cli import build_parser
from jobs.cli import main as cli_main
from pipelines.serving.config import ServiceConfig
from pipelines.serving.keys import add_key
from statekv.store import prefill_to_store
from statekv.testing.videos import synthetic_frames
from tests.pipelines.serving_http import free_port


def _outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine: the source address of a route out (a UDP connect sends
    nothing); None if it has none."""
    for target in ("10.255.255.255", "192.0.2.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                address = s.getsockname()[0]
        except OSError:
            continue
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def _wait(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        threading.Event().wait(0.2)


@pytest.fixture(scope="module")
def root(tmp_path_factory, engine):
    root = str(tmp_path_factory.mktemp("bind") / "caches")
    prefill_to_store(engine, synthetic_frames(4, 56, 84, seed=0), f"{root}/clip", fps=2.0)
    return root


def test_non_loopback_bind_without_keys_is_refused(root, tiny_checkpoints, tmp_path, capsys):
    args = ["serve", "--caches", root, "--model", tiny_checkpoints["qwen2_vl"], "--host", "0.0.0.0", "--num-cpus",
            "0.5"]
    assert cli_main(args) == 1  # before any cluster starts (ray.init would fail here: Ray is not running)
    err = capsys.readouterr().err.strip()
    assert err.startswith("statekv serve: error: refusing to listen on 0.0.0.0 without API keys") and "\n" not in err
    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"id": "x"}]}')
    assert cli_main([*args, "--api-keys", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"statekv serve: error: key file {bad}: keys[0]: key 'x': ") and "\n" not in err
    add_key(str(tmp_path / "good.json"), "k", prefixes=[""])
    config = serve_job.prepare(build_parser().parse_args([*args, "--api-keys", str(tmp_path / "good.json")]))
    assert config.api_keys_file == str(tmp_path / "good.json") and not config.no_auth
    with pytest.raises(SystemExit):  # --no-auth and --api-keys exclude each other
        build_parser().parse_args([*args, "--no-auth", "--api-keys", str(tmp_path / "good.json")])


def test_no_auth_serves_every_interface_with_one_warning(ray_cluster, root, tiny_checkpoints, caplog):
    """`--no-auth` on 0.0.0.0: answered on loopback and on the machine's other address, one warning logged. A second
    app without keys (and without no_auth) on the same proxy answers loopback clients only."""
    from ray import serve

    from pipelines.serving.app import build_app

    port = free_port()
    args = build_parser().parse_args(["serve", "--caches", root, "--model", tiny_checkpoints["qwen2_vl"], "--host",
                                      "0.0.0.0", "--port", str(port), "--no-auth", "--num-cpus", "0.5",
                                      "--device", "cpu"])
    with caplog.at_level(logging.WARNING):
        config = serve_job.prepare(args)
        url = serve_job.start(args, config)
    try:
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "no_auth" in r.getMessage()]
        assert len(warnings) == 1 and "every client" in warnings[0].getMessage()
        assert url == f"http://0.0.0.0:{port}"
        closed = ServiceConfig(model=tiny_checkpoints["qwen2_vl"], caches_root=root, device="cpu", num_cpus=0.5)
        serve.run(build_app(closed), name="closed", route_prefix="/closed", blocking=False)
        _wait(f"http://127.0.0.1:{port}/healthz")
        _wait(f"http://127.0.0.1:{port}/closed/healthz")
        body = {"video_id": "clip", "question": "What?", "max_new_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/ask", json=body, timeout=60).status_code == 200
        assert httpx.post(f"http://127.0.0.1:{port}/closed/v1/ask", json=body, timeout=60).status_code == 200
        outside = _outside_address()
        if outside is None:
            pytest.skip("this machine has no non-loopback address to ask from")
        assert httpx.post(f"http://{outside}:{port}/v1/ask", json=body, timeout=60).status_code == 200
        r = httpx.post(f"http://{outside}:{port}/closed/v1/ask", json=body, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "loopback_only"
        assert httpx.get(f"http://{outside}:{port}/closed/healthz", timeout=60).status_code == 200  # probes
    finally:
        serve.shutdown()
