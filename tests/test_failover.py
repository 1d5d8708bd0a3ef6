"""Failover that never pays twice: a call whose provider provably created nothing moves on to the next
configured provider serving the same FLUX model; anything that may have created a job stops the chain.
`provider: "auto"` chooses among the configured providers and says why."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from mcp import Client

from flux_mcp.config import Settings
from flux_mcp.server import build_server
from tests.conftest import ATLAS_KEY, FAST_RETRY, text_of
from tests.fakes.acedatacloud import AceDataFake
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.segmind import SegmindFake

pytestmark = pytest.mark.anyio
SEGMIND_KEY = "SG_5e9c4a7b1d3f8e20"
ACE_KEY = "acedata-canary-4b8e2f91c6d3a7e05f12"
HOSTS = {"atlas.test": "atlascloud", "segmind.test": "segmind", "ace.test": "acedatacloud"}


class Router:
    """Sends each request to the fake of its host; a host marked down refuses connections (nothing sent)."""

    def __init__(self) -> None:
        self.fakes: dict[str, Any] = {"atlascloud": AtlasFake(key=ATLAS_KEY), "segmind": SegmindFake(key=SEGMIND_KEY),
                                      "acedatacloud": AceDataFake(token=ACE_KEY)}
        self.down: set[str] = set()

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        provider = HOSTS[request.url.host]
        if provider in self.down:
            raise httpx2.ConnectError("connection refused", request=request)
        return await self.fakes[provider].handle(request)

    def paid(self) -> dict[str, int]:
        return {name: len(fake.ledger) for name, fake in self.fakes.items()}


def settings_for(make_settings: Any, **extra: str) -> Settings:
    env = {"ATLASCLOUD_API_KEY": ATLAS_KEY, "ATLASCLOUD_BASE_URL": "http://atlas.test", "ATLASCLOUD_SYNC_MODE": "off",
           "SEGMIND_API_KEY": SEGMIND_KEY, "SEGMIND_BASE_URL": "http://segmind.test",
           "ACEDATACLOUD_API_TOKEN": ACE_KEY, "ACEDATACLOUD_BASE_URL": "http://ace.test", **extra}
    settings: Settings = make_settings(**env)
    return settings


async def call(settings: Settings, router: Router, args: dict[str, Any]) -> Any:
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(router.handle))
    try:
        async with Client(build_server(settings, http_client=http, retry=FAST_RETRY)) as client:
            return await client.call_tool("generate_image", args)
    finally:
        await http.aclose()


REFUSALS = {
    "bad key": (401, {"code": 401, "message": "invalid api key"}, {}),
    "no credit": (402, {"code": 402, "message": "insufficient balance"}, {}),
    "rate limit": (429, {"code": 429, "message": "too many requests"}, {"retry-after": "1"}),
    "validation": (422, {"code": 422, "message": "size is not supported"}, {}),
}
CHAIN = ("atlascloud", "segmind", "acedatacloud")


def refuse(router: Router, provider: str, kind: str) -> None:
    if kind == "unreachable":
        router.down.add(provider)
        return
    status, body, headers = REFUSALS[kind]
    if provider == "segmind":
        body = {"error": body["message"]}  # Segmind's own error shape
    if provider == "acedatacloud":
        body = {"error": {"code": "bad_request", "message": body["message"]}}
    router.fakes[provider].submit_errors.append((status, body, headers))


@pytest.mark.parametrize("kind", [*REFUSALS, "unreachable"])
@pytest.mark.parametrize("refusing", [1, 2])
async def test_a_refusal_moves_on_and_only_the_serving_provider_is_paid(make_settings, kind: str, refusing: int):
    router = Router()
    for provider in CHAIN[:refusing]:
        refuse(router, provider, kind)
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="segmind,acedatacloud")
    result = await call(settings, router, {"prompt": "a lighthouse", "model": "flux-dev"})
    sc = result.structured_content
    serving = CHAIN[refusing]
    assert not result.is_error, text_of(result)
    assert sc["provider"] == serving and sc["status"] == "succeeded"
    paid = router.paid()
    assert paid[serving] == 1 and sum(paid.values()) == 1, paid  # zero double charges
    assert all(p in sc["selection_reason"] for p in CHAIN[:refusing]) and "nothing was charged" in sc["selection_reason"]
    assert "Provider choice:" in text_of(result)


async def test_every_provider_refusing_is_one_error_listing_each_refusal(make_settings):
    router = Router()
    for provider, kind in zip(CHAIN, ("no credit", "bad key", "rate limit"), strict=True):
        refuse(router, provider, kind)
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="segmind,acedatacloud")
    result = await call(settings, router, {"prompt": "p", "model": "flux-dev"})
    text = text_of(result)
    assert result.is_error and "Every provider refused" in text and "nothing was charged" in text
    assert all(f"{p}:" in text for p in CHAIN)
    assert sum(router.paid().values()) == 0


@pytest.mark.parametrize("ambiguous", [
    (500, {"code": 500, "message": "internal error"}, {}),
    (503, "<html>busy</html>", {"content-type": "text/html"}),
])
async def test_an_answer_that_may_have_created_the_job_stops_the_chain(make_settings, ambiguous):
    router = Router()
    router.fakes["atlascloud"].submit_errors.append(ambiguous)
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="segmind,acedatacloud")
    result = await call(settings, router, {"prompt": "p", "model": "flux-dev"})
    text = text_of(result)
    assert result.is_error and "may or may not have started" in text
    assert router.paid()["segmind"] == 0 and router.paid()["acedatacloud"] == 0
    assert router.fakes["segmind"].requests == [] and router.fakes["acedatacloud"].requests == []


async def test_a_reset_after_sending_stops_the_chain(make_settings):
    from tests.fakes.base import RESET

    router = Router()
    router.fakes["atlascloud"].submit_errors.append(RESET)
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="segmind")
    result = await call(settings, router, {"prompt": "p", "model": "flux-dev"})
    assert result.is_error and router.fakes["segmind"].requests == []


async def test_without_a_fallback_a_refusal_is_the_answer(make_settings):
    router = Router()
    refuse(router, "atlascloud", "no credit")
    result = await call(settings_for(make_settings), router, {"prompt": "p"})
    assert result.is_error and "insufficient balance" in text_of(result)
    assert router.fakes["segmind"].requests == []


async def test_only_providers_serving_the_same_model_are_tried(make_settings):
    router = Router()
    refuse(router, "atlascloud", "no credit")
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="segmind")
    # An Atlas-only model (no canonical twin elsewhere): nothing to fail over to.
    result = await call(settings, router, {"prompt": "p", "model": "black-forest-labs/flux-dev-lora"})
    assert result.is_error and router.fakes["segmind"].requests == []


async def test_auto_chooses_by_price_and_explains_the_choice(make_settings):
    router = Router()
    settings = settings_for(make_settings)
    result = await call(settings, router, {"prompt": "p", "provider": "auto"})
    sc = result.structured_content
    assert sc["status"] == "succeeded", text_of(result)
    assert sc["provider"] == "atlascloud"  # the lowest documented price for flux-schnell among these
    assert sc["selection_reason"].startswith("auto: atlascloud") and "$0.003" in sc["selection_reason"]
    assert sum(router.paid().values()) == 1


async def test_auto_moves_on_when_its_choice_refuses_and_remembers_it(make_settings):
    router = Router()
    refuse(router, "atlascloud", "no credit")
    settings = settings_for(make_settings, FLUX_MCP_PROVIDER="auto")
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(router.handle))
    async with Client(build_server(settings, http_client=http, retry=FAST_RETRY)) as client:
        first = await client.call_tool("generate_image", {"prompt": "p"})
        second = await client.call_tool("generate_image", {"prompt": "q"})
    await http.aclose()
    assert first.structured_content["provider"] != "atlascloud" and first.structured_content["status"] == "succeeded"
    assert "atlascloud" in first.structured_content["selection_reason"]
    # The refusal counts against Atlas for a while: the next call does not try it first.
    assert router.fakes["atlascloud"].count("POST /api/v1/model/generateImage") == 1
    assert second.structured_content["provider"] != "atlascloud"
    assert sum(router.paid().values()) == 2


async def test_auto_with_a_size_no_provider_takes_is_refused_before_anything_is_sent(make_settings):
    router = Router()
    result = await call(settings_for(make_settings), router, {"prompt": "p", "provider": "auto", "width": 8000,
                                                              "height": 8000})
    assert result.is_error and "8000x8000" in text_of(result)
    assert all(not fake.requests for fake in router.fakes.values())


# --- health from the journal: every attempt that created nothing is a row there ---------------------------

async def auto_call(settings: Settings, router: Router, prompt: str) -> Any:
    """One "auto" call on a server of its own (a new process's view: nothing remembered but the journal)."""
    return await call(settings, router, {"prompt": prompt, "provider": "auto"})


async def test_a_refusal_before_a_restart_still_puts_the_refuser_last(make_settings):
    router = Router()
    refuse(router, "atlascloud", "no credit")
    settings = settings_for(make_settings)
    first = await auto_call(settings, router, "before the restart")
    assert first.structured_content["provider"] != "atlascloud", text_of(first)
    # A new server on the same journal: Atlas would answer now, but its refusal minutes ago puts it last.
    second = await auto_call(settings, router, "after the restart")
    sc = second.structured_content
    assert sc["status"] == "succeeded" and sc["provider"] != "atlascloud", text_of(second)
    assert "atlascloud last (refused recently: no credit)" in sc["selection_reason"]
    assert router.fakes["atlascloud"].count("POST /api/v1/model/generateImage") == 1  # not tried again
    assert sum(router.paid().values()) == 2 and router.paid()["atlascloud"] == 0


async def test_a_second_server_on_the_same_journal_sees_the_first_ones_refusal(make_settings, monkeypatch):
    from flux_mcp import choose

    monkeypatch.setattr(choose, "HEALTH_CACHE", 0.0)  # a replica's cached view expires in seconds; here at once
    router = Router()
    settings = settings_for(make_settings)
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(router.handle))
    try:
        async with (Client(build_server(settings, http_client=http, retry=FAST_RETRY)) as one,
                    Client(build_server(settings, http_client=http, retry=FAST_RETRY)) as two):
            warm = await two.call_tool("generate_image", {"prompt": "warm", "provider": "auto"})
            assert warm.structured_content["provider"] == "atlascloud"  # healthy: the cheapest
            refuse(router, "atlascloud", "rate limit")
            refused = await one.call_tool("generate_image", {"prompt": "refused", "provider": "auto"})
            assert refused.structured_content["provider"] != "atlascloud", text_of(refused)
            after = await two.call_tool("generate_image", {"prompt": "after", "provider": "auto"})
    finally:
        await http.aclose()
    assert after.structured_content["provider"] != "atlascloud", text_of(after)
    assert "atlascloud last (refused recently: rate limited)" in after.structured_content["selection_reason"]
    assert router.fakes["atlascloud"].count("POST /api/v1/model/generateImage") == 2  # warm + refused only
    assert sum(router.paid().values()) == 3


