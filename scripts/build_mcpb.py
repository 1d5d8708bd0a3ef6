"""Builds the Claude Desktop bundle (MCP Bundle, `.mcpb`): dist/flux-image-mcp-<version>.mcpb.

    python scripts/build_mcpb.py [--out DIR] [--stage DIR] [--mcpb COMMAND]

The bundle is `mcpb/manifest.json` beside the package source (pyproject.toml, README.md, LICENSE,
src/flux_mcp). The manifest's server type is `uv`: the host installs Python and the dependencies
named in pyproject.toml itself, so nothing compiled (pydantic-core, Pillow) is shipped and one
bundle serves every platform. The files are staged in a clean folder (default build/mcpb), then
packed by the official `mcpb` CLI (npm package @anthropic-ai/mcpb), which validates the manifest
first. COMMAND is how to run that CLI: `mcpb` when it is on PATH, else `npx --yes
@anthropic-ai/mcpb@<MCPB_VERSION>`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

MCPB_VERSION = "2.1.2"
"""The @anthropic-ai/mcpb release the bundle is checked with (manifest_version 0.4 needs 2.1 or later)."""

ROOT = Path(__file__).resolve().parent.parent
FILES = ("pyproject.toml", "README.md", "LICENSE")
SOURCE = Path("src") / "flux_mcp"


def project_version(root: Path = ROOT) -> str:
    with open(root / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def stage(dest: Path, root: Path = ROOT) -> Path:
    """Fills `dest` (emptied first) with the bundle's files; returns it. Refuses a manifest whose version
    is not the package's, so a bundle never announces one release and installs another."""
    manifest = json.loads((root / "mcpb" / "manifest.json").read_text(encoding="utf-8"))
    version = project_version(root)
    if manifest["version"] != version:
        raise SystemExit(f"mcpb/manifest.json has version {manifest['version']}, pyproject.toml {version}: "
                         "make them the same")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(root / "mcpb" / "manifest.json", dest / "manifest.json")
    for name in FILES:
        shutil.copy2(root / name, dest / name)
    shutil.copytree(root / SOURCE, dest / SOURCE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def mcpb_command(given: str | None) -> list[str]:
    if given:
        return shlex.split(given)
    installed = shutil.which("mcpb")
    if installed:
        return [installed]
    npx = shutil.which("npx")
    if npx is None:
        raise SystemExit("neither mcpb nor npx is on PATH: install Node.js (npm), or pass --mcpb COMMAND")
    return [npx, "--yes", f"@anthropic-ai/mcpb@{MCPB_VERSION}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/build_mcpb.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="folder of the .mcpb (default dist/)")
    parser.add_argument("--stage", type=Path, default=ROOT / "build" / "mcpb",
                        help="folder the bundle's files are gathered in (default build/mcpb/)")
    parser.add_argument("--mcpb", help="command that runs the mcpb CLI, e.g. 'node path/to/cli.js'")
    args = parser.parse_args(argv)

    staged = stage(args.stage.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    output = args.out.resolve() / f"flux-image-mcp-{project_version()}.mcpb"
    command = mcpb_command(args.mcpb)
    proc = subprocess.run([*command, "pack", str(staged), str(output)], stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0 or not output.is_file():
        print(f"build_mcpb: mcpb pack failed ({proc.returncode})", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
