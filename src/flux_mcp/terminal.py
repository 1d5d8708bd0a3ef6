"""`flux-mcp generate`: the generate_image tool from a terminal, through an in-process MCP client."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import anyio
from mcp.client.session import ClientRequestContext
from mcp_types import ElicitRequestParams, ElicitResult, ErrorData, TextContent

from .config import Settings
from .errors import PathNotAllowed
from .paths import PathPolicy, to_local_path


def generate(settings: Settings, args: argparse.Namespace) -> int:
    return anyio.run(_generate, settings, args)


def output_target(raw: str, cwd: Path, home: Path) -> tuple[str, PathPolicy]:
    """`-o PATH` as the person typed it, and a folder policy that allows exactly where it points.

    The folder rules (FLUX_MCP_ALLOWED_DIRS, the client's roots, never the home folder itself) guard
    what a model asks for through the tools. At the terminal the person chose the path: it is relative
    to the working directory and may name any folder they can write. The policy allows the folder
    that holds the target (for a folder target, the images go inside it, so within that folder too).
    Returns the absolute target (a trailing separator kept: it marks a folder) and the policy.
    """
    path = to_local_path(raw)
    absolute = path if path.is_absolute() else cwd / path
    if absolute.name in ("", ".", ".."):
        folder = absolute.resolve()
        return str(folder) + os.sep, PathPolicy([folder], home)
    parent = absolute.parent.resolve()  # symlinks and '..' resolved, as the shell would
    as_folder = raw.rstrip().endswith(("/", "\\"))
    return str(parent / absolute.name) + (os.sep if as_folder else ""), PathPolicy([parent], home)


async def _generate(settings: Settings, args: argparse.Namespace) -> int:
    from mcp import Client

    from .server import build_server

    save_to, paths = args.save_to, None
    if save_to is not None:
        try:
            save_to, paths = output_target(save_to, settings.cwd, settings.home)
        except PathNotAllowed as exc:
            print(f"flux-mcp: -o {args.save_to}: {exc}", file=sys.stderr)
            return 2
    arguments = {name: getattr(args, name) for name in args.job_fields}  # the flags JobRequest's fields gave
    arguments.update(prompt=args.prompt, save_to=save_to,
                     wait_seconds=args.wait_seconds if args.wait_seconds is not None else 600)
    arguments = {k: v for k, v in arguments.items() if v is not None}
    bar = _Progress(sys.stderr)
    # A person at a terminal has no client timeout to stay under: the call may wait as long as asked.
    settings = settings.model_copy(update={"max_wait_seconds": max(settings.max_wait_seconds, 600.0)})
    # The person at a terminal confirms a cost above FLUX_MCP_CONFIRM_ABOVE_USD there (nobody can, off a terminal).
    ask = _confirm_at_terminal if sys.stdin.isatty() and sys.stderr.isatty() else None
    async with Client(build_server(settings, paths=paths), elicitation_callback=ask) as client:
        result = await client.call_tool("generate_image", arguments, progress_callback=bar.update)
    bar.done()
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
    structured = result.structured_content or {}
    if args.json:
        print(json.dumps(structured, indent=2))
    else:
        print(text, file=sys.stderr)
        for image in structured.get("images", []):
            if image.get("path"):
                print(image["path"])
    if result.is_error:
        return 1
    if structured.get("dry_run") is not None:
        return 0 if structured["dry_run"].get("allowed") else 1
    return 0 if structured.get("status") == "succeeded" else 3


async def _confirm_at_terminal(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult | ErrorData:
    """Puts a cost confirmation to the person at the terminal: y accepts, anything else declines."""
    sys.stderr.write(f"\n{params.message} [y/N] ")
    sys.stderr.flush()
    answer = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if answer.strip().lower() in ("y", "yes"):
        return ElicitResult(action="accept", content={"confirm": True})
    return ElicitResult(action="decline")


class _Progress:
    """A one-line progress display on a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.shown = False
        self.stream.write("waiting for the provider...\n" if not self.tty else "waiting for the provider...")
        self.stream.flush()

    async def update(self, progress: float, total: float | None, message: str | None) -> None:
        elapsed = time.monotonic() - self.start
        if self.tty:
            width = 24
            frac = min(progress / total, 1.0) if total else 0.0
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            self.stream.write(f"\r[{bar}] {elapsed:5.0f}s {message or ''}\033[K")
        else:
            self.stream.write(f"{elapsed:.0f}s {message or ''}\n")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
