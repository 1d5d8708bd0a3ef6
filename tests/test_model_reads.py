"""What the model reads: clients that show it only structuredContent, and waits that stay under the
clients' own time limits."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import ATLAS_BASE, ATLAS_KEY, connect
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio


async def structured_only(result) -> dict:
    """What Claude Code (or openai-agents with use_structured_content) shows the model: nothing but this."""
    assert result.structured_content is not None
    return dict(result.structured_content)


async def test_a_structured_only_client_learns_the_image_is_a_placeholder_and_which_variable_to_set(make_settings):
    async with connect(make_settings()) as client:
        seen = await structured_only(await client.call_tool("generate_image", {"prompt": "a fox logo"}))
    assert seen["placeholder"] is True
    assert "PLACEHOLDER" in seen["message"] and "ATLASCLOUD_API_KEY" in seen["message"]
    assert "local path" in seen["message"]


async def test_a_real_result_is_not_marked_placeholder(settings, fake):
    async with connect(settings, fake) as client:
        seen = await structured_only(await client.call_tool("generate_image", {"prompt": "p"}))
    assert seen["placeholder"] is False and seen["status"] == "succeeded"
    assert "PLACEHOLDER" not in seen["message"] and "local path" in seen["message"]


async def test_a_structured_only_client_is_told_a_pending_job_needs_no_resubmission(settings):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as client:
        seen = await structured_only(await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0}))
    assert seen["status"] in ("starting", "processing")
    assert "check_prediction" in seen["message"] and seen["prediction_id"] in seen["message"]
    assert "nothing needs to be resubmitted" in seen["message"]


async def test_a_failed_job_says_what_to_do_in_structured_content(settings):
    fake = AtlasFake(key=ATLAS_KEY, outcome="fail")
    async with connect(settings, fake) as client:
        seen = await structured_only(await client.call_tool("generate_image", {"prompt": "p"}))
    assert seen["status"] == "failed" and "new, paid job" in seen["message"]


async def test_no_call_waits_past_the_max_wait_even_when_it_asks_for_more(make_settings):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE,
                             FLUX_MCP_MAX_WAIT_SECONDS="1")
    fake = AtlasFake(key=ATLAS_KEY, hold=True)  # a job that outlasts any client's patience
    async with connect(settings, fake) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        with anyio.fail_after(20):
            first = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 600})
            pid = first.structured_content["prediction_id"]
            again = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 600})
    assert first.structured_content["status"] in ("starting", "processing")
    assert again.structured_content["status"] in ("starting", "processing")
    assert "wait_seconds up to 1" in first.structured_content["message"]
    assert "at most 1" in listed["generate_image"].input_schema["properties"]["wait_seconds"]["description"]
    assert "at most 1" in listed["check_prediction"].input_schema["properties"]["wait_seconds"]["description"]
    assert len(fake.ledger) == 1


async def test_the_default_wait_stays_under_a_60_second_client_timeout(make_settings):
    settings = make_settings()
    assert settings.max_wait_seconds < 60 and settings.wait_seconds <= settings.max_wait_seconds
    raised = make_settings(FLUX_MCP_MAX_WAIT_SECONDS="300", FLUX_MCP_WAIT_SECONDS="200")
    assert raised.max_wait_seconds == 300 and raised.wait_seconds == 200
