"""Start a real ``moekit serve`` subprocess for the server tests and wait until it answers /health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, root, *flags: str) -> dict:
    """``moekit serve ckpt --name tiny *flags`` on a free port, logging to ``root/server.log``; fails the test
    if it exits or does not answer within 10 minutes. Returns proc, base URL, port and the log file."""
    port = free_port()
    log = open(root / "server.log", "w+")  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", str(ckpt), "--port", str(port),
                             "--name", "tiny", *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return {"proc": proc, "base": base, "port": port, "log": log}
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("server did not start")
