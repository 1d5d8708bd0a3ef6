"""Atlas Cloud's sync mode: a schnell job answered on its own submit, images inline (one request).

The server holds the submit open (`enable_sync_mode`) with the images in the answer
(`enable_base64_output`) for models documented to allow it, when their jobs are short next to the
call's wait; everything else is polled as before. These tests check what a user sees either way.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from PIL import Image

from flux_mcp import jobs
from flux_mcp.journal import Record, open_journal
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio
SCHNELL = "black-forest-labs/flux-schnell"


class Gate(AtlasFake):
    """A fake whose sync-mode answers wait for the test to open the gate."""

    def __init__(self, **kw):
        super().__init__(key=ATLAS_KEY, **kw)
        self.gate = anyio.Event()
        self.waiting = 0

    async def _sync_wait(self, job):
        self.waiting += 1
        await self.gate.wait()
        job.done = True


async def test_a_schnell_job_is_one_request_with_the_image_inline(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a red fox", "seed": 3})
    data = result.structured_content
    assert data["status"] == "succeeded", text_of(result)
    assert fake.requests == ["POST /api/v1/model/generateImage"]
    body = fake.ledger[0]
    assert body["enable_sync_mode"] is True and body["enable_base64_output"] is True
    [image] = data["images"]
    assert image["url"] is None and Path(image["path"]).is_relative_to(home)
    with Image.open(image["path"]) as im:
        assert im.size == (64, 64) and im.info["prediction_id"] == data["prediction_id"]
        assert im.info["prompt"] == "a red fox"
    assert "provider URL" not in text_of(result) and image["path"] in text_of(result)
    assert data["cost_usd"] == pytest.approx(0.003)


@pytest.mark.parametrize("style", ["raw", "data_uri"])
async def test_both_base64_spellings_give_the_image(settings, fake, style):
    fake.base64_style = style
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    images = result.structured_content["images"]
    assert len(images) == 2 and all(Path(i["path"]).is_file() for i in images)
    assert len(fake.requests) == 1


async def test_a_sync_wait_that_ends_early_is_polled_to_the_end(settings):
    class EarlyAnswer(AtlasFake):
        async def _sync_wait(self, job):
            pass  # Atlas's side stops waiting at once: the answer says "created", polls follow

    fake = EarlyAnswer(key=ATLAS_KEY, polls_to_complete=2)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert Path(result.structured_content["images"][0]["path"]).is_file()
    assert fake.ledger[0]["enable_sync_mode"] is True and len(fake.ledger) == 1
    assert fake.requests.count("POST /api/v1/model/generateImage") == 1
    assert fake.requests.count(f"GET /api/v1/model/prediction/{next(iter(fake.jobs))}") == 2


async def test_a_held_job_that_fails_reports_the_reason_and_keeps_its_id(settings, fake):
    fake.outcome = "fail"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": result.structured_content["prediction_id"]})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "NSFW content detected in prompt" in text_of(result)
    assert "may or may not have started" not in text_of(result)
    assert again.structured_content["status"] == "failed"
    assert len(fake.ledger) == 1 and fake.requests.count("POST /api/v1/model/generateImage") == 1


async def test_sync_mode_off_polls_every_model(make_settings, fake):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             ATLASCLOUD_SYNC_MODE="off")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded"
    assert "enable_sync_mode" not in fake.ledger[0]
    assert "GET /api/v1/model/prediction/" in " ".join(fake.requests)


@pytest.mark.parametrize(("args", "why"), [
    ({"model": "black-forest-labs/flux-dev"}, "sync mode is documented for schnell only"),
    ({"wait_seconds": 5}, "a short wait wants the id back at once"),
])
async def test_other_models_and_short_waits_are_polled(settings, fake, args, why):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", **args})
    assert not result.is_error, text_of(result)
    assert "enable_sync_mode" not in fake.ledger[0], why


async def test_a_model_whose_jobs_run_long_is_polled(settings, home):
    # The journal has seen this model's jobs take 20 s: a request held that long is not worth its risk.
    journal = open_journal(home)
    now = time.time()
    for i in range(3):
        await journal.put(Record(id=f"atlascloud:old{i}", provider="atlascloud", native_id=f"old{i}", model=SCHNELL,
                           kind="generate", status="succeeded", request={}, created_at=now - 100 - 20,
                           completed_at=now - 100))
    await journal.close()
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "generate_image", {"prompt": "p"})
            while not fake.ledger:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # what was sent is all this test needs
    assert "enable_sync_mode" not in fake.ledger[0] and fake.ledger[0]["enable_base64_output"] is False


async def test_the_journal_learns_a_held_jobs_length_from_the_moment_it_was_sent(settings, home):
    fake = AtlasFake(key=ATLAS_KEY, duration=0.3)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded" and len(fake.requests) == 1
    journal = open_journal(home)
    record = await journal.get(result.structured_content["prediction_id"])
    await journal.close()
    assert record is not None and record.completed_at is not None
    assert record.completed_at - record.created_at >= 0.3


async def test_a_cancelled_call_still_keeps_the_held_jobs_image(settings, home):
    fake = Gate()
    async with connect(settings, fake) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "generate_image", {"prompt": "p"})
            while not fake.waiting:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # the client gives up while the paid request is out...
            fake.gate.set()  # ...and then the job finishes
        # In memory the server's handler runs in the cancelled task: leaving the group means it has returned.
        assert len(list((home / "images").rglob("*.png"))) == 1
        [job_id] = fake.jobs
        done = await client.call_tool("check_prediction", {"prediction_id": f"atlascloud:{job_id}"})
    assert done.structured_content["status"] == "succeeded"
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    assert fake.requests == ["POST /api/v1/model/generateImage"]  # answered from the journal and the disk


async def test_a_lost_inline_image_is_fetched_again_from_the_provider(settings, fake):
    async with connect(settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p"})
        path = Path(first.structured_content["images"][0]["path"])
        path.unlink()
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": first.structured_content["prediction_id"]})
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert Path(again.structured_content["images"][0]["path"]).is_file()
    assert fake.requests[-1].startswith("GET /api/v1/model/prediction/") and len(fake.ledger) == 1


async def test_when_every_held_slot_is_busy_the_next_job_is_polled(settings, monkeypatch):
    monkeypatch.setattr(jobs, "HELD_REQUESTS", 1)
    fake = Gate()
    async with connect(settings, fake) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "generate_image", {"prompt": "held"})
            while not fake.waiting:
                await anyio.sleep(0.01)
            second = await client.call_tool("generate_image", {"prompt": "polled"})
            fake.gate.set()
    assert second.structured_content["status"] == "succeeded"
    held, polled = fake.ledger
    assert held["enable_sync_mode"] is True and "enable_sync_mode" not in polled


async def test_a_full_disk_while_keeping_an_inline_image_is_reported_and_the_job_kept(settings, fake,
                                                                                         monkeypatch):
    from flux_mcp.store import FolderStore

    real_keep = FolderStore.put

    async def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FolderStore, "put", full_disk)
    async with connect(settings, fake) as client:
        failed = await client.call_tool("generate_image", {"prompt": "p"})
        monkeypatch.setattr(FolderStore, "put", real_keep)
        [job_id] = fake.jobs
        again = await client.call_tool("check_prediction", {"prediction_id": f"atlascloud:{job_id}"})
    assert "No space left on device" in text_of(failed) and "check_prediction" in text_of(failed)
    assert failed.structured_content["prediction_id"] == f"atlascloud:{job_id}"
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert Path(again.structured_content["images"][0]["path"]).is_file()
    assert len(fake.ledger) == 1
