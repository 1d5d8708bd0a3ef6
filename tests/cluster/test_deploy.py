"""The deployment files, as far as they run without a container engine: haproxy's config (checked, and run
in front of stand-in replicas on loopback) and the image's entrypoint command."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.cluster_env import ensure_haproxy
from tests.fakes.wire import free_port
from tests.subprocess_helpers import child_env, wait_for_port

pytestmark = pytest.mark.cluster
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class Replica:
    """A stand-in replica: answers GET /readyz, and on a POST reads the request and closes the
    connection without answering (a replica that died after the request reached it). Counts the POSTs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.posts = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    head = conn.recv(65536)
                except OSError:
                    continue
                if head.startswith(b"POST"):
                    self.posts += 1
                    continue  # closes without an answer
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def loopback_config(servers: list[int], port: int) -> str:
    """deploy/haproxy.cfg as written, with its listening address and replicas moved to loopback ports."""
    out: list[str] = []
    in_resolvers = False
    servers_left = list(servers)
    for line in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        if line.startswith("resolvers "):
            in_resolvers = True  # docker's DNS: not here
            continue
        if in_resolvers:
            in_resolvers = bool(line.strip())
            continue
        line = line.replace("bind *:8080", f"bind 127.0.0.1:{port}").replace(" resolvers docker", "")
        if line.strip().startswith("server flux-"):
            if not servers_left:
                continue
            name = line.split()[1]
            line = f"    server {name} 127.0.0.1:{servers_left.pop(0)}"
        out.append(line)
    text = "\n".join(out) + "\n"
    return text.replace("log stdout format raw local0 warning", "")


@pytest.fixture
def haproxy_with(tmp_path: Path) -> Iterator[callable]:
    started: list[subprocess.Popen[bytes]] = []

    def start(servers: list[int]) -> str:
        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(loopback_config(servers, port))
        proc = subprocess.Popen([ensure_haproxy(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(proc)
        wait_for_port(port, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_haproxy_config_is_valid():
    proc = subprocess.run([ensure_haproxy(), "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Configuration file is valid" in proc.stdout + proc.stderr


def test_haproxy_never_replays_a_post_that_reached_a_replica(haproxy_with):
    replicas = [Replica(), Replica(), Replica()]
    try:
        url = haproxy_with([r.port for r in replicas])
        for _ in range(3):
            answer = httpx2.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, timeout=30)
            assert answer.status_code == 502
        assert sum(r.posts for r in replicas) == 3  # each POST reached exactly one replica, once
    finally:
        for r in replicas:
            r.close()


def test_haproxy_moves_a_refused_connection_to_another_replica(haproxy_with):
    class Answering(Replica):
        def _serve(self) -> None:
            while not self._stop:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    self.posts += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    alive = Answering()
    dead = free_port()  # nothing listens: the connection is refused before any request is sent
    try:
        url = haproxy_with([dead, alive.port])
        answers = [httpx2.post(f"{url}/mcp", json={}, timeout=30).status_code for _ in range(4)]
        assert answers == [200, 200, 200, 200]
    finally:
        alive.close()


@pytest.mark.anyio
async def test_the_image_entrypoint_serves_health_and_mcp(home: Path, workspace: Path):
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1))
    assert entry[:3] == ["flux-mcp", "serve", "--transport"]
    port = free_port()
    # As in the image, but on loopback (tests send traffic only there) and a free port.
    args = [a for a in entry[1:]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    from tests.subprocess_helpers import flux_command

    token = "image-entrypoint-token-1234-5678-9abc-def0"
    proc = subprocess.Popen(flux_command(*args), env=child_env(home, FLUX_MCP_AUTH_TOKENS=f"team:{token}"),
                            cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{port}/healthz")
            denied = await http.post(f"http://127.0.0.1:{port}/mcp", json={})
        assert health.status_code == 200 and denied.status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # On the image's own address (all interfaces) it refuses to start without a token.
    refused = subprocess.run(flux_command(*entry[1:]), env=child_env(home), cwd=workspace, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "FLUX_MCP_AUTH_TOKENS" in refused.stderr
