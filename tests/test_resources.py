"""The resources a client reads: flux://providers, flux://predictions/{id}, flux://images/{id}/{n}."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from PIL import Image

from tests.conftest import connect, text_of
from tests.fakes.segmind import SegmindFake

pytestmark = pytest.mark.anyio
SEGMIND_KEY = "SG_5e9c4a7b1d3f8e20"


def blob_of(result) -> bytes:
    return base64.b64decode(result.contents[0].blob)


async def test_prediction_and_image_resources(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        # The text names each image's resource URI (no resource_link blocks: see the next test).
        uri = f"flux://images/{pid}/0"
        assert uri in text_of(result)
        prediction = await client.read_resource(f"flux://predictions/{pid}")
        image = await client.read_resource(uri)
        providers = await client.read_resource("flux://providers")
    assert json.loads(prediction.contents[0].text) == result.structured_content
    assert image.contents[0].blob
    listed = json.loads(providers.contents[0].text)
    assert listed["default"] == "atlascloud"
    assert {p["id"] for p in listed["providers"]} >= {"atlascloud", "segmind", "placeholder"}


async def test_results_carry_no_resource_links_that_clients_would_send_as_image_urls(settings, fake):
    # langchain-mcp-adapters turns an image/* resource_link into an image block whose URL (flux://...) model
    # APIs refuse: a finished result carries the text, the preview and structuredContent, nothing else.
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert result.structured_content["status"] == "succeeded"
    assert [b.type for b in result.content] == ["text", "image", "image"]


async def test_a_png_is_served_as_image_png(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        image = await client.read_resource(f"flux://images/{result.structured_content['prediction_id']}/0")
    assert image.contents[0].mime_type == "image/png"
    assert Image.open(io.BytesIO(blob_of(image))).format == "PNG"


async def test_a_jpeg_is_served_as_image_jpeg(make_settings):
    settings = make_settings(SEGMIND_API_KEY=SEGMIND_KEY, SEGMIND_BASE_URL="http://segmind.test")
    async with connect(settings, SegmindFake(key=SEGMIND_KEY)) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "provider": "segmind"})
        assert result.structured_content["images"][0]["mime_type"] == "image/jpeg"
        image = await client.read_resource(f"flux://images/{result.structured_content['prediction_id']}/0")
    assert image.contents[0].mime_type == "image/jpeg"
    assert Image.open(io.BytesIO(blob_of(image))).format == "JPEG"


async def test_a_save_to_webp_copy_is_served_as_image_webp(settings, fake, workspace):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "hero.webp"})
        image = await client.read_resource(f"flux://images/{result.structured_content['prediction_id']}/0")
    assert image.contents[0].mime_type == "image/webp"
    assert blob_of(image) == (workspace / "hero.webp").read_bytes()


async def test_resources_keep_their_uris_and_names(settings, fake):
    async with connect(settings, fake) as client:
        static = {(str(r.uri), r.name) for r in (await client.list_resources()).resources}
        templates = {(t.uri_template, t.name) for t in (await client.list_resource_templates()).resource_templates}
    assert static == {("flux://providers", "providers"), ("ui://flux-mcp/app", "gallery-app")}
    assert templates == {("flux://predictions/{prediction_id}", "prediction"),
                         ("flux://images/{prediction_id}/{index}", "image"),
                         ("flux://thumbnails/{prediction_id}/{index}", "thumbnail"),
                         ("flux://history{?before,query,provider,status,since,limit}", "history")}


@pytest.mark.parametrize("uri", [
    "flux://predictions/atlascloud:no-such-job",
    "flux://images/atlascloud:no-such-job/0",
])
async def test_an_unknown_id_is_not_found_without_a_traceback(settings, fake, uri, caplog):
    caplog.set_level(logging.DEBUG)
    async with connect(settings, fake) as client:
        with anyio.fail_after(5), pytest.raises(MCPError) as raised:
            await client.read_resource(uri)
    assert raised.value.code == INVALID_PARAMS  # -32602: the SDK's resource-not-found
    assert "no-such-job" in raised.value.message and "Error creating resource" not in raised.value.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


async def test_an_image_index_past_the_last_image_is_not_found(settings, fake, caplog):
    caplog.set_level(logging.DEBUG)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        for index in ("1", "x"):
            with pytest.raises(MCPError) as raised:
                await client.read_resource(f"flux://images/{pid}/{index}")
            assert raised.value.code == INVALID_PARAMS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


async def test_an_image_gone_from_disk_is_not_found_and_names_check_prediction(settings, fake, caplog):
    caplog.set_level(logging.DEBUG)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        pid = result.structured_content["prediction_id"]
        Path(result.structured_content["images"][0]["path"]).unlink()
        with pytest.raises(MCPError) as raised:
            await client.read_resource(f"flux://images/{pid}/0")
    assert raised.value.code == INVALID_PARAMS and "check_prediction" in raised.value.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


async def test_a_prediction_is_readable_from_a_restarted_server(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    pid = result.structured_content["prediction_id"]
    async with connect(settings, fake) as client:
        prediction = await client.read_resource(f"flux://predictions/{pid}")
        image = await client.read_resource(f"flux://images/{pid}/0")
    assert json.loads(prediction.contents[0].text)["prediction_id"] == pid
    assert image.contents[0].mime_type == "image/png"
