"""The tools against the ImagePipeline generate/v3 fake, through an in-memory MCP client: what is specific
to ImagePipeline (the checks every provider meets are in tests/contract)."""

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
