"""Fixtures of the contract suite: the case's fake and settings, and a trace of everywhere a key could reach.

Every contract test is parametrized with `case` (a `cases.Case`); `fake`, `settings` and
`polled_settings` follow from it. `trace` collects the tool results of a test; its
`assert_never_shows(secret)` then searches them, every log record (captured at DEBUG) and every
file under FLUX_MCP_HOME (the journal included, and the file names) for the secret or any
12-character piece of it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_mcp.config import Settings
from flux_mcp.redact import MASK
from tests.conftest import text_of
from tests.contract.cases import Case
from tests.fakes.base import FakeBase

PIECE = 12
"""Any run of this many characters of a secret counts as a leak of it."""


@pytest.fixture
def fake(case: Case) -> FakeBase:
    return case.make_fake(case.key)


@pytest.fixture
def settings(case: Case, make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(**case.environment())


@pytest.fixture
def polled_settings(case: Case, make_settings: Callable[..., Settings]) -> Settings:
    """Settings under which every job of the case goes through its status endpoint."""
    return make_settings(**case.environment(polled=True))


class Trace:
    """What a user, a log or the data folder got during one test."""

    def __init__(self, caplog: pytest.LogCaptureFixture, home: Path, backend: dict[str, str] | None = None):
        self.caplog = caplog
        self.home = home
        self.backend = backend or {}
        """The shared-mode variables of --backend=pg: the database and the bucket are searched too."""
        self.results: list[Any] = []

    def __call__(self, result: Any) -> Any:
        """Records a tool result (and returns it)."""
        self.results.append(result)
        return result

    def surfaces(self) -> Iterator[tuple[str, bytes]]:
        for n, result in enumerate(self.results, 1):
            shown = text_of(result) + json.dumps(result.structured_content)
            yield f"tool result {n}", shown.encode()
            for block in result.content:
                if getattr(block, "type", "") == "image":
                    yield f"tool result {n} image", base64.b64decode(block.data)
        records = "\n".join(r.getMessage() + (r.exc_text or "") for r in self.caplog.records)
        yield "log", (records + self.caplog.text).encode()
        if self.backend:
            yield from backend_surfaces(self.backend)
            if not self.home.is_dir():
                return  # shared mode keeps nothing in the data folder
        assert self.home.is_dir(), "the server never opened its data folder"
        for path in sorted(self.home.rglob("*")):
            name = str(path.relative_to(self.home))
            yield f"file name {name}", name.encode()
            if path.is_file():
                yield f"file {name}", path.read_bytes()

    def assert_never_shows(self, secret: str) -> None:
        assert len(secret) >= PIECE
        pieces = {secret[i : i + PIECE].encode() for i in range(len(secret) - PIECE + 1)}
        found = [where for where, data in self.surfaces() if any(p in data for p in pieces)]
        assert not found, f"the key (or a {PIECE}-character piece of it) surfaced in: {', '.join(found)}"


def backend_surfaces(env: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    """Every row of the database schema (as text) and every object (name and bytes) of the bucket."""
    import subprocess
    import urllib.parse

    url = env["FLUX_MCP_DATABASE_URL"]
    schema = urllib.parse.unquote(url.rpartition("search_path%3D")[2])
    dump = subprocess.run(["pg_dump", "--data-only", "--schema", schema, url.partition("?")[0]], check=True,
                          capture_output=True, env={"PATH": "/usr/lib/postgresql/15/bin:/usr/bin:/bin"}).stdout
    yield "database rows", dump
    from tests.cluster_env import RUNNING

    s3, bucket = RUNNING[0], env["FLUX_MCP_S3_URL"].removeprefix("s3://")
    for key in s3.keys(bucket):
        yield f"object name {key}", key.encode()
        yield f"object {key}", s3.read(bucket, key) or b""


@pytest.fixture
def trace(caplog: pytest.LogCaptureFixture, home: Path, backend_env: dict[str, str]) -> Trace:
    caplog.set_level(logging.DEBUG)
    return Trace(caplog, home, backend_env)


def said(result: Any) -> str:
    """A tool result's text and structured content, with the fakes' echo of a (masked) key taken out:
    what the server says to the provider's answer, as if the provider had not repeated the key."""
    return unmasked(text_of(result) + "\n" + json.dumps(result.structured_content))


def unmasked(text: str) -> str:
    """`text` without the fakes' echo of a key that the server masked."""
    return text.replace(f" (key {MASK})", "").replace(f"key {MASK}", "")
