"""The tools against the ImagePipeline generate/v3 fake, through an in-memory MCP client."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import connect, text_of
from tests.fakes.imagepipeline import ImagePipelineFake

pytestmark = pytest.mark.anyio
BASE = "http://imagepipeline.test"
IP_KEY = "ip_live_canary-5b8e2d71c04f9a36e1d7"
"""A unique canary: it must never appear in any tool result."""
SUBMIT = "POST /generate/v3"
STATUS = "GET /generate/v3/status/"


@pytest.fixture
def fake() -> ImagePipelineFake:
    return ImagePipelineFake(key=IP_KEY)


@pytest.fixture
def settings(make_settings):
    return make_settings(IMAGEPIPELINE_API_KEY=IP_KEY, IMAGEPIPELINE_BASE_URL=BASE)


def _native(prediction_id: str) -> str:
    return prediction_id.split(":", 1)[1]


# --- generating ---------------------------------------------------------------------------------


async def test_generate_image_saves_the_file_and_returns_a_structured_result(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a toucan on a branch"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert data["provider"] == "imagepipeline" and data["model"] == "flux-schnell"
    assert data["status"] == "succeeded" and data["error"] is None
    assert re.fullmatch(r"imagepipeline:[0-9a-f]{32}", data["prediction_id"])
    [image] = data["images"]
    assert image["url"].startswith(f"{BASE}/files/")
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(home)
    assert (image["width"], image["height"], image["mime_type"]) == (64, 64, "image/png")
    with Image.open(path) as im:
        assert im.info["prediction_id"] == data["prediction_id"]
    assert str(path) in text_of(result) and image["url"] in text_of(result)
    assert [b.type for b in result.content].count("image") == 1
    assert fake.ledger == [{"prompt": "a toucan on a branch", "samples": 1, "width": 1024, "height": 1024,
                            "seed": -1}]
    assert fake.count(SUBMIT) == 1 and fake.count(STATUS) == 0
    assert IP_KEY not in text_of(result)


async def test_submit_sends_the_key_in_both_documented_headers(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p"})
    [headers] = fake.headers
    assert headers["api-key"] == IP_KEY and headers["x-api-key"] == IP_KEY


async def test_arguments_map_to_samples_steps_seed_and_size(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 3, "steps": 30,
                                                           "seed": 7, "width": 768, "height": 1536})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert len(result.structured_content["images"]) == 3
    assert all(Path(i["path"]).is_file() for i in result.structured_content["images"])
    assert fake.ledger == [{"prompt": "p", "samples": 3, "num_inference_steps": 30, "seed": 7, "width": 768,
                            "height": 1536}]


async def test_server_id_setting_is_sent_with_every_job(make_settings, fake):
    settings = make_settings(IMAGEPIPELINE_API_KEY=IP_KEY, IMAGEPIPELINE_BASE_URL=BASE,
                             IMAGEPIPELINE_SERVER_ID="srv-flux-42")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert not result.is_error, text_of(result)
    assert fake.ledger[0]["server_id"] == "srv-flux-42"


async def test_success_answer_with_an_id_keeps_the_providers_id(settings, fake):
    fake.success_id = True
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    [job_id] = fake.jobs
    assert result.structured_content["prediction_id"] == f"imagepipeline:{job_id}"
    assert result.structured_content["status"] == "succeeded"


async def test_check_prediction_of_an_immediate_result_answers_the_same_also_after_restart(settings, fake):
    async with connect(settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
        pid = first.structured_content["prediction_id"]
        same = await client.call_tool("check_prediction", {"prediction_id": pid})
    async with connect(settings, fake) as client:  # a new server over the same data folder
        restarted = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert first.structured_content["status"] == "succeeded"
    assert same.structured_content == first.structured_content
    assert restarted.structured_content == first.structured_content
    assert not restarted.is_error and pid in text_of(restarted)
    assert fake.count(SUBMIT) == 1 and fake.count(STATUS) == 0  # a made-up id is never asked about


async def test_pending_answer_is_polled_until_success(settings, fake):
    fake.answer, fake.polls_to_complete = "pending", 2
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    [job_id] = fake.jobs
    data = result.structured_content
    assert data["status"] == "succeeded", text_of(result)
    assert data["prediction_id"] == f"imagepipeline:{job_id}"
    assert len(data["images"]) == 2 and all(Path(i["path"]).is_file() for i in data["images"])
    assert fake.count(SUBMIT) == 1 and fake.count(f"{STATUS}{job_id}") == 2


async def test_held_job_returns_pending_and_check_prediction_gets_it_also_after_restart(settings, fake):
    fake.answer, fake.hold = "pending", True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        assert not pending.is_error and pending.structured_content["status"] == "starting"
        assert f'check_prediction with prediction_id="{pid}"' in text_of(pending)
        still = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
        assert still.structured_content["status"] == "processing" and not still.is_error
    fake.finish(_native(pid))
    async with connect(settings, fake) as client:  # after a restart
        done = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 5})
        again = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    assert again.structured_content == done.structured_content
    assert fake.count(SUBMIT) == 1 and len(fake.ledger) == 1


# --- failed jobs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("word", "field"),
                         [("FAILURE", "message"), ("FAILED", "error"), ("FAILURE", "detail")])
async def test_failed_job_after_polling_is_an_error_result_with_the_reason(settings, fake, word, field):
    fake.answer, fake.outcome, fake.failure_field = "pending", word, field
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "CUDA out of memory on the dedicated server" in result.structured_content["error"]
    assert "failed: CUDA out of memory" in text_of(result)
    assert fake.count(SUBMIT) == 1 and len(fake.ledger) == 1


async def test_immediate_failure_answer_is_a_failed_prediction_that_check_prediction_repeats(settings, fake):
    fake.outcome, fake.failure_message = "FAILURE", "prompt rejected by the safety checker"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        again = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "prompt rejected by the safety checker" in text_of(result)
    assert again.is_error and again.structured_content == result.structured_content
    assert fake.count(SUBMIT) == 1 and fake.count(STATUS) == 0


async def test_failure_mentioning_the_server_says_to_set_the_server_id(settings, fake):
    fake.outcome, fake.failure_message = "FAILED", "no dedicated server available for this account"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "set IMAGEPIPELINE_SERVER_ID" in text_of(result)


async def test_success_without_download_urls_is_a_failure_not_a_success(settings, fake):
    fake.submit_errors.append((200, {"status": "SUCCESS", "download_urls": []}, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "returned no image" in result.structured_content["error"]
    assert result.structured_content["images"] == []
    assert fake.count(SUBMIT) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "QUEUED", "id": "job_1"}, "unknown status 'QUEUED' for job job_1"),
        ({"download_urls": ["http://imagepipeline.test/files/x.png"]}, "unknown status 'none'"),
        ({"status": "PENDING"}, "gave no usable id"),
        ("<html>gateway</html>", "no readable job status"),
    ],
)
async def test_unreadable_submit_answer_is_an_error_and_is_never_resent(settings, fake, body, expected):
    fake.submit_errors.append((200, body, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and expected in text_of(result)
    assert "did not resend it" in text_of(result)
    assert fake.count(SUBMIT) == 1


async def test_unknown_status_on_poll_is_reported_not_guessed(settings, fake):
    fake.answer, fake.hold = "pending", True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        fake.poll_errors.append((200, {"status": "DONE", "id": _native(pid)}, {}))
        checked = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
    assert checked.structured_content["status"] == "starting"
    assert "unknown status 'DONE'" in text_of(checked)
    assert checked.structured_content["images"] == []


# --- error answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (401, {"error": "Unauthorized", "error_code": "UNAUTHORIZED", "message": "Invalid API key"}, {},
         "refused the API key in IMAGEPIPELINE_API_KEY"),
        (402, {"error": "Payment Required", "error_code": "INSUFFICIENT_BALANCE",
               "message": "Balance is $0.00"}, {}, "Top up at imagepipeline.io"),
        (400, {"error": "Bad Request", "error_code": "INSUFFICIENT_BALANCE", "message": "Not enough credit"},
         {}, "INSUFFICIENT_BALANCE: Not enough credit). Top up"),
        (400, {"error": "Bad Request", "error_code": "INVALID_PARAMETERS", "message": "samples too high"},
         {}, "HTTP 400: INVALID_PARAMETERS: samples too high). Adjust the arguments"),
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "field required",
                           "type": "value_error.missing"}]}, {}, "HTTP 422: prompt: field required"),
        (429, {"error": "Too Many Requests", "error_code": "RATE_LIMIT_EXCEEDED", "message": "slow down"},
         {"retry-after": "7"}, "Try again in 7 seconds"),
        (500, {"error": "Internal Server Error", "error_code": "INTERNAL_ERROR", "message": "boom"}, {},
         "may or may not have started the job"),
        (503, "<html><body>Service Unavailable</body></html>", {"content-type": "text/html"},
         "HTTP 503 (an HTML error page)"),
    ],
)
async def test_error_answers_to_submit_are_clear_and_never_resent(settings, fake, status, body, headers,
                                                                  expected):
    fake.submit_errors.append((status, body, headers))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and expected in text_of(result)
    assert fake.count(SUBMIT) == 1 and fake.ledger == []
    assert IP_KEY not in text_of(result)


async def test_rejection_mentioning_the_server_says_to_set_the_server_id(settings, fake):
    fake.submit_errors.append((400, {"error": "Bad Request", "error_code": "INVALID_PARAMETERS",
                                     "message": "server_id is required for Flux"}, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "set IMAGEPIPELINE_SERVER_ID" in text_of(result)


async def test_key_echoed_by_the_provider_never_reaches_the_result(settings, fake):
    fake.submit_errors.append((403, {"error": "Forbidden", "message": f"key {IP_KEY} has no v3 access"}, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "denied access" in text_of(result)
    assert IP_KEY not in text_of(result) and IP_KEY[:14] not in text_of(result)


async def test_wrong_key_reaches_the_real_check_and_names_the_variable(make_settings, fake):
    settings = make_settings(IMAGEPIPELINE_API_KEY="ip_live_wrong-key-000000000", IMAGEPIPELINE_BASE_URL=BASE)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "IMAGEPIPELINE_API_KEY" in text_of(result)
    assert "wrong-key" not in text_of(result)
    assert fake.ledger == [] and fake.count(SUBMIT) == 1


async def test_transient_status_errors_are_retried(settings, fake):
    fake.answer = "pending"
    fake.poll_errors += [(503, {"error": "busy", "message": "try later"}, {"retry-after": "0"}),
                         (502, "bad gateway", {})]
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.count(SUBMIT) == 1


async def test_check_prediction_of_a_job_the_provider_forgot_says_so(settings, fake):
    fake.answer, fake.hold = "pending", True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        fake.jobs.clear()
        gone = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
    # The service keeps the job and its id, and passes the reason on.
    assert gone.structured_content["status"] == "starting"
    assert f"has no job {_native(pid)}" in text_of(gone) and "Start a new job" in text_of(gone)
    assert fake.count(SUBMIT) == 1


async def test_status_check_refused_for_a_revoked_key_names_the_variable(settings, fake):
    fake.answer, fake.hold = "pending", True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        fake.poll_errors.append((401, {"error": "Unauthorized", "message": "API key revoked"}, {}))
        checked = await client.call_tool("check_prediction",
                                         {"prediction_id": pending.structured_content["prediction_id"]})
    assert checked.structured_content["status"] == "starting"
    assert "refused the API key in IMAGEPIPELINE_API_KEY" in text_of(checked)
    assert fake.count(SUBMIT) == 1 and fake.count(STATUS) == 1  # a 401 is not retried


# --- refusals before any request ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"width": 2048},
         "width=2048 is out of range for imagepipeline model flux-schnell: allowed 256 to 1536"),
        ({"height": 128}, "height=128 is out of range"),
        ({"num_images": 5}, "num_images=5 is too many for imagepipeline model flux-schnell: allowed 1 to 4"),
        ({"steps": 60}, "steps=60 is out of range for imagepipeline model flux-schnell: allowed 1 to 50"),
        ({"guidance_scale": 3.5}, "guidance_scale is not a setting of imagepipeline model flux-schnell"),
        ({"model": "flux-dev"},
         "Unknown model 'flux-dev' for imagepipeline. Known generate models: flux-schnell"),
    ],
)
async def test_out_of_range_arguments_are_refused_before_any_request(settings, fake, args, expected):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", **args})
    assert result.is_error and expected in text_of(result)
    assert fake.requests == []


async def test_edit_image_is_refused_and_names_the_providers_that_can_edit(make_settings, fake):
    settings = make_settings(IMAGEPIPELINE_API_KEY=IP_KEY, IMAGEPIPELINE_BASE_URL=BASE,
                             ATLASCLOUD_API_KEY="atlas-dummy-key-for-naming", ATLASCLOUD_BASE_URL="http://atlas.test")
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it night", "provider": "imagepipeline",
                                                       "image": "https://example.com/cat.png"})
    assert result.is_error
    assert "ImagePipeline cannot edit images. Configured providers that can: atlascloud." in text_of(result)
    assert fake.requests == []


async def test_edit_image_with_no_editing_provider_configured_names_the_key_to_set(settings, fake, workspace):
    (workspace / "cat.png").write_bytes(b"not read")
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "x", "image": "cat.png"})
    assert result.is_error and "ImagePipeline cannot edit images" in text_of(result)
    assert "ATLASCLOUD_API_KEY" in text_of(result)
    assert fake.requests == []


async def test_upload_media_is_refused_with_the_reason(settings, fake, workspace):
    (workspace / "a.png").write_bytes(b"not read")
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "a.png", "provider": "imagepipeline"})
    assert result.is_error and "ImagePipeline cannot upload images" in text_of(result)
    assert fake.requests == []


async def test_missing_key_names_the_variable(make_settings, fake):
    async with connect(make_settings(), fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "provider": "imagepipeline"})
    assert result.is_error and "set IMAGEPIPELINE_API_KEY" in text_of(result)
    assert fake.requests == []
