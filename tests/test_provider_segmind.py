"""The four tools against the Segmind fake (synchronous v1 calls, upload on its own host): what is specific
to Segmind (the checks every provider meets are in tests/contract)."""

from __future__ import annotations

import base64
import datetime as dt
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from PIL import Image

from flux_mcp.config import Settings
from flux_mcp.http import ProviderHttp
from flux_mcp.providers.base import ImageRequest
from flux_mcp.providers.segmind import Segmind, nearest_ratio
from flux_mcp.redact import Redactor
from tests.conftest import FAST_RETRY, connect, text_of
from tests.fakes.segmind import SegmindFake
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
SEGMIND_KEY = "SG_5e9c4a7b1d3f8e20"
"""A canary in Segmind's key format: no output may contain it (or a long part of it)."""
BASE = "http://segmind.test"


@pytest.fixture
def fake() -> SegmindFake:
    return SegmindFake(key=SEGMIND_KEY)


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(SEGMIND_API_KEY=SEGMIND_KEY, SEGMIND_BASE_URL=BASE, SEGMIND_UPLOAD_BASE_URL=BASE)


def no_key_in(result) -> bool:
    text = text_of(result) + str(result.structured_content)
    return SEGMIND_KEY not in text and SEGMIND_KEY[3:15] not in text


# --- generate --------------------------------------------------------------------------------------


async def test_generate_image_saves_the_jpeg_and_reports_credits_and_cost(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert data["provider"] == "segmind" and data["model"] == "flux-schnell" and data["status"] == "succeeded"
    assert re.fullmatch(r"segmind:[0-9a-f]{32}", data["prediction_id"])
    [image] = data["images"]
    assert image["url"] is None
    assert (image["mime_type"], image["width"], image["height"]) == ("image/jpeg", 64, 48)
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(home)
    with Image.open(path) as im:
        assert im.format == "JPEG"
    assert data["cost_usd"] == pytest.approx(0.008) and data["remaining_credits"] == pytest.approx(9.992)
    assert "Remaining credits: 9.992" in text_of(result) and str(path) in text_of(result)
    assert [b.type for b in result.content].count("image") == 1
    assert fake.v1_calls() == 1 and len(fake.ledger) == 1


async def test_generate_sends_the_documented_schnell_fields(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p", "width": 1216, "height": 832, "seed": 7,
                                                  "steps": 6})
    assert fake.ledger == [{"slug": "flux-schnell", "prompt": "p", "steps": 6, "seed": 7,
                            "sampler_name": "euler", "scheduler": "normal", "samples": 1, "width": 1216,
                            "height": 832, "denoise": 1}]


async def test_several_images_are_parallel_calls_with_consecutive_seeds(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3, "seed": 41})
    data = result.structured_content
    assert data["status"] == "succeeded" and len(data["images"]) == 3
    assert len({i["path"] for i in data["images"]}) == 3
    assert sorted(b["seed"] for b in fake.ledger) == [41, 42, 43]
    assert all(b["samples"] == 1 for b in fake.ledger) and fake.v1_calls() == 3
    assert data["cost_usd"] == pytest.approx(0.024) and data["remaining_credits"] == pytest.approx(9.976)


