"""Exact sizes: width/height are the size delivered, from every provider whose size rules differ.

A size the provider cannot render as such (off its step, below its minimum) is generated at the
nearest size it renders, of the same shape and never smaller, then cropped and resized locally; a
size beyond every configured provider's range is refused before anything is paid for.
"""

from __future__ import annotations

import pytest

from flux_mcp.assets import render_size
from flux_mcp.providers.base import ModelInfo, Range
from tests.assets_support import Router, Sized, opened
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.contract.cases import CASES
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.segmind import SegmindFake

pytestmark = pytest.mark.anyio

RENDERED_FOR_1200x630 = {
    "atlascloud": "1200*640",  # no documented step: FLUX's own 16 px grid
    "segmind": (1200, 640),  # multiples of 8 documented, FLUX's 16 used
    "acedatacloud": "1216x640",  # multiples of 32
    "imagepipeline": (1200, 640),
    "appypie": (1200, 640),
}
"""What each provider is asked to render for an exact 1200x630."""


def _sent(case_id: str, body: dict) -> object:
    if "size" in body:
        return body["size"]
    return body["width"], body["height"]


def _info(size: Range | None, step: int = 16) -> ModelInfo:
    return ModelInfo("m", frozenset({"generate"}), "", size=size, render_step=step)


def test_render_size_is_the_smallest_on_the_grid_of_the_same_shape_never_below_the_target():
    assert render_size(_info(Range(256, 1536)), 1200, 630) == (1200, 640)
    assert render_size(_info(Range(256, 1440, multiple_of=32)), 1200, 630) == (1216, 640)
    assert render_size(_info(Range(512, 2048, multiple_of=8)), 1920, 1080) == (1920, 1088)
    # Below the minimum: scaled up, keeping the shape.
    assert render_size(_info(Range(256, 1536)), 180, 180) == (256, 256)
    assert render_size(_info(Range(512, 2048, multiple_of=8)), 1200, 300) == (2048, 512)
    # What the range cannot hold: None.
    assert render_size(_info(Range(256, 1536)), 1920, 1080) is None
    assert render_size(_info(Range(512, 2048, multiple_of=8)), 2048, 256) is None
    # A provider that renders any size renders the target itself.
    assert render_size(_info(Range(16, 4096), step=1), 1200, 630) == (1200, 630)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_og_image_preset_writes_exactly_1200x630_from_every_provider(case, make_settings, workspace):
    fake = case.make_fake(case.key)
    settings = make_settings(**case.environment())
    async with connect(settings, Sized(fake)) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "preset": "og-image",
                                                           "save_to": "public/"})
    assert not result.is_error and result.structured_content["status"] == "succeeded", text_of(result)
    [job] = fake.ledger
    assert _sent(case.id, job) == RENDERED_FOR_1200x630[case.id]
    with opened(workspace / "public" / "og-image.png") as im:
        assert im.size == (1200, 630)
    assert result.structured_content["images"][0]["width"] == 1200
    assert result.structured_content["files"] == ["public/og-image.png"]
    assert "cropped and resized to exactly 1200x630" in text_of(result)
    assert 'og:image" content="/og-image.png"' in result.structured_content["snippet"]


@pytest.mark.parametrize(("case", "width", "height"), [
    (CASES[0], 180, 180),  # below Atlas Cloud's 256 px minimum
    (CASES[1], 1001, 500),  # Segmind schnell: under 512 and off its 8 px step
    (CASES[2], 1000, 1000),  # AceDataCloud flux-dev: off its 32 px step
    (CASES[3], 128, 128),
    (CASES[4], 128, 128),
], ids=lambda v: getattr(v, "id", str(v)))
async def test_sizes_a_provider_does_not_render_are_delivered_exactly(case, width, height, make_settings):
    fake = case.make_fake(case.key)
    async with connect(make_settings(**case.environment()), Sized(fake)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "width": width, "height": height})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    [image] = result.structured_content["images"]
    with opened(image["path"]) as im:
        assert im.size == (width, height) == (image["width"], image["height"])
    assert f"to exactly {width}x{height}" in text_of(result) and f"to exactly {width}x{height}" in \
        result.structured_content["message"]
    assert len(fake.ledger) == 1


async def test_an_aspect_ratio_model_is_cropped_to_the_exact_size(make_settings):
    fake = SegmindFake(key=CASES[1].key)
    async with connect(make_settings(**CASES[1].environment()), Sized(fake)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-dev", "width": 1200,
                                                           "height": 630})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert fake.ledger[0]["aspect_ratio"] == "16:9"
    with opened(result.structured_content["images"][0]["path"]) as im:
        assert im.size == (1200, 630)
    assert "Generated at 1360x768, cropped and resized to exactly 1200x630." in text_of(result)


async def test_a_size_the_provider_renders_is_sent_and_kept_as_it_is(settings):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, Sized(fake)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "width": 1024, "height": 576})
    assert fake.ledger[0]["size"] == "1024*576"
    assert "exactly" not in text_of(result) and result.structured_content["images"][0]["width"] == 1024


async def test_a_size_beyond_the_providers_range_is_refused_before_paying_naming_one_that_can(make_settings):
    atlas, segmind = AtlasFake(key=ATLAS_KEY), SegmindFake(key=CASES[1].key)
    settings = make_settings(**CASES[0].environment(), **CASES[1].environment(), FLUX_MCP_PROVIDER="atlascloud")
    async with connect(settings, Router(**{"atlas.test": atlas, "segmind.test": segmind})) as client:
        wide = await client.call_tool("generate_image", {"prompt": "p", "width": 1920, "height": 1080})
        hero = await client.call_tool("generate_image", {"prompt": "p", "preset": "hero", "save_to": "web/"})
        huge = await client.call_tool("generate_image", {"prompt": "p", "width": 4096, "height": 4096})
    assert wide.is_error and hero.is_error and huge.is_error
    assert "width=1920 is out of range for atlascloud model black-forest-labs/flux-schnell: allowed 256 to " \
           "1536" in text_of(wide)
    assert "Configured models that deliver 1920x1080: segmind flux-schnell" in text_of(wide)
    assert "segmind flux-schnell" in text_of(hero)
    assert "No configured provider renders 4096x4096" in text_of(huge)
    assert atlas.requests == [] and segmind.requests == []


async def test_the_journal_keeps_the_size_asked_for_and_check_prediction_delivers_it(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, polls_to_complete=50)
    async with connect(polled_settings, Sized(fake)) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "width": 1200, "height": 630,
                                                            "wait_seconds": 0})
        assert pending.structured_content["status"] in ("starting", "processing"), text_of(pending)
        for job in fake.jobs.values():
            job.done = True
        done = await client.call_tool("check_prediction", {"prediction_id":
                                                           pending.structured_content["prediction_id"]})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    with opened(done.structured_content["images"][0]["path"]) as im:
        assert im.size == (1200, 630)
