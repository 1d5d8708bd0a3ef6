"""Shared fixtures: settings over temp folders, fakes behind MockTransport, in-memory MCP clients."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from flux_mcp.config import Settings
from flux_mcp.http import RetryPolicy
from flux_mcp.media import DownloadLimits
from flux_mcp.server import build_server
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import Fake, serve_on_loopback

ATLAS_KEY = "atlas-canary-7f3c9e1b2d4a6f80c5e7"
"""A unique canary: no test output, log, file or journal may ever contain it (or a long part of it)."""

ATLAS_BASE = "http://atlas.test"

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, max_retry_after=0.05, deadline=10)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", choices=["sqlite", "pg"], default="sqlite",
                     help="where servers built from the `settings` fixtures keep state: sqlite (the journal file "
                          "and image folder in FLUX_MCP_HOME) or pg (PostgreSQL and an S3 bucket, both started "
                          "by the test setup)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--backend") != "pg":
        return
    skip = pytest.mark.skip(reason="asserts on the server's local files; shared mode keeps none (--backend=pg)")
    for item in items:
        if item.get_closest_marker("local_disk"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster_services() -> Iterator[tuple[Any, Any]]:
    """PostgreSQL and moto's S3 server, started once per session (tests/cluster_env.py)."""
    import importlib.util
    import os

    missing = [m for m in ("psycopg", "psycopg_pool", "obstore", "moto") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"shared-mode parts not installed ({', '.join(missing)}): pip install -e '.[test,cluster,cluster-test]'"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: a skip there would hide the shared-mode tests
        pytest.skip(why)
    from tests.cluster_env import services

    with services() as both:
        yield both


@pytest.fixture(scope="module")
def pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this test module's own (each test gets a schema of its own in it: `backend_env`)."""
    pg, _ = request.getfixturevalue("cluster_services")
    name = pg.create_database()
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The variables that select the backend of --backend: none for sqlite; for pg, a fresh schema (as an
    empty database) and a fresh bucket."""
    if request.config.getoption("--backend") != "pg":
        return {}
    return pg_env(request)


def pg_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """FLUX_MCP_DATABASE_URL (a new, empty schema of the module's database) and the S3 variables (a new bucket)."""
    import uuid

    pg, s3 = request.getfixturevalue("cluster_services")
    database = request.getfixturevalue("pg_database")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE SCHEMA {schema}", database)
    url = f"{pg.url(database)}?options=-csearch_path%3D{schema}"
    return {"FLUX_MCP_DATABASE_URL": url, **s3.env(s3.create_bucket())}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "project"
    ws.mkdir()
    return ws


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "flux-home"


@pytest.fixture
def make_settings(workspace: Path, home: Path, backend_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        base = {"FLUX_MCP_HOME": str(home), **backend_env}
        return Settings.from_env({**base, **env}, cwd=workspace)

    return make


@pytest.fixture
def fake() -> AtlasFake:
    """The reference provider's fake (Atlas Cloud); provider test files override `fake` and `settings`."""
    return AtlasFake(key=ATLAS_KEY)


@pytest.fixture
def loopback_fake() -> Iterator[AtlasFake]:
    """The Atlas Cloud fake served on 127.0.0.1, for servers in child processes; its base URL in `.url`."""
    fake = AtlasFake(key=ATLAS_KEY)
    with serve_on_loopback(fake) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE)


@pytest.fixture
def polled_settings(make_settings: Callable[..., Settings]) -> Settings:
    """Atlas Cloud without sync mode: every job is polled and its images downloaded from their URLs."""
    return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE, ATLASCLOUD_SYNC_MODE="off")


@contextlib.asynccontextmanager
async def connect(settings: Settings, fake: Fake | None = None, *, retry: RetryPolicy = FAST_RETRY,
                  downloads: DownloadLimits | None = None, **client_kw: Any) -> AsyncIterator[Client]:
    """An MCP client connected in memory to a fresh server whose provider calls go to `fake`."""
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) if fake else None
    server = build_server(settings, http_client=http, retry=retry, downloads=downloads)
    try:
        async with Client(server, **client_kw) as client:
            yield client
    finally:
        if http is not None:
            await http.aclose()


def is_kept(location: str | None) -> bool:
    """Whether a result's `images[].path` names a kept image: a regular file, or (shared mode) an object in
    the bucket."""
    from tests.cluster_env import kept_bytes

    return bool(location) and kept_bytes(str(location)) is not None


def as_answered(structured: dict[str, Any]) -> dict[str, Any]:
    """A result's structuredContent with each presigned download link cut to its object's address: shared
    mode signs a fresh link on every answer (never stored), so two answers about one job differ only there."""
    images = [{**i, "url": i["url"].partition("?X-Amz-")[0]} if isinstance(i.get("url"), str) else i
              for i in structured.get("images") or []]
    return {**structured, "images": images} if "images" in structured else structured


def text_of(result: Any) -> str:
    return "\n".join(b.text for b in result.content if getattr(b, "type", "") == "text")
