"""Context cost: what a client puts in the model's context for flux-mcp, beside atlascloud-mcp.

* `tools/list`: the compact JSON of the answer's `result` (tool names, descriptions, schemas),
  captured from a fresh server over stdio, against its bound: at most `BOUND` bytes for all tools
  together (tests/test_context.py asserts it; the figure here is the same measure, per tool too);
* a typical finished result: the text block of a `check_prediction` answer for a finished 64x64
  generation, and its `structuredContent` (the inline preview is an image block, counted by the
  client as an image, not as text: see the preview figure for its bytes).

Tokens are estimated at 4 bytes a token (JSON and English text); no tokenizer is bundled.

atlascloud-mcp (npm) runs under node over stdio for its `tools/list`. Its API base URL is a constant
in dist/constants.js (`https://api.atlascloud.ai/api/v1`) with no environment override, so it cannot
be pointed at the fake: its result size is not measured. It is started with HTTP(S)_PROXY set to a
closed loopback port, so that nothing it might send could leave this machine (listing tools sends
nothing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .common import BENCH, TOKENS_PER_BYTE, base_env, flux_command, flux_env
from .raw import compact_bytes, spawn_to_tools_list, tools_of

BOUND = 6000
"""Bytes of compact JSON that `tools/list` may cost, all tools together."""
ATLAS_PACKAGE = "atlascloud-mcp"
ATLAS_VERSION = "1.7.0"
NODE_DIR = BENCH / ".node"


def _atlas_entry(install: bool) -> tuple[Path | None, str]:
    entry = NODE_DIR / "node_modules" / ATLAS_PACKAGE / "dist" / "index.js"
    if entry.is_file():
        return entry, ""
    npm = shutil.which("npm")
    if not install or npm is None:
        return None, "not installed (npm missing or --no-npm)"
    NODE_DIR.mkdir(exist_ok=True)
    package_json = NODE_DIR / "package.json"
    if not package_json.exists():
        package_json.write_text('{"private": true}\n')
    proc = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(NODE_DIR),
            f"{ATLAS_PACKAGE}@{ATLAS_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0 or not entry.is_file():
        return None, f"npm install failed: {proc.stderr.strip()[-300:]}"
    return entry, ""


def _installed_version() -> str | None:
    path = NODE_DIR / "node_modules" / ATLAS_PACKAGE / "package.json"
    return json.loads(path.read_text()).get("version") if path.is_file() else None


def _sizes(line: bytes) -> dict[str, Any]:
    result = json.loads(line)["result"]
    tools = tools_of(line)
    size = compact_bytes(result)
    return {
        "tools": len(tools),
        "names": [t["name"] for t in tools],
        "bytes": size,
        "tokens_est": round(size * TOKENS_PER_BYTE),
        "bytes_per_tool": round(size / max(len(tools), 1)),
        "per_tool": {t["name"]: compact_bytes(t) for t in tools},
    }


def run(workdir: Path, fake_url: str, typical: dict[str, Any] | None, *, install: bool) -> dict[str, Any]:
    home = workdir / "context"
    flux_line = spawn_to_tools_list(flux_command(), flux_env(home, fake_url), home / "workspace").line
    flux: dict[str, Any] = {"tools_list": _sizes(flux_line)}
    flux["tools_list"]["bound"] = BOUND
    flux["tools_list"]["within_bound"] = flux["tools_list"]["bytes"] <= BOUND
    if typical:
        text = typical["text"].encode()
        structured = compact_bytes(typical["structured"])
        flux["result"] = {
            "text_bytes": len(text),
            "text_tokens_est": round(len(text) * TOKENS_PER_BYTE),
            "structured_bytes": structured,
            "structured_tokens_est": round(structured * TOKENS_PER_BYTE),
            "content_types": typical["content_types"],
            "text": typical["text"],
        }
    atlas: dict[str, Any] = {"package": f"{ATLAS_PACKAGE}@{ATLAS_VERSION}"}
    entry, why = _atlas_entry(install)
    node = shutil.which("node")
    if entry is None or node is None:
        atlas["skipped"] = why or "node missing"
    else:
        atlas["version"] = _installed_version()
        env = {
            **base_env(home),
            "ATLASCLOUD_API_KEY": "bench key, not a secret",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9",
        }
        line = spawn_to_tools_list([node, str(entry)], env, home).line
        atlas["tools_list"] = _sizes(line)
        atlas["result"] = None
        atlas["result_note"] = (
            "not measured: its API base URL is hard-coded in dist/constants.js "
            "(https://api.atlascloud.ai/api/v1, no environment override), so it cannot reach the fake"
        )
    ratio = (flux["tools_list"]["bytes"] / atlas["tools_list"]["bytes"]) if "tools_list" in atlas else None
    return {
        "flux": flux,
        "atlascloud": atlas,
        "tools_list_ratio": ratio,
        "token_estimate": f"{int(1 / TOKENS_PER_BYTE)} bytes per token",
    }
