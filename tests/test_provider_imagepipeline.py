"""The tools against the ImagePipeline generate/v3 fake, through an in-memory MCP client: what is specific
to ImagePipeline (the checks every provider meets are in tests/contract)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import connect, text_of
from tests.fakes.imagepipeline import ImagePipelineFake
from tests.fakes.wire import png_bytes

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


async def test_rejection_mentioning_the_server_says_to_set_the_server_id(settings, fake):
    fake.submit_errors.append((400, {"error": "Bad Request", "error_code": "INVALID_PARAMETERS",
                                     "message": "server_id is required for Flux"}, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "set IMAGEPIPELINE_SERVER_ID" in text_of(result)


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


# --- edits and uploads (the job API) ----------------------------------------------------------------

EDIT = "POST /edit/image/v1"
EDIT_STATUS = "GET /edit/image/v1/status/"
UPLOAD = "POST /upload/image/v1"
SOURCE = "https://example.com/cat.png"


def _job(prediction_id: str) -> str:
    """The job API's own id inside an edit's prediction id (`imagepipeline:edit:<job_id>`)."""
    native = _native(prediction_id)
    assert native.startswith("edit:"), prediction_id
    return native.removeprefix("edit:")


async def test_edit_image_runs_a_job_api_edit_polled_until_its_image_is_kept(settings, fake, home):
    fake.polls_to_complete = 2
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "give the toucan a hat", "image": SOURCE,
                                                       "seed": 5, "steps": 30, "guidance_scale": 4.5})
    data = result.structured_content
    assert not result.is_error and data["status"] == "succeeded", text_of(result)
    assert data["provider"] == "imagepipeline" and data["model"] == "edit/image/v1"
    job_id = _job(data["prediction_id"])
    assert re.fullmatch(r"job_[0-9a-f]{12}", job_id)
    assert fake.ledger == [{"prompt": "give the toucan a hat", "input_image": SOURCE, "width": 1024,
                            "height": 1024, "seed": 5, "num_inference_steps": 30, "guidance_scale": 4.5,
                            "endpoint": "/edit/image/v1"}]
    assert fake.count(EDIT) == 1 and fake.count(f"{EDIT_STATUS}{job_id}") == 2
    assert fake.count(SUBMIT) == 0 and fake.count(UPLOAD) == 0
    [image] = data["images"]
    assert image["url"] == f"{BASE}/files/{job_id}.webp" and image["mime_type"] == "image/webp"
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(home)
    assert data["cost_usd"] == 0.01  # the cost the status answer reports
    assert fake.headers and all(h["x-api-key"] == IP_KEY for h in fake.headers)  # submit and status checks
    assert IP_KEY not in text_of(result)


async def test_edit_of_a_local_file_uploads_it_once_and_edits_the_uploaded_url(settings, fake, workspace):
    (workspace / "cat.png").write_bytes(png_bytes(40, 30))
    async with connect(settings, fake) as client:
        first = await client.call_tool("edit_image", {"prompt": "add a hat", "image": "cat.png"})
        second = await client.call_tool("edit_image", {"prompt": "add a scarf", "image": "cat.png"})
    assert first.structured_content["status"] == "succeeded", text_of(first)
    assert second.structured_content["status"] == "succeeded", text_of(second)
    [uploaded] = fake.uploads
    assert fake.uploads[uploaded] == (png_bytes(40, 30), "image/png")
    assert fake.count(UPLOAD) == 1  # the same file is not uploaded again
    assert [job["input_image"] for job in fake.ledger] == [f"{BASE}/uploads/{uploaded}"] * 2


async def test_upload_media_returns_the_job_apis_permanent_url(settings, fake, workspace):
    (workspace / "logo.png").write_bytes(png_bytes(16, 16))
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "logo.png", "provider": "imagepipeline"})
    assert not result.is_error, text_of(result)
    [name] = fake.uploads
    assert result.structured_content["url"] == f"{BASE}/uploads/{name}" and name.endswith("logo.png")
    assert fake.ledger == []


async def test_held_edit_is_pending_and_check_prediction_asks_the_edit_status_after_restart(settings, fake):
    fake.hold = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE, "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        assert not pending.is_error and pending.structured_content["status"] == "starting", text_of(pending)
        still = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
    assert still.structured_content["status"] == "starting"  # queued at the first check
    fake.finish(_job(pid))
    async with connect(settings, fake) as client:  # after a restart
        done = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 5})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    assert fake.count(EDIT) == 1 and len(fake.ledger) == 1 and fake.count(STATUS) == 0


@pytest.mark.parametrize("retryable", [False, True])
async def test_failed_edit_is_an_error_with_the_reason_and_its_code(settings, fake, retryable):
    fake.job_outcome, fake.failure_code, fake.retryable = "failed", "INPUT_INVALID", retryable
    fake.failure_message = "input_image could not be downloaded"
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE})
    data = result.structured_content
    assert result.is_error and data["status"] == "failed"
    assert "input_image could not be downloaded" in data["error"]
    assert ("marks this failure as retryable" in data["error"]) is retryable
    assert fake.count(EDIT) == 1 and len(fake.ledger) == 1


async def test_cancelled_edit_is_reported_as_canceled(settings, fake):
    fake.job_outcome = "cancelled"
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE})
    assert result.structured_content["status"] == "canceled", text_of(result)
    assert "cancelled by the user" in result.structured_content["error"]


async def test_refused_edit_creates_no_job_and_says_what_was_wrong(settings, fake):
    refusal = {"detail": [{"loc": ["body", "input_image"], "msg": "not a reachable image", "type": "value_error"}]}
    fake.submit_errors.append((422, refusal, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE})
    assert result.is_error and "HTTP 422: input_image: not a reachable image" in text_of(result)
    assert "IMAGEPIPELINE_SERVER_ID" not in text_of(result)  # the v3 server hint is not about edits
    assert fake.count(EDIT) == 1 and fake.ledger == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"guidance_scale": 21}, ("guidance_scale=21 is out of range for imagepipeline model edit/image/v1: "
                                 "allowed 0 to 20")),
        ({"width": 4096}, "width=4096 is out of range for imagepipeline model edit/image/v1: allowed 256 to 2048"),
        ({"model": "flux-schnell"}, ("imagepipeline model flux-schnell does not support edit; edit models on "
                                    "imagepipeline: edit/image/v1. flux-schnell (edit) is served by: atlascloud.")),
    ],
)
async def test_edit_arguments_outside_the_documented_limits_are_refused_before_sending(settings, fake, args,
                                                                                       says):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE, **args})
    assert result.is_error and says in text_of(result), text_of(result)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"status": "queued"}, "no usable job id"),
        ({"job_id": "../../x", "status": "queued"}, "no usable job id"),
        ("<html>gateway</html>", "no usable job id"),
    ],
)
async def test_edit_answer_without_a_usable_job_id_is_an_error_and_is_never_resent(settings, fake, answer,
                                                                                  expected):
    fake.submit_errors.append((200, answer, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE})
    assert result.is_error and expected in text_of(result) and "did not resend it" in text_of(result)
    assert fake.count(EDIT) == 1


async def test_unknown_edit_status_is_reported_not_guessed(settings, fake):
    fake.hold = True
    async with connect(settings, fake) as client:
        pending = await client.call_tool("edit_image", {"prompt": "p", "image": SOURCE, "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        fake.poll_errors.append((200, {"job_id": _job(pid), "status": "finishing"}, {}))
        checked = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
    assert checked.structured_content["status"] == "starting"
    assert f"unknown status 'finishing' for job {_job(pid)}" in text_of(checked)
