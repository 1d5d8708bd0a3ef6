"""Bare MCP clients: JSON-RPC over a child's stdio, or over streamable HTTP — nothing else.

The latency figures use these instead of the SDK's `Client`, so that what is timed is the server and
the protocol, not the client's own work (the SDK client re-validates every structured result against
the tool's output schema, which costs more for a rich schema than for the floor's). Any MCP server
works with them: flux-mcp, the floor, atlascloud-mcp under node.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx2

PROTOCOL = "2025-11-25"
"""The newest handshake-era revision: what today's clients (Claude Desktop, Claude Code, Cursor) send."""
_ACCEPT = "application/json, text/event-stream"


def _initialize(request_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "flux-mcp-bench", "version": "1"},
        },
    }


_INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


class CallFailed(RuntimeError):
    pass


def _result(message: dict[str, Any]) -> dict[str, Any]:
    if "error" in message:
        raise CallFailed(str(message["error"]))
    return dict(message["result"])


class RawStdio:
    """A server child process spoken to line by line. Not thread-safe; one request at a time."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        cwd: Path,
        *,
        timeout: float = 120,
        stderr: Any = subprocess.DEVNULL,
    ):
        self.timeout = timeout
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd
        )
        self._buf = b""
        self._ids = itertools.count(1)
        self.cpu_seconds: float | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, request_id: int) -> bytes:
        """The raw line answering `request_id` (notifications and other lines are skipped)."""
        deadline = time.monotonic() + self.timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError(f"no answer to request {request_id} within {self.timeout:g} s")
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError(f"the server closed stdout (exit code {self.proc.poll()})")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("id") == request_id:
                return line

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], bytes]:
        rid = next(self._ids)
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})})
        line = self.answer(rid)
        return _result(json.loads(line)), line

    def initialize(self) -> None:
        rid = next(self._ids)
        self.send(_initialize(rid))
        _result(json.loads(self.answer(rid)))
        self.send(_INITIALIZED)

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.request("tools/call", {"name": name, "arguments": arguments})[0]

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.cpu_seconds = self._reap(deadline=time.monotonic() + 10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _reap(self, deadline: float) -> float | None:
        """Waits for the child and returns the CPU seconds (user + system) it used in its whole life."""
        if self.proc.returncode is not None:
            return None
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return usage.ru_utime + usage.ru_stime
            time.sleep(0.005)
        self.proc.kill()
        self.proc.wait()
        return None


@dataclass
class ColdStart:
    seconds: float
    """From spawning the server to its first `tools/list` answer."""
    cpu_seconds: float | None
    """CPU (user + system) the server used in its whole life: start, two answers, exit."""
    line: bytes
    """The raw `tools/list` answer."""


def spawn_to_tools_list(cmd: list[str], env: dict[str, str], cwd: Path) -> ColdStart:
    """Spawns a stdio server, initializes, lists its tools, and closes it."""
    start = time.perf_counter()
    with RawStdio(cmd, env, cwd, timeout=60) as client:
        client.initialize()
        _, line = client.request("tools/list")
        elapsed = time.perf_counter() - start
    return ColdStart(elapsed, client.cpu_seconds, line)


def _messages(response: httpx2.Response) -> list[dict[str, Any]]:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [
            json.loads(line[5:])
            for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip()
        ]
    return [response.json()] if response.content else []


class _HttpBase:
    def __init__(self, url: str):
        self.url = url
        self.session: str | None = None
        self._ids = itertools.count(1)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": _ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": PROTOCOL}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        return headers

    def _pick(self, response: httpx2.Response, rid: int) -> dict[str, Any]:
        if response.status_code >= 400:
            raise CallFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        for message in _messages(response):
            if message.get("id") == rid:
                return _result(message)
        raise CallFailed(f"no answer to request {rid} in the HTTP response")


class RawHttp(_HttpBase):
    """A streamable-HTTP MCP session over one keep-alive connection (synchronous)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.http = httpx2.Client(timeout=120, trust_env=False)

    def __enter__(self) -> Self:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def initialize(self) -> None:
        response = self.http.post(self.url, json=_initialize(0), headers=self._headers())
        self._pick(response, 0)
        self.session = response.headers.get("mcp-session-id")
        self.http.post(self.url, json=_INITIALIZED, headers=self._headers())

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = next(self._ids)
        body = {"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})}
        return self._pick(self.http.post(self.url, json=body, headers=self._headers()), rid)

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.request("tools/call", {"name": name, "arguments": arguments})


class AsyncRawHttp(_HttpBase):
    """The same over an `httpx2.AsyncClient` (shared between sessions when given)."""

    def __init__(self, url: str, http: httpx2.AsyncClient):
        super().__init__(url)
        self.http = http

    async def initialize(self) -> None:
        response = await self.http.post(self.url, json=_initialize(0), headers=self._headers())
        self._pick(response, 0)
        self.session = response.headers.get("mcp-session-id")
        await self.http.post(self.url, json=_INITIALIZED, headers=self._headers())

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        body = {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        return self._pick(await self.http.post(self.url, json=body, headers=self._headers()), rid)


def tools_of(line: bytes) -> list[dict[str, Any]]:
    return list(json.loads(line)["result"]["tools"])


def compact_bytes(value: Any) -> int:
    """Bytes of `value` as compact JSON (what a client puts in the model's context, whatever the server's
    own formatting)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def text_of(result: dict[str, Any]) -> str:
    return "\n".join(b.get("text", "") for b in result.get("content", []) if b.get("type") == "text")