async def test_without_a_seed_every_job_gets_a_random_base_seed(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
        await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    first, second = sorted(b["seed"] for b in fake.ledger[:2]), sorted(b["seed"] for b in fake.ledger[2:])
    assert first[1] == first[0] + 1 and second[1] == second[0] + 1
    assert first != second and 123456789 not in first + second  # not Segmind's fixed default


async def test_seeds_wrap_below_the_seed_limit(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p", "num_images": 2, "seed": 2_147_483_647})
    assert sorted(b["seed"] for b in fake.ledger) == [0, 2_147_483_647]


async def test_flux_dev_maps_size_to_the_nearest_aspect_ratio(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-dev", "width": 1344,
                                                           "height": 768, "guidance_scale": 3.5, "steps": 25})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    body = fake.ledger[0]
    assert body["aspect_ratio"] == "16:9" and body["guidance"] == 3.5 and body["steps"] == 25
    assert body["samples"] == 1 and "width" not in body


@pytest.mark.parametrize("answer", ["json-image-url", "json-images", "json-output-base64", "json-output-url",
                                    "json-data-uri"])
async def test_json_answers_with_a_url_or_base64_give_images(settings, fake, answer):
    fake.answer = answer
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    data = result.structured_content
    assert data["status"] == "succeeded", text_of(result)
    assert len(data["images"]) == 2 and all(Path(i["path"]).is_file() for i in data["images"])
    if "url" in answer:
        assert all(i["url"].startswith(f"{BASE}/files/") for i in data["images"])


@pytest.mark.parametrize(("answer", "expected"), [("text", "with text/plain instead of an image"),
                                                  ("json-no-image", "without an image (Request processed)")])
async def test_a_200_without_an_image_is_a_billed_failure_not_a_success(settings, fake, answer, expected):
    fake.answer = answer
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": result.structured_content["prediction_id"]})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert expected in result.structured_content["error"]
    assert result.structured_content["cost_usd"] == pytest.approx(0.008)
    assert again.is_error and again.structured_content == result.structured_content
    assert len(fake.ledger) == 1 and fake.v1_calls() == 1


# --- several calls, some failing ------------------------------------------------------------------


async def test_partial_failure_keeps_the_images_that_succeeded_and_resends_nothing(settings, fake):
    fake.errors.append((500, {"error": "CUDA out of memory"}, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3, "seed": 5})
    data = result.structured_content
    assert not result.is_error and data["status"] == "succeeded"
    assert len(data["images"]) == 2 and all(Path(i["path"]).is_file() for i in data["images"])
    assert fake.v1_calls() == 3 and len(fake.ledger) == 2
    assert data["cost_usd"] == pytest.approx(0.016)
    assert data["error"].startswith("1 of 3 Segmind calls failed and were not resent")
    assert "1 of 3 Segmind calls failed" in text_of(result)


def adapter(handle, settings: Settings) -> tuple[Segmind, httpx2.AsyncClient]:
    """The adapter alone, over `handle`, for what the tools do not show."""
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handle))
    http = ProviderHttp(client, "segmind", Redactor([SEGMIND_KEY]), key_env="SEGMIND_API_KEY",
                        retry=FAST_RETRY)
    return Segmind(settings.providers["segmind"], http), client


async def test_partial_failure_names_each_failed_call_in_the_job_error(settings, fake):
    fake.errors.append((406, {"error": "Insufficient credits"}, {}))
    provider, client = adapter(fake.handle, settings)
    async with client:
        req = provider.prepare(ImageRequest(kind="generate", prompt="p", model="flux-schnell", num_images=2,
                                            seed=9))
        submitted = await provider.submit(req)
    state = submitted.state
    assert state is not None and state.status == "succeeded" and len(state.outputs) == 1
    assert state.error is not None
    assert state.error.startswith("1 of 2 Segmind calls failed and were not resent")
    assert re.search(r"image [12] \(seed (9|10)\): Segmind says the account does not have enough credits",
                     state.error)
    assert state.cost_usd == pytest.approx(0.008) and fake.v1_calls() == 2


def dropping_first_v1_call(fake: SegmindFake):
    """A handler whose first v1 call is sent but never answered (connection reset)."""
    dropped: list[httpx2.Request] = []

    async def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.startswith("/v1/") and not dropped:
            dropped.append(request)
            raise httpx2.ReadError("connection reset by peer", request=request)
        return await fake.handle(request)

    return handle, dropped