async def test_each_attempt_that_created_nothing_is_journaled_with_its_reason_and_no_key(make_settings):
    from flux_mcp.backends import open_journal

    router = Router()
    # Atlas echoes the key it refused; AceDataCloud is unreachable; Segmind serves.
    router.fakes["atlascloud"].submit_errors.append(
        (401, {"code": 401, "message": f"invalid api key {ATLAS_KEY}"}, {}))
    router.down.add("acedatacloud")
    settings = settings_for(make_settings, FLUX_MCP_FALLBACK="acedatacloud,segmind")
    result = await call(settings, router, {"prompt": "p", "model": "flux-dev"})
    assert result.structured_content["provider"] == "segmind", text_of(result)
    journal = await open_journal(settings)
    try:
        seen = await journal.refusals_since(0)
    finally:
        await journal.close()
    assert set(seen) == {"atlascloud", "acedatacloud"}
    assert seen["atlascloud"].count == 1 and seen["atlascloud"].last_kind == "bad_key"
    assert "invalid api key" in seen["atlascloud"].last_reason and ATLAS_KEY not in seen["atlascloud"].last_reason
    assert ATLAS_KEY[:12] not in seen["atlascloud"].last_reason
    assert seen["acedatacloud"].last_kind == "unreachable" and "not sent" in seen["acedatacloud"].last_reason
