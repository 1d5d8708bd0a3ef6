"""Orphan adoption with real replica processes: a replica SIGKILLed after the provider answered its call's
paid request; the client re-issues the cut call, without an idempotency key, through another replica, which
adopts the orphaned job instead of paying again (one submit in the provider's ledger) and answers its images."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx2
import pytest

from tests.cluster.test_leases_processes import (  # noqa: F401
    LEASE,
    GatedAtlas,
    as_alice,
    call_until_killed,
    env,
    fake,
    until,
)
from tests.conftest import text_of
from tests.subprocess_helpers import http_server

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


async def test_a_keyless_reissue_after_a_sigkill_adopts_the_orphan_and_answers_its_images_without_paying(
        fake: GatedAtlas, env: dict[str, str], workspace: Path, cluster_services):
    _, s3 = cluster_services
    args = {"prompt": "a lighthouse at dusk", "wait_seconds": 60}
    with http_server("streamable-http", env, workspace) as (one, first), \
            http_server("streamable-http", env, workspace) as (two, _):
        cut: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_until_killed, one, args, cut)
            await until(lambda: fake.count("GET /api/v1/model/prediction/") >= 1)  # answered, journaled, polled
            first.kill()
            first.wait()
        [job] = list(fake.jobs)
        fake.finish(job)
        bucket = env["FLUX_MCP_S3_URL"].removeprefix("s3://")
        # The lease lapses; the survivor's reconciler takes the job over (an orphan now) and finishes it.
        await until(lambda: [k for k in s3.keys(bucket) if k.endswith(".png")], LEASE + 20)
        async with as_alice(two) as alice:
            with anyio.fail_after(20):
                again = await alice.call_tool("generate_image", args)  # the cut call, re-issued as it was
        data = again.structured_content
        async with httpx2.AsyncClient() as http:
            download = await http.get(data["images"][0]["url"])
    assert cut and data["status"] == "succeeded" and data["prediction_id"] == f"atlascloud:{job}", text_of(again)
    assert "joined" in data["message"]
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
    assert fake.submits == 1 and len(fake.ledger) == 1
