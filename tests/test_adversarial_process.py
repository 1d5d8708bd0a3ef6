"""Faults that need a real process: SIGKILL mid-wait, logs on stderr, malformed JSON-RPC, load over HTTP."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import ATLAS_KEY, text_of
from tests.subprocess_helpers import child_env, flux_command, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@pytest.fixture
def env(fake, home):
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url, FLUX_MCP_LOG_LEVEL="DEBUG")


class RawStdio:
    """JSON-RPC lines to and from a `flux-mcp` child process."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.stderr_path = cwd / f".stderr-{time.monotonic_ns()}.log"
        self.stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(flux_command(), env=env, cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr)

    def send(self, message: dict | str) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 30) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, "server closed stdout"
        return json.loads(line)

    def answer(self, request_id: int) -> dict:
        while True:
            message = self.read()
            if message.get("id") == request_id:
                return message

    def close(self) -> str:
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        return self.stderr_path.read_text()

    def __enter__(self) -> RawStdio:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.stderr.closed:
            self.proc.kill()
            self.close()


def test_sigkill_mid_wait_loses_nothing(env, fake, workspace):
    fake.hold = True
    with RawStdio(env, workspace) as raw:
        raw.send(INIT)
        raw.answer(0)
        raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        raw.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "generate_image", "arguments": {"prompt": "p", "wait_seconds": 300}}})
        deadline = time.monotonic() + 30
        while not any(r.startswith("GET /api/v1/model/prediction/") for r in fake.requests):
            assert time.monotonic() < deadline, "the server never started waiting"
            time.sleep(0.05)
        raw.proc.send_signal(signal.SIGKILL)
        raw.proc.wait()
        raw.close()
    [job_id] = fake.jobs
    fake.finish(job_id)

    async def check() -> dict:
        params = StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env, cwd=str(workspace))
        async with Client(params) as client:
            result = await client.call_tool("check_prediction", {"prediction_id": f"atlascloud:{job_id}"})
        return result.structured_content

    data = anyio.run(check)
    assert data["status"] == "succeeded" and Path(data["images"][0]["path"]).is_file()
    assert len(fake.ledger) == 1


def test_malformed_json_rpc_on_stdio_gets_errors_and_the_server_keeps_serving(env, workspace):
    with RawStdio(env, workspace) as raw:
        raw.send("this is not json")
        parse_error = raw.read()
        raw.send({"jsonrpc": "2.0", "id": 5, "method": "no/such/method"})
        unknown = raw.answer(5)
        raw.send(INIT)
        init = raw.answer(0)
        raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        raw.send({"jsonrpc": "2.0", "id": 6, "method": "tools/list"})
        listed = raw.answer(6)
        stderr = raw.close()
    assert parse_error["error"]["code"] == -32700
    assert unknown["error"]["code"] in (-32601, -32600, -32602)
    assert init["result"]["serverInfo"]["name"] == "flux-mcp"
    assert len(listed["result"]["tools"]) == 5
    assert "Traceback" not in stderr


def test_stdio_skips_an_overlong_line_and_reads_a_last_line_without_newline(env, workspace):
    from flux_mcp.stdio import MAX_LINE

    with RawStdio(env, workspace) as raw:
        # Written from a thread: the server reads (and drops) it while this side waits for the answer.
        writer = threading.Thread(target=raw.send, args=("x" * (MAX_LINE + 1024),))
        writer.start()
        overlong = raw.read(timeout=120)
        writer.join()
        raw.proc.stdin.write(json.dumps(INIT).encode())
        raw.proc.stdin.close()  # the handshake ends the input, without a newline
        init = raw.answer(0)
        stderr = raw.close()
    assert overlong["error"]["code"] == -32600 and overlong["id"] is None
    assert init["result"]["serverInfo"]["name"] == "flux-mcp"
    assert "Traceback" not in stderr


def test_stdio_from_a_file_falls_back_to_the_sdk_transport(env, workspace):
    requests = workspace / "requests.jsonl"
    requests.write_text(json.dumps(INIT) + "\n")
    with requests.open("rb") as stdin:
        done = subprocess.run(flux_command(), env=env, cwd=workspace, stdin=stdin, capture_output=True, timeout=60)
    [answer] = map(json.loads, done.stdout.decode().splitlines())
    assert answer["id"] == 0 and answer["result"]["serverInfo"]["name"] == "flux-mcp"


def test_logs_go_to_stderr_and_never_carry_the_key(env, fake, workspace):
    fake.submit_errors.append((401, {"message": f"invalid key {ATLAS_KEY}"}, {}))
    with RawStdio(env, workspace) as raw:
        raw.send(INIT)
        raw.answer(0)
        raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for i in (1, 2):
            raw.send({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                      "params": {"name": "generate_image", "arguments": {"prompt": "p"}}})
            raw.answer(i)
        stderr = raw.close()
    assert "serving stdio" in stderr and "submitted atlascloud:" in stderr  # logs are on stderr
    assert ATLAS_KEY not in stderr and ATLAS_KEY[5:17] not in stderr
    journal = (Path(env["FLUX_MCP_HOME"]) / "journal.sqlite3").read_bytes()
    assert ATLAS_KEY.encode() not in journal


async def test_malformed_and_oversized_http_requests_are_refused_and_the_server_keeps_serving(env, workspace):
    with http_server("streamable-http", env, workspace) as (url, _):
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with httpx2.AsyncClient(timeout=30) as http:
            garbage = await http.post(f"{url}/mcp", headers=headers, content=b"{not json")
            huge = await http.post(f"{url}/mcp", headers=headers, content=b"[" + b" " * (17 * 1024 * 1024) + b"]")
        async with Client(f"{url}/mcp") as client:
            tools = (await client.list_tools()).tools
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == -32700
    assert huge.status_code == 413
    assert len(tools) == 5


async def test_200_concurrent_generations_over_streamable_http_all_succeed_once(env, fake, workspace):
    fake.duration = 1.0
    with http_server("streamable-http", env, workspace) as (url, proc):
        results: list = []

        async def one(client: Client, i: int) -> None:
            results.append(await client.call_tool("generate_image", {"prompt": f"job {i}"}))

        async with Client(f"{url}/mcp", read_timeout_seconds=120) as client:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(200):
                        tg.start_soon(one, client, i)
        rss_kb = _rss_kb(proc.pid)
    errors = [text_of(r) for r in results if r.is_error or r.structured_content["status"] != "succeeded"]
    assert errors == []
    ids = [r.structured_content["prediction_id"] for r in results]
    assert len(set(ids)) == 200 and len(fake.ledger) == 200
    assert sorted(b["prompt"] for b in fake.ledger) == sorted(f"job {i}" for i in range(200))
    assert rss_kb < 400_000, f"server RSS {rss_kb} kB"


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
