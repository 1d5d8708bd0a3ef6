"""The offline provider: useful with no key at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_mcp.providers.placeholder import draw
from tests.conftest import connect, text_of

pytestmark = pytest.mark.anyio


def test_drawing_is_deterministic_in_prompt_seed_and_size():
    assert draw("a cat", 1, 128, 96) == draw("a cat", 1, 128, 96)
    assert draw("a cat", 1, 128, 96) != draw("a cat", 2, 128, 96)
    assert draw("a cat", 1, 128, 96) != draw("a dog", 1, 128, 96)


async def test_default_provider_without_keys_is_the_placeholder_and_says_so(make_settings):
    async with connect(make_settings()) as client:
        result = await client.call_tool("generate_image", {"prompt": "hero banner", "width": 320, "height": 200})
    data = result.structured_content
    assert data["provider"] == "placeholder" and data["status"] == "succeeded"
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (320, 200)
    assert "PLACEHOLDER" in text_of(result) and "ATLASCLOUD_API_KEY" in text_of(result)


async def test_placeholder_edits_a_local_image(make_settings, workspace):
    (workspace / "in.png").write_bytes(draw("x", 0, 32, 32))
    async with connect(make_settings()) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it pop", "image": "in.png",
                                                       "width": 64, "height": 64})
    assert result.structured_content["status"] == "succeeded", text_of(result)


async def test_upload_on_placeholder_names_providers_that_can(make_settings, workspace):
    (workspace / "in.png").write_bytes(draw("x", 0, 32, 32))
    async with connect(make_settings()) as client:
        result = await client.call_tool("upload_media", {"path": "in.png"})
    assert result.is_error and "cannot upload" in text_of(result) and "ATLASCLOUD_API_KEY" in text_of(result)


async def test_a_lost_placeholder_image_is_reported_not_raised(make_settings):
    # The placeholder (like any synchronous provider) has no status endpoint to fetch an image anew.
    async with connect(make_settings()) as client:
        first = await client.call_tool("generate_image", {"prompt": "a kite"})
        Path(first.structured_content["images"][0]["path"]).unlink()
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": first.structured_content["prediction_id"]})
    assert not again.is_error, text_of(again)
    assert again.structured_content["status"] == "succeeded"
    assert "could not be saved locally" in text_of(again)
