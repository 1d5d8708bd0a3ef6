"""Charged once, even when the client asks twice: a re-issued call whose earlier answer never arrived
joins that job; a call whose answer did arrive is a new job; an idempotency key always returns its job."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio
ARGS = {"prompt": "a lighthouse at dusk", "save_to": "public/hero.png"}


async def cancel_once_submitted(client, fake: AtlasFake, args: dict) -> None:
    """Calls the tool and cancels the call once the job exists (what a client's timeout does)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "generate_image", args)
        with anyio.fail_after(10):
            while not fake.ledger:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # the call is now waiting on the job
        tg.cancel_scope.cancel()


async def test_a_cancelled_call_reissued_joins_its_job_and_gets_its_images(polled_settings, workspace):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(polled_settings, fake) as client:
        await cancel_once_submitted(client, fake, ARGS)
        [job_id] = fake.jobs
        fake.finish(job_id)
        again = await client.call_tool("generate_image", ARGS)
    sc = again.structured_content
    assert len(fake.ledger) == 1, "the re-issued call paid again"
    assert sc["prediction_id"] == f"atlascloud:{job_id}" and sc["status"] == "succeeded"
    assert "joined" in sc["message"] and "joined" in text_of(again)
    assert (workspace / "public" / "hero.png").is_file()


async def test_a_reissued_call_joins_a_job_still_running_and_waits_on_it(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(polled_settings, fake) as client:
        await cancel_once_submitted(client, fake, {"prompt": "p"})
        [job_id] = fake.jobs
        async with anyio.create_task_group() as tg:
            results: list = []

            async def reissue() -> None:
                results.append(await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 10}))

            tg.start_soon(reissue)
            with anyio.fail_after(10):
                while fake.jobs[job_id].polls < 2:  # the second call is waiting on the same job
                    await anyio.sleep(0.01)
            fake.finish(job_id)
    assert len(fake.ledger) == 1 and results[0].structured_content["status"] == "succeeded"


async def test_a_delivered_call_asked_again_is_a_new_job(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(polled_settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p"})
        second = await client.call_tool("generate_image", {"prompt": "p"})
    assert len(fake.ledger) == 2
    assert first.structured_content["prediction_id"] != second.structured_content["prediction_id"]
    assert "joined" not in second.structured_content["message"]


async def test_a_delivered_pending_answer_is_delivered_too(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(polled_settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})  # the client has the id
        await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})  # asked again on purpose
    assert len(fake.ledger) == 2


async def test_parallel_identical_calls_still_running_are_separate_jobs(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(polled_settings, fake) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(client.call_tool, "generate_image", {"prompt": "two variants", "wait_seconds": 1})
    assert len(fake.ledger) == 2


async def test_a_cancelled_call_is_joined_after_a_restart(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(polled_settings, fake) as client:
        await cancel_once_submitted(client, fake, {"prompt": "p"})
    [job_id] = fake.jobs
    fake.finish(job_id)
    async with connect(polled_settings, fake) as client:  # a new server on the same data folder
        again = await client.call_tool("generate_image", {"prompt": "p"})
    assert len(fake.ledger) == 1 and again.structured_content["prediction_id"] == f"atlascloud:{job_id}"


async def test_outside_the_rejoin_window_an_identical_call_is_a_new_job(make_settings):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             ATLASCLOUD_SYNC_MODE="off", FLUX_MCP_REJOIN_SECONDS="0")
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as client:
        await cancel_once_submitted(client, fake, {"prompt": "p"})
        await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
    assert len(fake.ledger) == 2


async def test_the_same_idempotency_key_returns_the_same_job_even_after_delivery(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY)
    args = {"prompt": "p", "idempotency_key": "hero-v1"}
    async with connect(polled_settings, fake) as client:
        first = await client.call_tool("generate_image", args)
        again = await client.call_tool("generate_image", args)
    async with connect(polled_settings, fake) as client:
        after_restart = await client.call_tool("generate_image", args)
    ids = {r.structured_content["prediction_id"] for r in (first, again, after_restart)}
    assert len(fake.ledger) == 1 and len(ids) == 1
    assert again.structured_content["images"] and after_restart.structured_content["status"] == "succeeded"


async def test_the_same_idempotency_key_with_other_arguments_is_a_clear_error(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(polled_settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "idempotency_key": "k1"})
        clash = await client.call_tool("generate_image", {"prompt": "other", "idempotency_key": "k1"})
    assert clash.is_error and "'k1'" in text_of(clash)
    assert first.structured_content["prediction_id"] in text_of(clash)
    assert len(fake.ledger) == 1


async def test_concurrent_calls_with_one_idempotency_key_make_one_job(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY)
    results: list = []
    async with connect(polled_settings, fake) as client:
        async def call() -> None:
            results.append(await client.call_tool("generate_image", {"prompt": "p", "idempotency_key": "once"}))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
    assert len(fake.ledger) == 1
    assert len({r.structured_content["prediction_id"] for r in results}) == 1


def sse_result(text: str) -> dict:
    import json

    for line in text.splitlines():
        if line.startswith("data:"):
            message = json.loads(line[5:])
            if "result" in message:
                return message["result"]
    raise AssertionError(f"no result in {text[:500]!r}")


@pytest.mark.subprocess
async def test_a_response_dropped_on_streamable_http_and_reissued_is_one_paid_job(loopback_fake, home, workspace):
    import httpx2

    from tests.subprocess_helpers import child_env, http_server

    fake = loopback_fake
    fake.hold = True
    env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url, ATLASCLOUD_SYNC_MODE="off")
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "generate_image", "arguments": {"prompt": "p", "wait_seconds": 2}}}
    with http_server("streamable-http", env, workspace) as (url, _), anyio.fail_after(60):
        log = next(workspace.glob(".server-*.log"))
        async with httpx2.AsyncClient(timeout=30) as http:
            init = await http.post(f"{url}/mcp", headers=headers, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            session = {**headers, "mcp-session-id": init.headers["mcp-session-id"],
                       "mcp-protocol-version": "2025-06-18"}
            await http.post(f"{url}/mcp", headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            async with http.stream("POST", f"{url}/mcp", headers=session, json=call) as response:
                assert response.status_code == 200
                while not fake.ledger:
                    await anyio.sleep(0.02)
            # The connection dropped before the answer: the server finds its caller gone and keeps the job.
            while "is gone" not in log.read_text():
                await anyio.sleep(0.02)
            fake.finish(next(iter(fake.jobs)))
            again = await http.post(f"{url}/mcp", headers=session, json={**call, "id": 3})
    result = sse_result(again.text)
    assert len(fake.ledger) == 1, "the re-issued call paid again"
    assert result["structuredContent"]["status"] == "succeeded" and "joined" in result["structuredContent"]["message"]
