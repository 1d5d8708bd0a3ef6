"""The four tools against the Atlas Cloud fake, through an in-memory MCP client: what is specific to Atlas
Cloud (the checks every provider meets are in tests/contract)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import anyio
import pytest
from PIL import Image

from tests.conftest import ATLAS_BASE, connect, text_of
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
BASE = ATLAS_BASE


async def test_generate_image_returns_file_preview_and_structured_result(settings, fake, home):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert data["provider"] == "atlascloud" and data["model"] == "black-forest-labs/flux-schnell"
    assert data["status"] == "succeeded" and data["prediction_id"].startswith("atlascloud:pred_")
    [image] = data["images"]
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(home)
    assert (image["width"], image["height"], image["mime_type"]) == (64, 64, "image/png")
    with Image.open(path) as im:
        assert im.info["prediction_id"] == data["prediction_id"]
    previews = [b for b in result.content if b.type == "image"]
    assert len(previews) == 1
    with Image.open(io.BytesIO(base64.b64decode(previews[0].data))) as im:
        assert im.size == (64, 64)
    assert str(path) in text_of(result)
    assert fake.ledger[0]["size"] == "1024*1024" and fake.ledger[0]["prompt"] == "a lighthouse at dusk"
    assert len(fake.ledger) == 1


async def test_polled_generation_keeps_the_provider_url_too(polled_settings, fake, home):
    async with connect(polled_settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    [image] = result.structured_content["images"]
    assert image["url"].startswith(f"{BASE}/files/") and image["url"] in text_of(result)
    assert Path(image["path"]).is_file() and str(image["path"]) in text_of(result)
    assert fake.ledger[0]["enable_base64_output"] is False and "enable_sync_mode" not in fake.ledger[0]
    assert [r.split()[0] for r in fake.requests] == ["POST", "GET", "GET"]


async def test_generate_sends_model_specific_fields_only(settings, fake):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "p", "model": "black-forest-labs/flux-dev",
                                                  "steps": 30, "guidance_scale": 4.5, "width": 768,
                                                  "height": 512, "seed": 7, "num_images": 2})
    body = fake.ledger[0]
    assert body["num_inference_steps"] == 30 and body["guidance_scale"] == 4.5
    assert body["size"] == "768*512" and body["seed"] == 7 and body["num_images"] == 2


@pytest.mark.parametrize("output_style", ["strings", "objects", "base64"])
@pytest.mark.parametrize("id_style", ["data.id", "id", "predictionId"])
async def test_every_documented_answer_variant_gives_images(settings, fake, output_style, id_style):
    fake.output_style, fake.id_style = output_style, id_style
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    data = result.structured_content
    assert data["status"] == "succeeded", text_of(result)
    assert len(data["images"]) == 2 and all(Path(i["path"]).is_file() for i in data["images"])


async def test_completed_job_without_outputs_is_a_content_filter_failure(settings, fake):
    fake.outcome = "nsfw"
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and result.structured_content["status"] == "failed"
    assert "content-safety filter" in result.structured_content["error"]


async def test_pending_job_comes_back_with_its_id_and_check_prediction_gets_the_images(settings, fake):
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
    assert len(fake.ledger) == 1


async def test_progress_notifications_flow_while_waiting(polled_settings, fake):
    settings = polled_settings
    fake.polls_to_complete = 3
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"}, progress_callback=on_progress)
    assert result.structured_content["status"] == "succeeded"
    assert len(seen) >= 2 and all(total == 45 for _, total, _ in seen)
    assert any("atlascloud: processing" in (message or "") for _, _, message in seen)
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


async def test_cancelled_call_keeps_the_job(settings, fake, home):
    fake.hold = True
    async with connect(settings, fake) as client:
        with anyio.move_on_after(0.5):
            await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 60})
        [job_id] = fake.jobs
        fake.finish(job_id)
        done = await client.call_tool("check_prediction", {"prediction_id": f"atlascloud:{job_id}"})
    assert done.structured_content["status"] == "succeeded"
    assert len(fake.ledger) == 1


async def test_edit_with_url_uses_kontext_and_passes_the_url(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it night",
                                                       "image": "https://example.com/cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger[0]["model"] == "black-forest-labs/flux-kontext-dev"
    assert fake.ledger[0]["image"] == "https://example.com/cat.png"


async def test_edit_with_local_file_uploads_it_first(settings, fake, workspace):
    (workspace / "cat.png").write_bytes(png_bytes(32, 32))
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "add a hat", "image": "cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    [name] = fake.uploads
    assert fake.ledger[0]["image"] == f"{BASE}/uploads/{name}"


async def test_edit_with_data_uri_uploads_its_bytes(settings, fake):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(16, 16)).decode()
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "x", "image": uri})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert list(fake.uploads.values()) == [png_bytes(16, 16)]


async def test_upload_media_returns_url_and_reuses_it_for_the_same_file(settings, fake, workspace):
    (workspace / "a.png").write_bytes(png_bytes(8, 8))
    async with connect(settings, fake) as client:
        first = await client.call_tool("upload_media", {"path": "a.png"})
        second = await client.call_tool("upload_media", {"path": str(workspace / "a.png")})
    assert not first.is_error, text_of(first)
    assert first.structured_content["url"].startswith(f"{BASE}/uploads/")
    assert first.structured_content["reused"] is False and second.structured_content["reused"] is True
    assert second.structured_content["url"] == first.structured_content["url"]
    assert len(fake.uploads) == 1


async def test_upload_media_refuses_files_outside_the_workspace(settings, fake, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": str(outside)})
    assert result.is_error and "outside the allowed folders" in text_of(result)
    assert fake.uploads == {}


async def test_save_to_writes_into_the_workspace_and_never_overwrites_unasked(settings, fake, workspace):
    async with connect(settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/hero.webp"})
        second = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/hero.webp"})
        third = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/hero.webp",
                                                          "overwrite": True})
    target = workspace / "public" / "hero.webp"
    assert first.structured_content["images"][0]["path"] == str(target)
    with Image.open(target) as im:
        assert im.format == "WEBP"
    assert "public/hero.webp" in text_of(first)
    assert second.is_error and "already exists" in text_of(second)
    assert not third.is_error
    assert len(fake.ledger) == 2  # the refused call never reached the provider


async def test_unknown_and_hostile_prediction_ids_are_refused(settings, fake):
    async with connect(settings, fake) as client:
        unknown = await client.call_tool("check_prediction", {"prediction_id": "atlascloud:pred_nope"})
        hostile = [await client.call_tool("check_prediction", {"prediction_id": pid})
                   for pid in ("atlascloud:../../etc", "atlascloud:a?b", "atlascloud:x\r\ny", "http://evil/x")]
    assert unknown.is_error and "No prediction" in text_of(unknown)
    assert all(r.is_error and "is not a prediction id" in text_of(r) for r in hostile)
    assert fake.requests == []


