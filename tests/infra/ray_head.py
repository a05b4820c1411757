"""A real Ray head for the tests that join or submit to one: Ray's own `ray start --head --block` on loopback ports
with its own temp dir (so no other test's `ray.init()` finds it), started without any AWS variables, and stopped by
signalling the processes it started — never `ray stop`, which would end every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port> (job server, state API)
    gcs: str  # 127.0.0.1:<port>, what `--address` joins
    env: dict[str, str]  # the environment the head runs with (and the `ray` CLI needs: its auth mode and token)
    temp_dir: str


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_port_block(n: int) -> list[int]:
    """`n` consecutive ports, every one free now, below the kernel's ephemeral range (so no port another process
    asks the kernel for — another test's `free_ports`, an outgoing connection — can land inside the block). A head
    takes its component ports and its worker-port range from one block: ranges drawn apart once collided, the
    raylet's port falling inside the workers' range, and Ray refused to start."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, low - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return list(range(base, base + n))
    raise RuntimeError(f"no {n} consecutive free ports below {low}")


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    """Send `sig`; a process that has already exited is what was wanted."""
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, sig)


def _pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names `temp_dir`: the Ray processes of the head a test started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def start_head(*, auth: str = "disabled", num_cpus: int = 2) -> Iterator[Head]:
    """A fresh single-node head on 127.0.0.1. `auth="token"` turns Ray's token authentication on, with a token
    written to `<temp_dir>/auth_token` (RAY_AUTH_TOKEN_PATH in `Head.env`)."""
    temp_dir = tempfile.mkdtemp(prefix="skv-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    block = free_port_block(9 + 41)
    gcs, dash, client, node, obj, agent_http, agent_grpc, rt_env, metrics = block[:9]
    workers = block[9]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", RAY_AUTH_MODE=auth,
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    if auth == "token":
        token = Path(temp_dir) / "auth_token"
        token.write_text(os.urandom(16).hex())
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--node-manager-port={node}", f"--object-manager-port={obj}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
         f"--min-worker-port={workers}", f"--max-worker-port={workers + 40}", f"--num-cpus={num_cpus}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:  # ready once the job server answers
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            probe = subprocess.run(["ray", "job", "list", "--address", url], env=env, capture_output=True,
                                   text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, probe.stderr[-2000:]
            time.sleep(1)
        yield Head(dashboard=url, gcs=f"127.0.0.1:{gcs}", env=env, temp_dir=temp_dir)
    finally:
        # Ctrl-C, as a user stops `ray start --block`: it stops its processes in ~4 s (SIGTERM waits out 30 s)
        _signal(head.pid, signal.SIGINT, group=True)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal(head.pid, signal.SIGKILL, group=True)
            head.wait()
        log.close()
        # agents and workers outlive the raylet (for up to 30 s, waiting on their own timeouts): ask them to stop,
        # then end what is left; only this head's processes name its temp dir
        for pid in _pids_under(temp_dir):
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 5
        while _pids_under(temp_dir) and time.time() < deadline:
            time.sleep(0.2)
        for pid in _pids_under(temp_dir):
            _signal(pid, signal.SIGKILL)
