"""The setup text a new user pastes: every JSON block in the README and the example config work as-is."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from tests.subprocess_helpers import child_env

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]
ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"generate_image", "edit_image", "upload_media", "check_prediction", "list_predictions"}


def readme_json_blocks() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def server_entries() -> list[tuple[str, dict]]:
    entries = []
    for i, block in enumerate(readme_json_blocks()):
        for name, entry in {**block.get("mcpServers", {}), **block.get("servers", {})}.items():
            entries.append((f"README block {i + 1}: {name}", entry))
    example = json.loads((ROOT / "mcp-config.example.json").read_text())
    entries += [(f"mcp-config.example.json: {name}", e) for name, e in example["mcpServers"].items()]
    return entries


def test_every_setup_block_parses_and_names_the_command():
    entries = server_entries()
    assert len(entries) >= 3
    for label, entry in entries:
        assert entry["command"] == "flux-mcp", label
        assert entry.get("type", "stdio") == "stdio", label


@pytest.mark.parametrize(("label", "entry"), server_entries(), ids=lambda v: v if isinstance(v, str) else "")
async def test_each_setup_block_starts_a_working_server(label, entry, home, workspace):
    command = shutil.which(entry["command"], path=str(Path(sys.executable).parent))
    assert command, f"{label}: {entry['command']} is not installed beside this Python"
    # Keys in the examples are placeholders: keep the variables, point the data folder at a temp dir.
    env = child_env(home, **{k: v for k, v in entry.get("env", {}).items() if "${" not in v})
    env["FLUX_MCP_ALLOWED_DIRS"] = str(workspace)
    params = StdioServerParameters(command=command, args=entry.get("args", []), env=env, cwd=str(workspace))
    async with Client(params) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == TOOLS, label


def test_claude_code_command_in_the_readme_launches_flux_mcp():
    text = (ROOT / "README.md").read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith("claude mcp add")]
    assert line.endswith("-- flux-mcp") and "--env ATLASCLOUD_API_KEY=" in line
