"""AppyPie (synchronous FLUX.1 schnell behind Azure APIM) through the in-memory MCP client and its fake: what is
specific to AppyPie (the checks every provider meets are in tests/contract)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr

from flux_mcp.config import ProviderSettings
from flux_mcp.errors import ProviderRejected
from flux_mcp.http import ProviderHttp
from flux_mcp.providers import AppyPie, ImageRequest
from flux_mcp.redact import Redactor
from tests.conftest import FAST_RETRY, connect, text_of
from tests.fakes.appypie import AppyPieFake, rate_limited

pytestmark = pytest.mark.anyio
APPYPIE_KEY = "appypie-canary-5d1e8b3f9a7c2e60b4d8"
"""A unique canary: no result text may ever contain it (or a long part of it)."""
BASE = "http://appypie.test"
PATH = "POST /flux-1-schnell/v1/getData"


@pytest.fixture
def fake() -> AppyPieFake:
    return AppyPieFake(key=APPYPIE_KEY)


@pytest.fixture
def settings(make_settings):
    return make_settings(APPYPIE_SUBSCRIPTION_KEY=APPYPIE_KEY, APPYPIE_BASE_URL=BASE)


def assert_no_key(result) -> None:
    text = text_of(result) + str(result.structured_content or "")
    assert APPYPIE_KEY not in text and APPYPIE_KEY[:14] not in text


# --- generate and check_prediction -------------------------------------------------------------------


async def test_generate_image_returns_a_local_file_and_a_server_made_id(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a cozy mountain cabin"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert (data["provider"], data["model"], data["status"]) == ("appypie", "flux-1-schnell", "succeeded")
    assert re.fullmatch(r"appypie:[0-9a-f]{32}", data["prediction_id"])
    [image] = data["images"]
    assert image["url"].startswith(f"{BASE}/files/prompt-")
    assert Path(image["path"]).is_file() and Path(image["path"]).is_relative_to(home)
    assert (image["width"], image["height"], image["mime_type"]) == (64, 64, "image/png")
    assert image["path"] in text_of(result) and any(b.type == "image" for b in result.content)
    assert data["cost_usd"] is None  # AppyPie documents no price
    assert fake.ledger == [{"prompt": "a cozy mountain cabin", "num_steps": 4, "height": 1024, "width": 1024}]
    assert_no_key(result)


async def test_each_call_carries_the_documented_headers(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p"})
    [headers] = fake.headers
    assert headers["ocp-apim-subscription-key"] == APPYPIE_KEY
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-cache"


async def test_size_steps_and_seed_are_sent_as_documented_fields(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "width": 512, "height": 768,
                                                           "steps": 8, "seed": 15})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger == [{"prompt": "p", "num_steps": 8, "height": 768, "width": 512, "seed": 15}]


async def test_several_images_are_several_calls_with_distinct_seeds(settings, fake):
    async with connect(settings, fake) as client:
        seeded = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3, "seed": 7})
        random_ = await client.call_tool("generate_image", {"prompt": "q", "num_images": 2})
    assert seeded.structured_content["status"] == "succeeded", text_of(seeded)
    assert len(seeded.structured_content["images"]) == 3
    assert all(Path(i["path"]).is_file() for i in seeded.structured_content["images"])
    assert [b["seed"] for b in fake.ledger[:3]] == [7, 8, 9]
    first, second = (b["seed"] for b in fake.ledger[3:])
    assert first != second and len(random_.structured_content["images"]) == 2
    assert fake.generate_calls == 5


# --- a 200 without an image ---------------------------------------------------------------------


async def test_200_without_output_is_a_failed_prediction_that_was_not_resent(settings, fake):
    fake.no_output = 1
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        checked = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert result.is_error and result.structured_content["status"] == "failed"
    error = result.structured_content["error"]
    assert "without an image (Image Getting Created)" in error
    assert "this server did not resend the request" in error and "may still have been billed" in error
    assert result.structured_content["images"] == []
    assert checked.is_error and checked.structured_content == result.structured_content
    assert fake.generate_calls == 1 and len(fake.ledger) == 1
    assert_no_key(result)


async def test_all_calls_without_output_fail_the_prediction(settings, fake):
    fake.no_output = 2
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "image 1 of 2" in result.structured_content["error"]
    assert "image 2 of 2" in result.structured_content["error"]
    assert fake.generate_calls == 2


async def test_one_call_without_output_keeps_the_other_images(settings, fake):
    fake.no_output = 1
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert not result.is_error and result.structured_content["status"] == "succeeded"
    assert len(result.structured_content["images"]) == 1
    assert fake.generate_calls == 2


async def test_a_later_call_failing_keeps_the_images_made_and_sends_no_more(settings, fake):
    fake.submit_errors += [None, rate_limited(30)]
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3})
    assert not result.is_error and result.structured_content["status"] == "succeeded"
    [image] = result.structured_content["images"]
    assert Path(image["path"]).is_file()
    assert fake.generate_calls == 2  # the third image was never requested


async def test_a_partial_failure_is_reported_in_the_result(settings, fake):
    fake.submit_errors += [None, rate_limited(30)]
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3})
    assert "image 2 of 3 failed" in (result.structured_content["error"] or "")


def adapter(fake: AppyPieFake) -> tuple[AppyPie, httpx2.AsyncClient]:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
    http = ProviderHttp(client, "appypie", Redactor([APPYPIE_KEY]), key_env=AppyPie.key_env, retry=FAST_RETRY)
    return AppyPie(ProviderSettings(api_key=SecretStr(APPYPIE_KEY), base_url=BASE), http), client


async def test_adapter_reports_partial_failures_in_the_job_state(fake):
    fake.submit_errors += [None, rate_limited(30)]
    provider, client = adapter(fake)
    async with client:
        submitted = await provider.submit(ImageRequest(kind="generate", prompt="p", model="flux-1-schnell",
                                                       num_images=3, seed=5))
    state = submitted.state
    assert state is not None and state.status == "succeeded" and len(state.outputs) == 1
    assert state.error is not None
    assert state.error.startswith("Made 1 of 3 images; image 2 of 3 failed: AppyPie is rate limiting")
    assert state.error.endswith("Try again in 30 seconds; image 3 was not requested. "
                                "Failed calls are never resent.")
    assert re.fullmatch(r"[0-9a-f]{32}", submitted.native_id)


async def test_adapter_marks_a_200_without_output_as_no_output(fake):
    fake.no_output = 1
    provider, client = adapter(fake)
    async with client:
        submitted = await provider.submit(ImageRequest(kind="generate", prompt="p", model="flux-1-schnell"))
    assert submitted.state is not None
    assert (submitted.state.status, submitted.state.error_code) == ("failed", "no_output")


# --- refusals ------------------------------------------------------------------------------------


async def test_blank_prompt_is_refused_before_any_request(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "   "})
    assert result.is_error and "must not be blank" in text_of(result)
    assert fake.requests == []


@pytest.mark.parametrize(("body_change", "expected"), [
    ({"prompt": "  "}, "HTTP 400: Invalid prompt parameter"),
    ({"steps": 9}, "HTTP 400: Invalid request parameters"),
])
async def test_adapter_maps_the_fakes_own_validation_errors(fake, body_change, expected):
    provider, client = adapter(fake)
    # Past `prepare` (and past validation: model_copy does not validate), as if a caller skipped it.
    req = ImageRequest(kind="generate", prompt="p", model="flux-1-schnell").model_copy(update=body_change)
    async with client:
        with pytest.raises(ProviderRejected) as caught:
            await provider.submit(req)
    assert expected in str(caught.value) and "adjust them and call again" in str(caught.value)
    assert fake.generate_calls == 1 and fake.ledger == []