async def test_a_call_left_unanswered_is_reported_as_possibly_charged_and_not_resent(settings, fake):
    handle, dropped = dropping_first_v1_call(fake)
    async with connect(settings, SimpleNamespace(handle=handle)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "was sent but no answer came back" in text_of(result)
    assert "avoid paying twice" in text_of(result)
    assert len(dropped) == 1 and fake.v1_calls() == 0


async def test_an_unanswered_call_among_several_keeps_the_others_images(settings, fake):
    handle, dropped = dropping_first_v1_call(fake)
    provider, client = adapter(handle, settings)
    async with client:
        req = provider.prepare(ImageRequest(kind="generate", prompt="p", model="flux-schnell", num_images=2))
        submitted = await provider.submit(req)
    state = submitted.state
    assert state is not None and state.status == "succeeded" and len(state.outputs) == 1
    assert state.error is not None and "was sent but no answer came back" in state.error
    assert len(dropped) == 1 and fake.v1_calls() == 1


async def test_when_every_call_fails_the_error_says_none_was_resent(settings, fake):
    fake.balance = 0.0
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert result.is_error and "All 2 Segmind calls failed; none was resent." in text_of(result)
    assert "Top up at segmind.com" in text_of(result)
    assert fake.v1_calls() == 2 and fake.ledger == []


async def test_running_out_of_credit_mid_way_is_reported_with_top_up(settings, fake):
    fake.balance = 0.01
    async with connect(settings, fake) as client:
        ok = await client.call_tool("generate_image", {"prompt": "p"})
        broke = await client.call_tool("generate_image", {"prompt": "p"})
    assert not ok.is_error and ok.structured_content["remaining_credits"] == pytest.approx(0.002)
    assert broke.is_error and "does not have enough credits" in text_of(broke) and "Top up" in text_of(broke)
    assert len(fake.ledger) == 1 and fake.v1_calls() == 2


# --- edit and upload -------------------------------------------------------------------------------


async def test_edit_with_a_url_uses_kontext_pro_and_keeps_the_input_aspect_ratio(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it night", "seed": 3,
                                                       "image": "https://example.com/cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert result.structured_content["model"] == "flux-kontext-pro"
    assert fake.ledger == [{"slug": "flux-kontext-pro", "prompt": "make it night", "seed": 3,
                            "input_image": "https://example.com/cat.png", "output_format": "png",
                            "safety_tolerance": 2, "aspect_ratio": "match_input_image"}]
    assert fake.uploads == {}


async def test_edit_with_a_size_asks_kontext_for_the_nearest_ratio(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("edit_image", {"prompt": "x", "image": "https://example.com/a.png",
                                              "width": 832, "height": 1216})
    assert fake.ledger[0]["aspect_ratio"] == "2:3"


async def test_edit_with_a_local_file_uploads_it_to_the_asset_host_first(settings, fake, workspace):
    (workspace / "cat.png").write_bytes(png_bytes(32, 32))
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "add a hat", "image": "cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    [name] = fake.uploads
    assert fake.uploads[name] == png_bytes(32, 32)
    assert fake.ledger[0]["input_image"] == f"{BASE}/assets/{name}"
    assert fake.requests[:2] == ["POST /upload-asset", "POST /v1/flux-kontext-pro"]


async def test_edit_with_img2img_sends_its_required_fields(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "watercolour", "model": "flux-img2img",
                                                       "image": "https://example.com/a.png", "seed": 1})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger == [{"slug": "flux-img2img", "prompt": "watercolour", "image": "https://example.com/a.png",
                            "steps": 20, "seed": 1, "denoise": 0.75, "scheduler": "normal",
                            "sampler_name": "euler", "base64": False}]


@pytest.mark.parametrize(("model", "field"), [("flux-img2img", "image"), ("flux-kontext-pro", "input_image")])
async def test_a_data_uri_input_is_sent_as_raw_base64(settings, fake, model, field):
    raw = base64.b64encode(png_bytes(8, 8)).decode()
    provider, client = adapter(fake.handle, settings)
    async with client:
        req = provider.prepare(ImageRequest(kind="edit", prompt="p", model=model,
                                            image=f"data:image/png;base64,{raw}"))
        submitted = await provider.submit(req)
    assert submitted.state is not None and submitted.state.status == "succeeded"
    assert fake.ledger[0][field] == raw


@pytest.mark.parametrize("style", ["urls", "file_urls"])
async def test_upload_media_returns_the_asset_url_and_reuses_it(settings, fake, workspace, style):
    fake.upload_style = style
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(settings, fake) as client:
        first = await client.call_tool("upload_media", {"path": "a.png"})
        second = await client.call_tool("upload_media", {"path": "a.png"})
    assert not first.is_error, text_of(first)
    [name] = fake.uploads
    assert first.structured_content["url"] == f"{BASE}/assets/{name}"
    assert second.structured_content["reused"] is True
    assert second.structured_content["url"] == f"{BASE}/assets/{name}"
    assert fake.requests.count("POST /upload-asset") == 1 and no_key_in(first)


async def test_upload_goes_to_the_default_asset_host_when_none_is_set(make_settings):
    seen: list[str] = []

    async def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(str(request.url))
        return httpx2.Response(200, json={"urls": ["https://images.segmind.com/assets/a.png"]})

    provider, client = adapter(handle, make_settings(SEGMIND_API_KEY=SEGMIND_KEY))
    async with client:
        url = await provider.upload(png_bytes(), "a.png", "image/png")
    assert seen == ["https://workflows-api.segmind.com/upload-asset"]
    assert url == "https://images.segmind.com/assets/a.png"


async def test_upload_with_a_wrong_key_names_the_key_variable(make_settings, fake, workspace):
    settings = make_settings(SEGMIND_API_KEY="SG_0000000000000000", SEGMIND_BASE_URL=BASE,
                             SEGMIND_UPLOAD_BASE_URL=BASE)
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "a.png"})
    assert result.is_error and "SEGMIND_API_KEY" in text_of(result) and "may have expired" in text_of(result)
    assert fake.uploads == {}


