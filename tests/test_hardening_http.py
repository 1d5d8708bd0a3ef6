"""The HTTP server against hostile clients, over real loopback sockets: slow and idle connections are
cut off, the connection count stays under the descriptor limit with one log line, one client cannot
take every session, and bearer tokens resist guessing (long enough, failed attempts throttled)."""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import anyio
import httpx2
import pytest
import uvicorn

from flux_mcp.httpguard import FD_RESERVE, HttpLimits, QuietRepeats, uvicorn_config
from flux_mcp.transport import http_app
from tests.conftest import ATLAS_KEY
from tests.fakes.wire import free_port
from tests.subprocess_helpers import child_env, flux_command, wait_for_port

pytestmark = [pytest.mark.anyio]
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
TOKEN = "tok-canary-8c1f3e7a5b9d2f4e6a0c8e1b3d5f7a9c"
FAST = HttpLimits(header_seconds=1.0, body_seconds=1.0, body_min_rate=500, max_connections=200)


@contextlib.contextmanager
def serving(settings, limits: HttpLimits = FAST, transport: str = "streamable-http", *,
            port: int | None = None) -> Iterator[str]:
    """The flux-mcp HTTP app under `limits`, served by uvicorn on a loopback port (`port`, else a free one)
    in a thread."""
    port = port or free_port()
    app = http_app(settings, transport, "127.0.0.1", port, limits)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def wait_closed(socks: list[socket.socket], limit: float = 15.0) -> dict[socket.socket, bytes]:
    """Reads every socket until the server closes it; returns what each got. Fails after `limit` s."""
    got = {s: b"" for s in socks}
    open_ = set(socks)
    deadline = time.monotonic() + limit
    while open_:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(open_)} of {len(socks)} connections were never closed by the server"
        ready, _, _ = select.select(list(open_), [], [], min(remaining, 1.0))
        for s in ready:
            try:
                data = s.recv(4096)
            except ConnectionError:
                data = b""
            got[s] += data
            if not data:
                open_.discard(s)
    return got


async def initialize(http: httpx2.AsyncClient, url: str, **headers: str) -> httpx2.Response:
    return await http.post(f"{url}/mcp", headers={**ACCEPT, **headers}, content=json.dumps(INIT))


# --- slow and idle connections -------------------------------------------------------------------


async def test_idle_and_slow_header_connections_are_closed_while_real_clients_are_served(settings):
    with serving(settings) as url:
        idle = [connect(url) for _ in range(25)]
        partial = [connect(url) for _ in range(25)]
        for s in partial:
            s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        async with httpx2.AsyncClient(timeout=10) as http:
            served = await initialize(http, url)
        got = await anyio.to_thread.run_sync(wait_closed, idle + partial)
    assert served.status_code == 200
    assert all(data.startswith(b"HTTP/1.1 408") for data in got.values())
    for s in idle + partial:
        s.close()


async def test_a_body_dripping_a_byte_at_a_time_is_cut_off_with_408(settings):
    with serving(settings) as url:
        s = connect(url)
        s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json, text/event-stream\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n")

        def drip() -> bytes:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                ready, _, _ = select.select([s], [], [], 0.25)  # one byte every 0.25 s: 4 B/s
                if ready:
                    return s.recv(4096)
                try:
                    s.sendall(b" ")
                except ConnectionError:
                    return b""
            raise AssertionError("the dripping body was never cut off")

        answer = await anyio.to_thread.run_sync(drip)
        s.close()
        async with httpx2.AsyncClient(timeout=10) as http:
            served = await initialize(http, url)
    assert answer.startswith(b"HTTP/1.1 408")
    assert served.status_code == 200


async def test_a_dripping_body_without_the_token_is_cut_off_too(make_settings):
    settings = make_settings(FLUX_MCP_AUTH_TOKEN=TOKEN)
    with serving(settings) as url:
        s = connect(url)
        s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n")

        def drip() -> bytes:
            got = b""
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                ready, _, _ = select.select([s], [], [], 0.25)
                if ready:
                    data = s.recv(4096)
                    if not data:
                        return got
                    got += data
                    continue
                try:
                    s.sendall(b" ")
                except ConnectionError:
                    return got
            raise AssertionError("the connection was never closed")

        answer = await anyio.to_thread.run_sync(drip)
        s.close()
    assert answer.startswith(b"HTTP/1.1 401")  # refused at once, and then not held open by the drip


