"""Starting the real `flux-mcp` command in a child process, with a fake provider on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fakes.wire import free_port


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no provider keys but the ones given, the data folder in `home`."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")}
    return {**keep, "HOME": str(home.parent), "FLUX_MCP_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def flux_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flux_mcp", *args]


@contextlib.contextmanager
def http_server(transport: str, env: dict[str, str], cwd: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Runs `flux-mcp serve --transport <transport>` on a free loopback port; yields (base URL, process)."""
    port = free_port()
    log = open(cwd / f".server-{port}.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(flux_command("serve", "--transport", transport, "--port", str(port), *extra),
                            env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for_port(port: int, proc: subprocess.Popen, limit: float = 30.0) -> None:
    """Returns once something listens on 127.0.0.1:`port`; raises if `proc` exits first or time runs out."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not start listening")