# --- refusals before any request -------------------------------------------------------------------


async def test_img2img_steps_out_of_range_are_refused_before_any_request(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "model": "flux-img2img", "steps": 60,
                                                       "image": "https://example.com/a.png"})
    assert result.is_error and "steps=60 is out of range for segmind model flux-img2img: allowed 1 to 50" in \
        text_of(result)
    assert fake.requests == []


async def test_the_fake_enforces_the_documented_limits(fake):
    """The fake refuses what the docs forbid, so the adapter's passing bodies mean something."""
    async def post(slug: str, body: dict) -> httpx2.Response:
        return await fake.handle(httpx2.Request("POST", f"{BASE}/v1/{slug}", json=body,
                                                headers={"x-api-key": SEGMIND_KEY}))

    assert (await post("flux-schnell", {"prompt": "p", "width": 1000})).status_code == 200
    assert (await post("flux-schnell", {"prompt": "p", "width": 1004})).status_code == 400
    assert (await post("flux-schnell", {"prompt": "p", "steps": 9})).status_code == 400
    assert (await post("flux-img2img", {"prompt": "p", "image": "data:image/png;base64,AAAA", "steps": 20,
                                        "denoise": 0.75, "scheduler": "normal",
                                        "sampler_name": "euler"})).status_code == 400
    assert (await post("flux-kontext-pro", {"prompt": "p", "input_image": "https://x/a.png",
                                            "safety_tolerance": 4})).status_code == 400
    fake.invalid_status = 406
    assert (await post("flux-schnell", {"prompt": "p", "height": 4096})).status_code == 406
    assert len(fake.ledger) == 1


# --- documented error answers -------------------------------------------------------------------------


def reset_in(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("header", [lambda: reset_in(30), lambda: f"{time.time() + 30:.3f}"])
async def test_rate_limit_says_when_the_limit_resets(settings, fake, header):
    fake.errors.append((429, {"error": "Rate limit exceeded"}, {"x-rate-limit-reset-at-utc": header()}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error
    assert re.search(r"HTTP 429: Rate limit exceeded\); the job was not created. Try again in about (29|30) "
                     r"seconds \(the limit resets at ", text_of(result)), text_of(result)
    assert fake.v1_calls() == 1


async def test_forbidden_model_is_an_auth_error_listing_other_models(settings, fake):
    fake.forbidden.add("flux-dev")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-dev"})
    assert result.is_error and "does not let this key use model flux-dev" in text_of(result)
    assert "flux-schnell" in text_of(result) and fake.ledger == []


def test_nearest_ratio_is_symmetric_on_a_log_scale():
    assert nearest_ratio(1024, 1024, ("1:1", "16:9")) == "1:1"
    assert nearest_ratio(2048, 1024, ("2:1", "16:9", "21:9")) == "2:1"
    assert nearest_ratio(1024, 2048, ("1:2", "9:16")) == "1:2"