async def test_a_large_body_sent_steadily_is_not_cut_off(settings):
    """The body deadline grows with what arrives: 100 kB at ~40 kB/s takes longer than `body_seconds`."""
    body = json.dumps({**INIT, "params": {**INIT["params"], "padding": "x" * 100_000}}).encode()
    with serving(settings) as url:
        s = connect(url)
        s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json, text/event-stream\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))

        def send_steadily() -> bytes:
            for i in range(0, len(body), 4000):
                s.sendall(body[i:i + 4000])
                time.sleep(0.1)  # pacing the client, not waiting for the server
            s.settimeout(10)
            return s.recv(4096)

        answer = await anyio.to_thread.run_sync(send_steadily)
        s.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


# --- the connection cap and the log ----------------------------------------------------------------


async def test_connections_over_the_cap_are_refused_at_once_and_freed(settings):
    limits = HttpLimits(header_seconds=30, max_connections=20)
    with serving(settings, limits) as url:
        held = [connect(url) for _ in range(20)]
        extra = [connect(url) for _ in range(10)]
        refused = await anyio.to_thread.run_sync(wait_closed, extra)
        for s in held:  # still open: nothing to read, no end of stream
            assert select.select([s], [], [], 0)[0] == []
        for s in held + extra:
            s.close()
        async with httpx2.AsyncClient(timeout=10) as http:
            with anyio.fail_after(10):
                while (served := await initialize(http, url)).status_code == 503:
                    await anyio.sleep(0.05)  # the server notices the closed sockets
    assert all(data.startswith(b"HTTP/1.1 503") for data in refused.values())
    assert served.status_code == 200


