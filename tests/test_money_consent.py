"""FLUX_MCP_CONFIRM_ABOVE_USD: the user confirms a call's cost through form elicitation before anything is
paid, through the SDK's own client in both protocol eras (handshake-era `elicitation/create` in the middle
of the call; 2026-07-28 `InputRequiredResult` and a second round). Only an explicit yes spends."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp_types import ElicitResult

from tests.conftest import ATLAS_BASE, ATLAS_KEY, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.money_helpers import Clock, charges, serve

pytestmark = pytest.mark.anyio
ERAS = ["legacy", "2026-07-28"]
DEV = "black-forest-labs/flux-dev"
"""$0.012 per image: above the $0.01 threshold of these tests."""


@pytest.fixture
def confirming(make_settings):
    return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE,
                         FLUX_MCP_CONFIRM_ABOVE_USD="0.01")


class User:
    """The person behind the client: answers every confirmation with `action`, and remembers what was shown."""

    def __init__(self, action: str, *, before: Any = None):
        self.action = action
        self.before = before
        self.asked: list[Any] = []

    async def __call__(self, _ctx: Any, params: Any) -> ElicitResult:
        self.asked.append(params)
        if self.before is not None:
            await self.before()
        content = {"confirm": True} if self.action == "accept" else None
        return ElicitResult(action=self.action, content=content)  # type: ignore[arg-type]


@pytest.mark.parametrize("era", ERAS)
async def test_an_accepted_confirmation_shows_the_cost_and_runs_the_job_once(era, confirming, home):
    fake, user = AtlasFake(key=ATLAS_KEY), User("accept")
    async with serve(confirming, fake, mode=era, elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk", "model": DEV})
    assert not result.is_error, text_of(result)
    assert result.structured_content["status"] == "succeeded" and len(fake.ledger) == 1
    [asked] = user.asked
    for shown in ("Atlas Cloud", DEV, "1 image", "$0.012", "a lighthouse at dusk"):
        assert shown in asked.message
    assert asked.requested_schema["properties"]["confirm"]["type"] == "boolean"
    assert [c.state for c in await charges(home)] == ["billed"]


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize(("action", "said"), [("decline", "declined"), ("cancel", "dismissed")])
async def test_a_declined_or_dismissed_confirmation_spends_nothing(era, action, said, confirming, home):
    fake, user = AtlasFake(key=ATLAS_KEY), User(action)
    async with serve(confirming, fake, mode=era, elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "model": DEV})
    assert result.is_error and said in text_of(result) and "Nothing was submitted" in text_of(result)
    assert len(user.asked) == 1
    assert fake.requests == [] and await charges(home) == []


async def test_an_unanswered_confirmation_spends_nothing_handshake_era(confirming, home):
    settings = confirming.model_copy(update={"confirm_seconds": 0.2})
    never = anyio.Event()
    fake, user = AtlasFake(key=ATLAS_KEY), User("accept", before=never.wait)
    async with serve(settings, fake, mode="legacy", elicitation_callback=user) as client:
        with anyio.fail_after(10):
            result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "model": DEV})
        never.set()
    assert result.is_error and "went unanswered" in text_of(result)
    assert fake.requests == [] and await charges(home) == []


async def test_an_answer_after_the_timeout_spends_nothing_2026_era(confirming, home):
    clock = Clock("2026-07-28T12:00:00Z")

    async def walk_away() -> None:
        clock.advance(confirming.confirm_seconds + 1)  # the user answers five minutes and a second later

    fake, user = AtlasFake(key=ATLAS_KEY), User("accept", before=walk_away)
    async with serve(confirming, fake, clock=clock, mode="2026-07-28", elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "model": DEV})
    assert result.is_error and "went unanswered for 5 minutes" in text_of(result)
    assert fake.requests == [] and await charges(home) == []


@pytest.mark.parametrize("era", ERAS)
async def test_a_client_that_cannot_elicit_is_refused_and_told_how_the_user_pre_authorises(era, confirming):
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(confirming, fake, mode=era) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "model": DEV})
    text = text_of(result)
    assert result.is_error and "cannot ask the user to confirm" in text
    assert "set FLUX_MCP_CONFIRM_ABOVE_USD to 0.02 or more" in text and "server's environment" in text
    assert "argument" not in text and "dry_run" not in text  # nothing the model could set itself
    assert fake.requests == []


@pytest.mark.parametrize("era", ERAS)
async def test_a_call_at_or_below_the_threshold_is_not_asked_about(era, confirming):
    fake, user = AtlasFake(key=ATLAS_KEY), User("decline")
    async with serve(confirming, fake, mode=era, elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse"})  # schnell, $0.003
    assert not result.is_error and user.asked == [] and len(fake.ledger) == 1


async def test_a_model_of_unknown_price_is_asked_about_as_an_unknown_amount(confirming):
    fake, user = AtlasFake(key=ATLAS_KEY, price=None), User("accept")
    async with serve(confirming, fake, mode="legacy", elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "wavespeed-ai/flux-schnell"})
    assert not result.is_error
    [asked] = user.asked
    assert "an unknown amount" in asked.message


async def test_a_dry_run_says_the_call_would_ask_and_asks_nobody(confirming):
    fake, user = AtlasFake(key=ATLAS_KEY), User("accept")
    async with serve(confirming, fake, mode="legacy", elicitation_callback=user) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": DEV, "dry_run": True})
    assert not result.is_error and user.asked == [] and fake.requests == []
    plan = result.structured_content["dry_run"]
    assert plan["confirm"] is True and plan["allowed"] is True
    assert "confirm the cost" in result.structured_content["message"]
