"""The MCP Inspector's CLI (an independent client) drives the installed `flux-mcp` end to end.

Every transport (stdio, SSE, streamable HTTP) in both protocol eras: the handshake era (`legacy`) and
2026-07-28 (`modern`). Each run checks the negotiated version, tools/list (plain and `--strict`), the
four tools against the Atlas Cloud fake on loopback, the resources, and an `isError` result.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ATLAS_KEY
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import png_bytes, serve_on_loopback
from tests.npm_tools import NpmTools, npm_tools  # noqa: F401 - the session fixture
from tests.subprocess_helpers import child_env, http_server

pytestmark = pytest.mark.subprocess

TOOLS = {"generate_image", "edit_image", "upload_media", "check_prediction", "list_predictions"}
ERA_VERSION = {"legacy": "2025-11-25", "modern": "2026-07-28"}
TOOL_ERROR_EXIT = 5
"""The Inspector's exit code for a tool result with isError: true."""


@dataclass
class Inspector:
    """`mcp-inspector --cli` against one server, in one protocol era; each call is a fresh process."""

    tools: NpmTools
    home: Path
    era: str
    target: list[str]
    options: list[str]

    def call(self, method: str, *args: str, exit_code: int = 0) -> dict[str, Any]:
        command = [str(self.tools.node), str(self.tools.inspector_cli), "--format", "json", "-q",
                   "--protocol-era", self.era, "--method", method, *args, *self.options, *self.target]
        proc = subprocess.run(command, env=self.tools.env(self.home), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode == exit_code, f"{method} {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert ATLAS_KEY not in proc.stdout and ATLAS_KEY[8:] not in proc.stderr
        return json.loads(proc.stdout)

    def tool(self, name: str, arguments: dict[str, Any], *, exit_code: int = 0) -> dict[str, Any]:
        return self.call("tools/call", "--tool-name", name, "--tool-args-json", json.dumps(arguments),
                         exit_code=exit_code)["result"]


@pytest.fixture
def fake() -> Iterator[AtlasFake]:
    fake = AtlasFake(key=ATLAS_KEY)
    with serve_on_loopback(fake) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture(params=["stdio", "sse", "streamable-http"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["legacy", "modern"])
def era(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def inspector(npm_tools: NpmTools, fake: AtlasFake, transport: str, era: str,  # noqa: F811 - imported fixture
              home: Path, workspace: Path, tmp_path: Path) -> Iterator[Inspector]:
    server_env = {"ATLASCLOUD_API_KEY": ATLAS_KEY, "FLUX_MCP_LOG_LEVEL": "WARNING",
                  "ATLASCLOUD_BASE_URL": fake.url}  # type: ignore[attr-defined]
    inspector_home = tmp_path / "inspector-home"
    if transport == "stdio":
        # The Inspector starts the installed console script itself, with only the variables it is given.
        options = ["--cwd", str(workspace)]
        for key, value in {"FLUX_MCP_HOME": str(home), **server_env}.items():
            options += ["-e", f"{key}={value}"]
        installed = Path(sys.executable).parent / "flux-mcp"
        yield Inspector(npm_tools, inspector_home, era, [str(installed)], options)
        return
    with http_server(transport, child_env(home, **server_env), workspace) as (url, _):
        path, kind = ("/sse", "sse") if transport == "sse" else ("/mcp", "http")
        yield Inspector(npm_tools, inspector_home, era, [f"{url}{path}"], ["--transport", kind])


def test_inspector_lists_calls_and_reads_in_every_transport_and_era(inspector: Inspector, fake: AtlasFake,
                                                                     workspace: Path) -> None:
    assert inspector.call("initialize")["result"]["protocolVersion"] == ERA_VERSION[inspector.era]

    listed = inspector.call("tools/list")["result"]["tools"]
    assert {t["name"] for t in listed} == TOOLS
    assert all(t.get("outputSchema") and t.get("annotations") for t in listed)
    strict = inspector.call("tools/list", "--strict")
    assert "schemaFindings" not in strict, strict.get("schemaFindings")

    (workspace / "logo.png").write_bytes(png_bytes(20, 20))
    generated = inspector.tool("generate_image", {"prompt": "a red bicycle", "save_to": "img/"})
    images = _structured(generated)["images"]
    assert _structured(generated)["status"] == "succeeded" and len(images) == 1
    saved = Path(images[0]["path"])
    assert saved.parent == workspace / "img" and saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"text", "image"} <= {block["type"] for block in generated["content"]}

    edited = inspector.tool("edit_image", {"prompt": "make it blue", "image": "logo.png"})
    assert _structured(edited)["status"] == "succeeded"
    uploaded = inspector.tool("upload_media", {"path": "logo.png"})
    assert _structured(uploaded)["url"].startswith(f"{fake.url}/uploads/")  # type: ignore[attr-defined]
    pid = _structured(generated)["prediction_id"]
    checked = inspector.tool("check_prediction", {"prediction_id": pid})
    assert _structured(checked) == _structured(generated)
    assert len(fake.ledger) == 2  # one generate, one edit: nothing paid for twice

    refused = inspector.tool("generate_image", {"prompt": "p", "provider": "segmind"},
                             exit_code=TOOL_ERROR_EXIT)
    assert refused["isError"] is True
    assert "SEGMIND_API_KEY" in refused["content"][0]["text"]
    assert len(fake.ledger) == 2

    resources = inspector.call("resources/list")["result"]["resources"]
    assert "flux://providers" in {r["uri"] for r in resources}
    templates = inspector.call("resources/templates/list")["result"]["resourceTemplates"]
    assert {t["uriTemplate"] for t in templates} >= {"flux://predictions/{prediction_id}",
                                                     "flux://images/{prediction_id}/{index}"}
    providers = json.loads(inspector.call("resources/read", "--uri", "flux://providers")
                           ["result"]["contents"][0]["text"])
    assert providers["default"] == "atlascloud"
    prediction = inspector.call("resources/read", "--uri", f"flux://predictions/{pid}")["result"]
    assert json.loads(prediction["contents"][0]["text"])["status"] == "succeeded"
    image = inspector.call("resources/read", "--uri", f"flux://images/{pid}/0")["result"]["contents"][0]
    assert image["mimeType"] == "image/png" and base64.b64decode(image["blob"]) == saved.read_bytes()

    if inspector.era == "legacy":
        assert inspector.call("logging/setLevel", "--log-level", "debug")["result"] == {}


def _structured(result: dict[str, Any]) -> dict[str, Any]:
    assert result.get("isError") in (None, False), result
    return result["structuredContent"]
