"""The tools against the AceDataCloud fake, through an in-memory MCP client: what is specific to AceDataCloud
(the checks every provider meets are in tests/contract)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from flux_mcp.providers import acedatacloud
from flux_mcp.providers.acedatacloud import nearest_ratio
from tests.conftest import connect, text_of
from tests.fakes.acedatacloud import AceDataFake, envelope
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
BASE = "http://acedata.test"
ACE_TOKEN = "acedata-canary-4b8e2f91c6d3a7e05f12"
"""A unique canary: no result text may ever contain it (or a long part of it)."""
PLATFORM_TOKEN = "aceplat-canary-93d1e7b4a2c6f08e5d71"


@pytest.fixture
def fake() -> AceDataFake:
    return AceDataFake(token=ACE_TOKEN, platform_token=PLATFORM_TOKEN)


@pytest.fixture
def settings(make_settings):
    return make_settings(ACEDATACLOUD_API_TOKEN=ACE_TOKEN, ACEDATACLOUD_BASE_URL=BASE,
                         FLUX_MCP_PROVIDER="acedatacloud")


@pytest.fixture
def upload_settings(make_settings):
    return make_settings(ACEDATACLOUD_API_TOKEN=ACE_TOKEN, ACEDATACLOUD_BASE_URL=BASE,
                         ACEDATACLOUD_PLATFORM_TOKEN=PLATFORM_TOKEN, ACEDATACLOUD_PLATFORM_BASE_URL=BASE,
                         FLUX_MCP_PROVIDER="acedatacloud")


def assert_clean(result) -> None:
    text = text_of(result) + json.dumps(result.structured_content or {})
    for secret in (ACE_TOKEN, PLATFORM_TOKEN):
        assert secret not in text and secret[:14] not in text


# --- generate and check_prediction -----------------------------------------------------------------


async def test_generate_image_submits_async_polls_the_task_and_saves_the_file(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a white siamese cat"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert (data["provider"], data["model"], data["status"]) == ("acedatacloud", "flux-dev", "succeeded")
    [task_id] = fake.tasks
    assert data["prediction_id"] == f"acedatacloud:{task_id}"
    [image] = data["images"]
    assert image["url"] == f"{BASE}/files/{task_id}-0.png"
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(home)
    assert (image["width"], image["height"], image["mime_type"]) == (64, 64, "image/png")
    with Image.open(path) as im:
        assert im.info["prediction_id"] == data["prediction_id"]
    assert str(path) in text_of(result)
    assert fake.ledger == [{"action": "generate", "prompt": "a white siamese cat", "model": "flux-dev",
                            "size": "1024x1024", "async": True, "count": 1}]
    assert fake.requests[0] == "POST /flux/images" and "POST /flux/tasks" in fake.requests
    assert {"id": task_id, "action": "retrieve"} in fake.bodies
    assert_clean(result)


async def test_num_images_is_sent_as_count_and_every_image_is_kept(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert len(result.structured_content["images"]) == 3
    assert all(Path(i["path"]).is_file() for i in result.structured_content["images"])
    assert fake.ledger[0]["count"] == 3 and len(fake.ledger) == 1


@pytest.mark.parametrize(
    ("model", "width", "height", "size"),
    [
        ("flux-dev", 768, 512, "768x512"),
        ("flux-pro", 1440, 256, "1440x256"),
        ("flux-kontext-pro", 1920, 1080, "16:9"),
        ("flux-kontext-max", 1024, 1024, "1:1"),
        ("flux-2-pro", 800, 1000, "4:5"),
        ("flux-2-flex", 1000, 2400, "9:21"),
        ("flux-2-max", 1500, 1000, "3:2"),
        ("flux-2-klein", 768, 1024, "3:4"),
    ],
)
async def test_size_is_sent_in_the_form_each_model_takes(settings, fake, model, width, height, size):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": model, "width": width,
                                                           "height": height})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger[0]["size"] == size and fake.ledger[0]["model"] == model


def test_nearest_ratio_compares_shapes_not_differences():
    assert nearest_ratio(1024, 1024) == "1:1"
    assert nearest_ratio(2100, 900) == "21:9"
    assert nearest_ratio(900, 2100) == "9:21"
    assert nearest_ratio(1200, 900) == "4:3"
    assert nearest_ratio(4096, 64) == "21:9"


async def test_pending_task_comes_back_with_its_id_and_check_prediction_gets_the_images(settings, fake):
    fake.hold = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0.3})
        data = pending.structured_content
        assert not pending.is_error and data["status"] in ("starting", "processing") and data["images"] == []
        assert f'check_prediction with prediction_id="{data["prediction_id"]}"' in text_of(pending)
        fake.finish(data["prediction_id"].split(":", 1)[1])
        done = await client.call_tool("check_prediction", {"prediction_id": data["prediction_id"]})
    assert done.structured_content["status"] == "succeeded"
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    assert len(fake.ledger) == 1 and fake.requests.count("POST /flux/images") == 1


async def test_a_synchronous_answer_is_finished_at_once_without_polling(settings, fake):
    fake.sync = True
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert len(result.structured_content["images"]) == 2
    [task_id] = fake.tasks
    assert result.structured_content["prediction_id"] == f"acedatacloud:{task_id}"
    assert "POST /flux/tasks" not in fake.requests


@pytest.mark.parametrize("id_style", ["task_id", "data.task_id", "id"])
@pytest.mark.parametrize("result_style", ["list", "object", "status"])
async def test_every_documented_answer_shape_gives_the_image(settings, fake, id_style, result_style):
    fake.id_style, fake.result_style = id_style, result_style
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    data = result.structured_content
    assert data["status"] == "succeeded", text_of(result)
    assert data["prediction_id"] == f"acedatacloud:{next(iter(fake.tasks))}"
    assert Path(data["images"][0]["path"]).is_file()


# --- argument checks before any request ------------------------------------------------------------


async def test_edit_with_a_generate_only_model_is_refused_before_any_request(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": "https://example.com/a.png",
                                                       "model": "flux-2-klein"})
    assert result.is_error and "does not support edit" in text_of(result)
    assert "flux-kontext-pro" in text_of(result)
    assert fake.requests == []


async def test_unknown_model_passes_through_and_the_providers_refusal_is_shown(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-pro-1.1-ultra"})
    assert result.is_error and "model is invalid." in text_of(result) and "bad_request" in text_of(result)
    assert fake.bodies[0]["model"] == "flux-pro-1.1-ultra" and fake.bodies[0]["size"] == "1:1"
    assert fake.ledger == [] and fake.requests.count("POST /flux/images") == 1


# --- edit and upload -------------------------------------------------------------------------------


async def test_edit_with_url_uses_kontext_pro_sends_image_url_and_no_count(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it night", "width": 1536,
                                                       "height": 1024,
                                                       "image": "https://cdn.acedata.cloud/ytj2qy.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert result.structured_content["model"] == "flux-kontext-pro"
    assert fake.ledger == [{"action": "edit", "prompt": "make it night", "model": "flux-kontext-pro",
                            "size": "3:2", "async": True, "image_url": "https://cdn.acedata.cloud/ytj2qy.png"}]


async def test_edit_with_flux_dev_sends_pixel_size(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "x", "model": "flux-dev",
                                                       "image": "https://example.com/a.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger[0]["size"] == "1024x1024" and "count" not in fake.ledger[0]


@pytest.mark.parametrize("upload_style", ["file_url", "url"])
async def test_edit_with_a_local_file_uploads_it_with_the_platform_token(upload_settings, fake, workspace,
                                                                         upload_style):
    fake.upload_style = upload_style
    (workspace / "cat.png").write_bytes(png_bytes(32, 32))
    async with connect(upload_settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "add a hat", "image": "cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    [name] = fake.uploads
    assert fake.uploads[name] == png_bytes(32, 32)
    assert fake.ledger[0]["image_url"] == f"{BASE}/uploads/{name}"
    assert fake.requests[0] == "POST /api/v1/files/"
    assert_clean(result)


async def test_edit_with_a_data_uri_uploads_its_bytes_rather_than_sending_the_uri(upload_settings, fake):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(16, 16)).decode()
    async with connect(upload_settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "x", "image": uri})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert list(fake.uploads.values()) == [png_bytes(16, 16)]
    assert fake.ledger[0]["image_url"].startswith(f"{BASE}/uploads/")


@pytest.mark.parametrize("image", ["cat.png", "data:image/png;base64,iVBORw0KGgo="])
async def test_edit_with_a_local_image_without_platform_token_says_what_to_set(settings, fake, workspace,
                                                                              image):
    (workspace / "cat.png").write_bytes(png_bytes(32, 32))
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "x", "image": image})
    assert result.is_error
    assert "set ACEDATACLOUD_PLATFORM_TOKEN" in text_of(result) and "public image URL" in text_of(result)
    assert fake.requests == []


async def test_upload_media_returns_the_platform_url_and_reuses_it(upload_settings, fake, workspace):
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(upload_settings, fake) as client:
        first = await client.call_tool("upload_media", {"path": "a.png"})
        second = await client.call_tool("upload_media", {"path": "a.png"})
    assert not first.is_error, text_of(first)
    assert first.structured_content["provider"] == "acedatacloud"
    assert first.structured_content["url"].startswith(f"{BASE}/uploads/")
    assert second.structured_content["reused"] is True and len(fake.uploads) == 1


async def test_upload_goes_to_the_platform_host_by_default(make_settings, fake, workspace):
    settings = make_settings(ACEDATACLOUD_API_TOKEN=ACE_TOKEN, ACEDATACLOUD_PLATFORM_TOKEN=PLATFORM_TOKEN)
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "a.png", "provider": "acedatacloud"})
    assert not result.is_error, text_of(result)
    assert fake.requests == ["POST /api/v1/files/"] and fake.hosts == ["platform.acedata.cloud"]


async def test_upload_media_without_platform_token_is_refused_without_a_request(settings, fake, workspace):
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "a.png"})
    assert result.is_error and "AceDataCloud cannot upload images" in text_of(result)
    assert "set ACEDATACLOUD_PLATFORM_TOKEN" in text_of(result)
    assert fake.requests == []


async def test_providers_resource_shows_upload_only_with_the_platform_token(settings, upload_settings, fake):
    async def capabilities(s):
        async with connect(s, fake) as client:
            listing = await client.read_resource("flux://providers")
        providers = json.loads(listing.contents[0].text)["providers"]
        return next(p for p in providers if p["id"] == "acedatacloud")["capabilities"]

    assert (await capabilities(settings))["upload"] is False
    assert (await capabilities(settings))["local_image_input"] == "url only"
    assert (await capabilities(upload_settings))["upload"] is True


async def test_rejected_platform_token_names_its_variable(upload_settings, fake, workspace):
    fake.platform_token = "another-token"
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(upload_settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "a.png"})
        edit = await client.call_tool("edit_image", {"prompt": "x", "image": "a.png"})
    assert result.is_error and "ACEDATACLOUD_PLATFORM_TOKEN" in text_of(result)
    assert "HTTP 401" in text_of(result)
    assert edit.is_error and "ACEDATACLOUD_PLATFORM_TOKEN" in text_of(edit)
    assert fake.ledger == [] and fake.requests.count("POST /api/v1/files/") == 2
    assert_clean(result)


# --- failed and odd tasks --------------------------------------------------------------------------


async def test_failed_task_is_an_error_result_with_the_providers_reason(settings, fake):
    fake.outcome = "fail"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        again = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert result.structured_content["error"] == "The prompt was flagged by content moderation. (bad_request)"
    assert "failed: The prompt was flagged" in text_of(result)
    assert again.is_error and again.structured_content == result.structured_content
    assert len(fake.ledger) == 1 and fake.requests.count("POST /flux/images") == 1


async def test_synchronous_failure_is_journaled_as_a_failed_prediction(settings, fake):
    fake.sync, fake.outcome = True, "fail"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "flagged by content moderation" in result.structured_content["error"]
    assert result.structured_content["prediction_id"] == f"acedatacloud:{next(iter(fake.tasks))}"


async def test_success_without_an_image_is_a_failure(settings, fake):
    fake.outcome = "empty"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "succeeded but returned no image" in result.structured_content["error"]


async def test_empty_task_record_right_after_submit_counts_as_pending(settings, fake):
    fake.forget = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        result = await client.call_tool("check_prediction",
                                        {"prediction_id": pending.structured_content["prediction_id"]})
    assert not result.is_error, text_of(result)
    assert result.structured_content["status"] == "starting"
    assert fake.requests == ["POST /flux/images", "POST /flux/tasks"]


async def test_empty_task_record_after_the_grace_period_is_reported_as_not_found(settings, fake, monkeypatch):
    monkeypatch.setattr(acedatacloud, "_NOT_FOUND_GRACE", 0.0)
    fake.forget = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        result = await client.call_tool("check_prediction",
                                        {"prediction_id": pending.structured_content["prediction_id"]})
    assert result.structured_content["status"] == "starting"  # the journal keeps the job and its id
    assert "The status check failed" in text_of(result) and "does not know task" in text_of(result)
    assert "start a new job" in text_of(result)
    assert len(fake.ledger) == 1


async def test_unknown_task_state_word_is_not_guessed(settings, fake, monkeypatch):
    fake.hold = True

    def weird(task, request):
        return {"id": task.id, "created_at": 1.0, "request": {}, "response": {"state": "hibernating"}}

    monkeypatch.setattr(fake, "_record", weird)
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        result = await client.call_tool("check_prediction",
                                        {"prediction_id": pending.structured_content["prediction_id"]})
    assert result.structured_content["status"] == "starting"
    assert "unknown task state 'hibernating'" in text_of(result)


@pytest.mark.parametrize(("word", "status"), [("succeeded", "succeeded"), ("completed", "succeeded"),
                                               ("failed", "failed"), ("cancelled", "canceled")])
async def test_generic_state_words_are_honoured(settings, fake, monkeypatch, word, status):
    def with_word(task, request):
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        return {"id": task.id, "created_at": 1.0, "request": {}, "state": word,
                "response": {"data": [{"image_url": f"{base}/files/x.png"}],
                             "error": {"code": "api_error", "message": "upstream gave up"}}}

    monkeypatch.setattr(fake, "_record", with_word)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == status, text_of(result)
    if status != "succeeded":
        assert result.is_error and "upstream gave up (api_error)" in result.structured_content["error"]


# --- provider errors -------------------------------------------------------------------------------


async def test_token_echoed_by_the_provider_never_reaches_the_result(upload_settings, fake):
    echo = envelope("used_up", f"token {ACE_TOKEN} / {PLATFORM_TOKEN} is used up")
    fake.submit_errors.append((403, echo, {}))
    async with connect(upload_settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "used up" in text_of(result)
    assert_clean(result)


async def test_rate_limited_status_check_keeps_the_job_pending_and_says_so(settings, fake):
    fake.hold = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        fake.poll_errors += [(429, envelope("too_many_requests", "slow down"), {"retry-after": "0"})] * 3
        result = await client.call_tool("check_prediction",
                                        {"prediction_id": pending.structured_content["prediction_id"]})
    assert result.structured_content["status"] == "starting"
    assert "the job keeps running. Call check_prediction" in text_of(result)
    assert len(fake.ledger) == 1