@pytest.mark.subprocess
def test_a_low_descriptor_limit_keeps_the_log_small_and_the_server_serving(loopback_fake, home, workspace):
    """192 descriptors, 250 idle connections: surplus connections are refused without exhausting the
    descriptors (no accept() error flood in the log), and once they go, real clients are served."""
    env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=loopback_fake.url)
    port = free_port()
    log_path = workspace / "server.log"

    script = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (192, 192)); "
              f"sys.argv = ['flux-mcp', 'serve', '--transport', 'streamable-http', '--port', '{port}']; "
              "runpy.run_module('flux_mcp', run_name='__main__')")
    limited = [sys.executable, "-c", script]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(limited, env=env, cwd=workspace, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            url = f"http://127.0.0.1:{port}"
            socks = [connect(url) for _ in range(250)]
            surplus = 250 - (192 - FD_RESERVE)  # the cap keeps FD_RESERVE descriptors free
            refused = _refused(socks, surplus)
            for s in socks:
                s.close()
            with httpx2.Client(timeout=10) as http:
                deadline = time.monotonic() + 20
                while (served := http.post(f"{url}/mcp", headers=ACCEPT, content=json.dumps(INIT))).status_code \
                        == 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    text = log_path.read_text()
    assert refused >= surplus
    assert served.status_code == 200
    assert len(text.splitlines()) < 40, text[:3000]
    assert "Traceback" not in text


def _refused(socks: list[socket.socket], expected: int, limit: float = 30.0) -> int:
    """Waits until `expected` of the sockets were answered 503 and closed; returns how many were."""
    refused, pending = 0, set(socks)
    deadline = time.monotonic() + limit
    while refused < expected:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {refused} of {len(socks)} connections were refused"
        ready, _, _ = select.select(list(pending), [], [], min(remaining, 1.0))
        for s in ready:
            pending.discard(s)
            refused += s.recv(4096).startswith(b"HTTP/1.1 503")
    return refused


def test_repeated_accept_failures_are_logged_once_a_minute(caplog):
    QuietRepeats.install()
    logger = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(5000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("socket.accept() out of system resource\nsocket: <x>", exc_info=True)  # noqa: G201
    [record] = caplog.records
    assert "Too many open files" in record.getMessage() and "ulimit -n" in record.getMessage()
    assert record.exc_info is None


# --- sessions --------------------------------------------------------------------------------------


async def test_one_client_cannot_open_every_session_and_its_sessions_expire_when_idle(settings):
    limits = HttpLimits(sessions_per_client=3, session_idle_seconds=1.0)
    with serving(settings, limits) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            opened = [await initialize(http, url) for _ in range(3)]
            refused = await initialize(http, url)
            closed = await http.delete(f"{url}/mcp", headers={"mcp-session-id": opened[0].headers["mcp-session-id"]})
            reopened = await initialize(http, url)
            refused_again = await initialize(http, url)
            with anyio.fail_after(15):  # the idle reaper frees the address's sessions
                while (after_idle := await initialize(http, url)).status_code == 429:
                    await anyio.sleep(0.2)
    assert [r.status_code for r in opened] == [200, 200, 200]
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert "Too many open sessions" in refused.json()["error"]["message"]
    assert closed.status_code == 200 and reopened.status_code == 200
    assert refused_again.status_code == 429
    assert after_idle.status_code == 200


def test_the_defaults_reap_idle_sessions_well_before_the_sdks_half_hour():
    limits = HttpLimits()
    assert limits.session_idle_seconds <= 600 and limits.max_sessions <= 1000
    assert 0 < limits.sessions_per_client <= 64


# --- bearer tokens ---------------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.parametrize("token", ["1", "short-canary-token", "a" * 40])
def test_a_weak_token_refuses_to_start_and_says_how_to_make_one(home, workspace, token):
    env = child_env(home, FLUX_MCP_AUTH_TOKEN=token)
    proc = subprocess.run(flux_command("serve", "--transport", "streamable-http", "--port", str(free_port())),
                          env=env, cwd=workspace, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "FLUX_MCP_AUTH_TOKEN" in proc.stderr and "secrets.token_urlsafe(32)" in proc.stderr
    if len(token) > 1:
        assert token not in proc.stderr


async def test_wrong_tokens_are_throttled_per_address_and_logged_without_the_value(make_settings, caplog):
    settings = make_settings(FLUX_MCP_AUTH_TOKEN=TOKEN)
    limits = HttpLimits(auth_burst=5, auth_per_second=2.0)
    guesses = [f"guess-{i}-canary" for i in range(30)]
    with caplog.at_level(logging.INFO), serving(settings, limits) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            wrong = [await http.post(f"{url}/mcp", headers={**ACCEPT, "Authorization": f"Bearer {g}"}, content=b"{}")
                     for g in guesses]
            right_while_throttled = await initialize(http, url, Authorization=f"Bearer {TOKEN}")
            with anyio.fail_after(10):  # the allowance comes back (2 a second)
                while (right := await initialize(http, url, Authorization=f"Bearer {TOKEN}")).status_code == 429:
                    await anyio.sleep(0.1)
    statuses = [r.status_code for r in wrong]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert int(wrong[-1].headers["retry-after"]) >= 1
    assert right_while_throttled.status_code == 429  # a throttled address learns nothing, even if right
    assert right.status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "flux_mcp.http"]
    assert sum("refused an HTTP request from 127.0.0.1: a wrong bearer token" in m for m in logged) == 5
    assert any("throttling 127.0.0.1" in m for m in logged)
    assert len(logged) < 12
    assert not any(g in m for g in guesses for m in logged) and not any(TOKEN in m for m in logged)


async def test_the_right_token_is_never_slowed_by_its_own_requests(make_settings):
    settings = make_settings(FLUX_MCP_AUTH_TOKEN=TOKEN)
    with serving(settings, HttpLimits(auth_burst=2, auth_per_second=0.01)) as url:
        async with httpx2.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            answers = [await http.post(f"{url}/mcp", headers=ACCEPT, content=json.dumps(INIT)) for _ in range(20)]
    assert {r.status_code for r in answers} == {200}


def test_token_problem_never_quotes_the_token():
    from flux_mcp.transport import token_problem

    assert token_problem(TOKEN) is None
    problem = token_problem("hunter2hunter2")
    assert problem is not None and "hunter2" not in problem and "14 characters" in problem
