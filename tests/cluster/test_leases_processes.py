"""Replicas as real processes (`flux-mcp serve --transport streamable-http` on one database and one bucket),
one of them SIGKILLed: before the provider answered its paid request (the job is `unknown`, never
resubmitted) and after (another replica takes the job over and finishes it; a re-issue with the same
idempotency_key gets it without paying again). The Atlas Cloud fake runs on loopback in this process."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import ATLAS_KEY, pg_env, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import serve_on_loopback
from tests.subprocess_helpers import child_env, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]
ALICE = "alice-token-3b9f0c1e7a5d-9c4e2b8a6d1f7e3c"
LEASE = 2.0


@dataclass
class GatedAtlas(AtlasFake):
    """The Atlas Cloud fake whose paid requests can be held (the provider has not answered yet)."""

    hold_submits: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    submits: int = 0
    """Paid requests that reached the provider (counted on arrival, answered or not)."""

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.url.path == "/api/v1/model/generateImage":
            self.submits += 1
            while self.hold_submits and not self.release.is_set():
                await asyncio.sleep(0.01)
        return await super().handle(request)


@pytest.fixture
def fake() -> Any:
    fake = GatedAtlas(key=ATLAS_KEY, hold=True)
    with serve_on_loopback(fake) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake
        fake.release.set()


@pytest.fixture
def env(request: pytest.FixtureRequest, fake: GatedAtlas, home: Path) -> dict[str, str]:
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url,  # type: ignore[attr-defined]
                     FLUX_MCP_AUTH_TOKENS=f"alice:{ALICE}", FLUX_MCP_LEASE_SECONDS=str(LEASE), **pg_env(request))


@contextlib.asynccontextmanager
async def as_alice(url: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
            yield client


async def until(predicate: Any, limit: float = 30.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.02)


async def call_until_killed(url: str, args: dict[str, Any], cut: list[BaseException]) -> None:
    """A call whose replica is killed under it: the client sees its connection cut."""
    try:
        async with as_alice(url) as client:
            await client.call_tool("generate_image", args)
    except Exception as exc:  # the replica is gone mid-call
        cut.append(exc)


async def test_sigkill_before_the_provider_answered_leaves_an_unknown_job_that_is_never_resubmitted(
        fake: GatedAtlas, env: dict[str, str], workspace: Path):
    fake.hold_submits = True
    args = {"prompt": "a lighthouse at dusk", "idempotency_key": "run-1", "wait_seconds": 30}
    with http_server("streamable-http", env, workspace) as (one, first), \
            http_server("streamable-http", env, workspace) as (two, _):
        cut: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_until_killed, one, args, cut)
            await until(lambda: fake.submits == 1)  # the paid request is out; no answer yet
            first.kill()
            first.wait()
        async with as_alice(two) as alice:
            with anyio.fail_after(LEASE + 20):
                again = await alice.call_tool("generate_image", args)  # the client re-issues the cut call
            listed = await alice.call_tool("list_predictions", {})
        fake.release.set()  # the provider's answer now goes to a dead process
        data = again.structured_content
        assert data["status"] == "unknown", text_of(again)
        assert "never resubmitted" in data["message"] and "dashboard" in data["message"]
        assert data["prediction_id"] in text_of(listed) and "unknown" in text_of(listed)
        async with as_alice(two) as alice:
            looked = await alice.call_tool("check_prediction", {"prediction_id": data["prediction_id"],
                                                                 "wait_seconds": 1})
    assert cut and looked.structured_content["status"] == "unknown"
    assert fake.submits == 1  # never resubmitted, neither by the re-issue nor by the surviving replica


async def test_sigkill_after_the_provider_answered_is_taken_over_and_a_reissue_gets_the_job_without_paying(
        fake: GatedAtlas, env: dict[str, str], workspace: Path, cluster_services):
    _, s3 = cluster_services
    args = {"prompt": "a lighthouse at dusk", "idempotency_key": "run-2", "wait_seconds": 60}
    with http_server("streamable-http", env, workspace) as (one, first), \
            http_server("streamable-http", env, workspace) as (two, _):
        cut: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_until_killed, one, args, cut)
            await until(lambda: fake.count("GET /api/v1/model/prediction/") >= 1)  # journaled, being polled
            first.kill()
            first.wait()
        [job] = list(fake.jobs)
        fake.finish(job)
        bucket = env["FLUX_MCP_S3_URL"].removeprefix("s3://")
        # Nobody asks: the lease lapses and the survivor's reconciler takes the job over and finishes it.
        await until(lambda: [k for k in s3.keys(bucket) if k.endswith(".png")], LEASE + 20)
        async with as_alice(two) as alice:
            with anyio.fail_after(20):
                again = await alice.call_tool("generate_image", args)  # the client re-issues the cut call
        data = again.structured_content
        async with httpx2.AsyncClient() as http:
            download = await http.get(data["images"][0]["url"])
    assert cut and data["status"] == "succeeded" and data["prediction_id"] == f"atlascloud:{job}", text_of(again)
    assert "joined" in data["message"]
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
    assert fake.submits == 1 and len(fake.ledger) == 1
    assert len([k for k in s3.keys(bucket) if k.endswith(".png")]) == 1


async def test_sigterm_hands_the_replicas_jobs_over_at_once_instead_of_after_the_lease(
        fake: GatedAtlas, env: dict[str, str], workspace: Path, cluster_services):
    _, s3 = cluster_services
    env = {**env, "FLUX_MCP_LEASE_SECONDS": "60"}
    args = {"prompt": "a lighthouse at dusk", "idempotency_key": "run-3", "wait_seconds": 60}
    with http_server("streamable-http", env, workspace) as (one, first), \
            http_server("streamable-http", env, workspace) as (_, _second):
        cut: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_until_killed, one, args, cut)
            await until(lambda: fake.count("GET /api/v1/model/prediction/") >= 1)
            first.terminate()  # a rolling restart: SIGTERM
            await anyio.to_thread.run_sync(first.wait)
        [job] = list(fake.jobs)
        fake.finish(job)
        bucket = env["FLUX_MCP_S3_URL"].removeprefix("s3://")
        # Far sooner than the 60 s lease: the stopping replica ended its leases and the other took the job.
        await until(lambda: [k for k in s3.keys(bucket) if k.endswith(".png")], 15)
    assert first.returncode == 0 and fake.submits == 1 and len(fake.ledger) == 1
