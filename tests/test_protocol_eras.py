"""Exact client wire sequences replayed over stdio to a `python -m flux_mcp` child process, line by line.

Clients in the field open with a 2026-07-28 `server/discover` probe and then send the legacy `initialize`
on the same connection (Claude Code 2.1.280, Copilot CLI 1.0.85; anthropics/claude-code#96183); a plain
`mcp` 2.x server refuses that with -32022. flux-mcp serves it, plain handshake-era clients, and
2026-07-28 clients, and reads MCP roots where the era has them; a client without roots (every 2026-07-28 client) lands in
FLUX_MCP_ALLOWED_DIRS, else the working directory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.conftest import ATLAS_KEY
from tests.subprocess_helpers import child_env, flux_command

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]

MODERN = "2026-07-28"
TOOLS = {"generate_image", "edit_image", "upload_media", "check_prediction", "list_predictions"}
CLAUDE_CODE_INFO = {"description": "Anthropic's agentic coding tool", "name": "claude-code",
                    "title": "Claude Code", "version": "2.1.280",
                    "websiteUrl": "https://claude.com/claude-code"}


def envelope(capabilities: dict[str, Any], client: dict[str, Any] | None = None) -> dict[str, Any]:
    """The 2026-07-28 per-request `_meta` envelope."""
    meta: dict[str, Any] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                            "io.modelcontextprotocol/clientCapabilities": capabilities}
    if client is not None:
        meta["io.modelcontextprotocol/clientInfo"] = client
    return {"_meta": meta}


class StdioPeer:
    """A client reduced to its wire: JSON-RPC lines written to the server's stdin, lines read back.

    Server-initiated requests are recorded; `roots/list` is answered with `roots` (file URIs).
    """

    def __init__(self, process: Process, roots: list[Path]):
        self.process = process
        self.lines = BufferedByteReceiveStream(process.stdout)  # type: ignore[arg-type]
        self.roots = roots
        self.server_requests: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []

    async def send(self, *messages: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(b"".join(json.dumps(m).encode() + b"\n" for m in messages))

    async def receive(self) -> dict[str, Any]:
        with anyio.fail_after(30):
            line = await self.lines.receive_until(b"\n", 64 * 1024 * 1024)
        return json.loads(line)  # stdout carries JSON-RPC and nothing else

    async def response(self, request_id: Any) -> dict[str, Any]:
        """Reads until the answer to `request_id`, serving the server's own requests meanwhile."""
        while True:
            message = await self.receive()
            if "method" in message and "id" in message:
                self.server_requests.append(message)
                await self.send(self._answer(message))
            elif "method" in message:
                self.notifications.append(message)
            elif message.get("id") == request_id:
                return message
            else:
                raise AssertionError(f"answer to an unknown request: {message}")

    async def request(self, request_id: Any, method: str, params: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.response(request_id)

    async def result(self, request_id: Any, method: str, params: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        answer = await self.request(request_id, method, params)
        assert "result" in answer, answer
        return answer["result"]

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["method"] == "roots/list":
            roots = [{"uri": root.as_uri(), "name": root.name} for root in self.roots]
            return {"jsonrpc": "2.0", "id": request["id"], "result": {"roots": roots}}
        return {"jsonrpc": "2.0", "id": request["id"],
                "error": {"code": -32601, "message": "Method not found"}}


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@pytest.fixture
def client_root(tmp_path: Path) -> Path:
    root = tmp_path / "client-project"
    root.mkdir()
    return root


@pytest.fixture
def start_peer(fake, home: Path, workspace: Path, client_root: Path) -> Iterator[Any]:
    """Starts `python -m flux_mcp` (Atlas Cloud fake configured, `extra` variables added) as a StdioPeer."""
    log = workspace.parent / "server-stderr.log"

    @contextlib.asynccontextmanager
    async def start(**extra: str) -> AsyncIterator[StdioPeer]:
        env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url, **extra)
        process = await anyio.open_process(flux_command(), env=env, cwd=workspace, stderr=stderr)
        async with process:
            yield StdioPeer(process, [client_root])
            await process.stdin.aclose()  # type: ignore[union-attr]
            with anyio.fail_after(15):
                assert await process.wait() == 0  # EOF on stdin is a clean shutdown

    with log.open("wb") as stderr:
        yield start
    assert ATLAS_KEY not in log.read_text()


@pytest.fixture
async def peer(start_peer) -> AsyncIterator[StdioPeer]:
    async with start_peer() as peer:
        yield peer


def _structured(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("isError"), result
    return result["structuredContent"]


async def test_claude_code_discover_then_initialize_is_served_and_reads_roots(peer: StdioPeer, fake,
                                                                              client_root):
    discovered = await peer.result("server-discover-probe-1", "server/discover", envelope(
        {"elicitation": {}, "roots": {"listChanged": True}}, CLAUDE_CODE_INFO))
    assert MODERN in discovered["supportedVersions"]
    assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "flux-mcp"
    assert discovered["capabilities"]["tools"] is not None

    initialized = await peer.result(0, "initialize", {
        "protocolVersion": "2025-11-25", "capabilities": {"roots": {}, "elicitation": {}},
        "clientInfo": {"name": "claude-code", "version": "2.1.280"}})
    assert initialized["protocolVersion"] == "2025-11-25"
    assert initialized["serverInfo"]["name"] == "flux-mcp"
    await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    tools = (await peer.result(1, "tools/list"))["tools"]
    assert {t["name"] for t in tools} == TOOLS
    generated = await peer.result(2, "tools/call", {
        "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "img/"}})
    saved = Path(_structured(generated)["images"][0]["path"])
    assert saved.parent == client_root / "img" and saved.is_file()  # the client's root, not the server's cwd
    assert [r["method"] for r in peer.server_requests] == ["roots/list"]
    assert len(fake.ledger) == 1


async def test_copilot_cli_pipelined_discover_and_initialize_are_both_answered(peer: StdioPeer, fake,
                                                                               workspace):
    # Copilot CLI gives up waiting on the probe and sends initialize before the DiscoverResult arrives.
    await peer.send(
        {"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": envelope(
            {"sampling": {}, "elicitation": {"form": {}, "url": {}}},
            {"name": "copilot-cli", "version": "1.0.85"})},
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {"elicitation": {"form": {}, "url": {}}, "sampling": {}},
            "clientInfo": {"name": "github-copilot-developer", "version": "1.0.85"}}})
    discovered = await peer.response(0)
    initialized = await peer.response(1)
    assert MODERN in discovered["result"]["supportedVersions"]
    assert initialized["result"]["protocolVersion"] == "2025-11-25"
    await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    assert await peer.result(2, "logging/setLevel", {"level": "info"}) == {}
    assert {t["name"] for t in (await peer.result(3, "tools/list"))["tools"]} == TOOLS
    generated = await peer.result(4, "tools/call", {
        "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "out.png"}})
    assert _structured(generated)["images"][0]["path"] == str(workspace / "out.png")  # no roots: the cwd
    assert peer.server_requests == []  # a client without the roots capability is never asked for them


async def test_legacy_client_sets_log_level_lists_and_calls_tools(start_peer, fake, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    async with start_peer(FLUX_MCP_ALLOWED_DIRS=str(allowed)) as peer:
        initialized = await peer.result(1, "initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "cursor", "version": "1.0"}})
        assert initialized["protocolVersion"] == "2025-06-18"
        assert "logging" in initialized["capabilities"]
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        assert await peer.result(2, "logging/setLevel", {"level": "debug"}) == {}
        assert {t["name"] for t in (await peer.result(3, "tools/list"))["tools"]} == TOOLS
        generated = await peer.result(4, "tools/call", {
            "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "hero.png"},
            "_meta": {"progressToken": "p1"}})
        # No roots offered: the configured folder.
        assert _structured(generated)["images"][0]["path"] == str(allowed / "hero.png")
        refused = await peer.result(5, "tools/call", {"name": "generate_image",
                                                      "arguments": {"prompt": "p", "provider": "segmind"}})
        assert refused["isError"] is True and "SEGMIND_API_KEY" in refused["content"][0]["text"]
        assert len(fake.ledger) == 1


async def test_2026_client_enveloped_requests_are_served_without_a_handshake(peer: StdioPeer, fake,
                                                                             workspace):
    caps = {"roots": {"listChanged": True}}
    client = {"name": "modern-client", "version": "1.0.0"}
    discovered = await peer.result(0, "server/discover", envelope(caps, client))
    assert discovered["supportedVersions"] == [MODERN]

    tools = await peer.result(1, "tools/list", envelope(caps, client))
    assert {t["name"] for t in tools["tools"]} == TOOLS
    assert tools["resultType"] == "complete"
    generated = await peer.result(2, "tools/call", {
        "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "img/"},
        **envelope(caps, client)})
    saved = Path(_structured(generated)["images"][0]["path"])
    assert saved.parent == workspace / "img"  # roots are not read in this era: the configured fallback
    assert peer.server_requests == []
    providers = await peer.result(3, "resources/read", {"uri": "flux://providers", **envelope(caps, client)})
    assert json.loads(providers["contents"][0]["text"])["default"] == "atlascloud"

    no_log_level = await peer.request(4, "logging/setLevel", {"level": "info", **envelope(caps, client)})
    assert no_log_level["error"]["code"] == -32601  # gone at 2026-07-28
    late_handshake = await peer.request(5, "initialize", {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client})
    assert late_handshake["error"]["code"] == -32022  # once a request decided the era, it stays
    assert late_handshake["error"]["data"]["supported"] == [MODERN]
    assert len(fake.ledger) == 1


async def test_unreadable_lines_and_a_bare_discover_are_refused_and_leave_the_handshake_open(peer: StdioPeer):
    assert peer.process.stdin is not None
    await peer.process.stdin.send(b"this is not json\n")
    parse_error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
    assert await peer.receive() == parse_error
    await peer.send({"jsonrpc": "2.0", "id": 7})  # JSON, but no JSON-RPC message
    assert (await peer.receive())["error"]["code"] == -32600
    refused = await peer.request("probe", "server/discover")
    assert refused["error"]["code"] == -32602  # not a modern-only error: the client falls back
    initialized = await peer.result(1, "initialize", {
        "protocolVersion": "2024-11-05", "capabilities": {},
        "clientInfo": {"name": "old-client", "version": "0.1"}})
    assert initialized["protocolVersion"] == "2024-11-05"


async def open_era(peer: StdioPeer, era: str, *, roots: bool) -> dict[str, Any]:
    """Opens the connection as a client of `era` would; returns what each later request must carry."""
    caps: dict[str, Any] = {"roots": {"listChanged": True}} if roots else {}
    if era == MODERN:
        await peer.result("probe", "server/discover", envelope(caps, {"name": "modern", "version": "1"}))
        return envelope(caps, {"name": "modern", "version": "1"})
    await peer.result(0, "initialize", {"protocolVersion": era, "capabilities": caps,
                                        "clientInfo": {"name": "handshake", "version": "1"}})
    await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return {}


@pytest.mark.parametrize("era", ["2025-06-18", "2025-11-25", MODERN])
@pytest.mark.parametrize("configured", [True, False])
async def test_a_client_without_roots_lands_in_the_configured_folder_else_the_working_directory(
        start_peer, fake, tmp_path, workspace, era, configured):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    extra = {"FLUX_MCP_ALLOWED_DIRS": str(allowed)} if configured else {}
    async with start_peer(**extra) as peer:
        # A 2026-07-28 client may declare roots: that era has no roots/list, so it is never asked.
        carry = await open_era(peer, era, roots=era == MODERN)
        generated = await peer.result(1, "tools/call", {
            "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "out/"}, **carry})
    saved = Path(_structured(generated)["images"][0]["path"])
    assert saved.parent == (allowed if configured else workspace) / "out" and saved.is_file()
    assert peer.server_requests == []


@pytest.mark.parametrize("inside", [True, False])
async def test_a_handshake_client_with_roots_uses_its_root_when_the_configured_folders_allow_it(
        start_peer, fake, tmp_path, client_root, inside):
    allowed = tmp_path / "allowed"
    root = allowed / "site" if inside else client_root
    root.mkdir(parents=True, exist_ok=True)
    allowed.mkdir(exist_ok=True)
    async with start_peer(FLUX_MCP_ALLOWED_DIRS=str(allowed)) as peer:
        peer.roots = [root]
        await open_era(peer, "2025-11-25", roots=True)
        generated = await peer.result(1, "tools/call", {
            "name": "generate_image", "arguments": {"prompt": "a lighthouse", "save_to": "out/"}})
    saved = Path(_structured(generated)["images"][0]["path"])
    assert saved.parent == (root if inside else allowed) / "out"
    assert [r["method"] for r in peer.server_requests] == ["roots/list"]
