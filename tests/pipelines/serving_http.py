"""What the tests that run the service over real HTTP share: a free loopback port and waiting for a route to answer."""

from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: httpx.Client, path: str, timeout: float = 180.0) -> None:
    """Poll `path` until it answers 200 (no fixed sleeps); TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not ready after {timeout} s")
        threading.Event().wait(0.2)
