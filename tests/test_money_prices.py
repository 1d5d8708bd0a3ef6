"""Prices and the checks before paying: the documented table, FLUX_MCP_PRICES, `dry_run` and `max_cost_usd`."""

from __future__ import annotations

import base64
from pathlib import Path

import jsonschema
import pytest

from flux_mcp.config import Settings
from flux_mcp.errors import ConfigError
from tests.conftest import ATLAS_BASE, ATLAS_KEY, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import png_bytes
from tests.money_helpers import charges, serve

pytestmark = pytest.mark.anyio
DEV = "black-forest-labs/flux-dev"


@pytest.fixture
def atlas(make_settings):
    def make(**env: str) -> Settings:
        return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE, **env)

    return make


async def output_schema(client, name: str = "generate_image") -> dict:
    return next(t for t in (await client.list_tools()).tools if t.name == name).output_schema


async def test_a_dry_run_checks_everything_estimates_and_submits_nothing(atlas, workspace, home):
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(atlas(), fake) as client:
        result = await client.call_tool("generate_image", {
            "prompt": "a hero image", "model": DEV, "num_images": 2, "width": 1280, "height": 720,
            "save_to": "public/hero.png", "dry_run": True})
        schema = await output_schema(client)
    assert not result.is_error, text_of(result)
    data = result.structured_content
    jsonschema.validate(data, schema)  # one result shape: a dry run fits the tool's outputSchema
    assert (data["prediction_id"], data["status"], data["images"]) == (None, None, [])
    assert (data["provider"], data["model"], data["cost_usd"], data["cost_estimated"]) == ("atlascloud", DEV, 0.024,
                                                                                          True)
    assert data["dry_run"] == {"width": 1280, "height": 720, "num_images": 2, "allowed": True, "confirm": False,
                               "save_to": [str(workspace / "public" / "hero.png"),
                                           str(workspace / "public" / "hero-2.png")]}
    assert "nothing was submitted" in data["message"] and "$0.024 (2 images x $0.012" in data["message"]
    assert fake.requests == [] and await charges(home) == []
    assert not (workspace / "public").exists()


async def test_a_dry_run_refuses_what_the_real_call_would_refuse(atlas, tmp_path):
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(atlas(), fake) as client:
        too_big = await client.call_tool("generate_image", {"prompt": "p", "width": 4096, "dry_run": True})
        outside = await client.call_tool("generate_image", {"prompt": "p", "save_to": str(tmp_path / "x.png"),
                                                            "dry_run": True})
    assert too_big.is_error and "width" in text_of(too_big)
    assert outside.is_error
    assert fake.requests == []


async def test_a_dry_run_edit_reads_the_local_image_but_uploads_nothing(atlas, workspace):
    (workspace / "in.png").write_bytes(png_bytes())
    (workspace / "not-an-image.png").write_text("hello")
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(atlas(), fake) as client:
        planned = await client.call_tool("edit_image", {"prompt": "make it night", "image": "in.png",
                                                        "dry_run": True})
        broken = await client.call_tool("edit_image", {"prompt": "make it night", "image": "not-an-image.png",
                                                       "dry_run": True})
        schema = await output_schema(client, "edit_image")
    assert not planned.is_error, text_of(planned)
    jsonschema.validate(planned.structured_content, schema)
    assert planned.structured_content["model"] == "black-forest-labs/flux-kontext-dev"
    assert planned.structured_content["cost_usd"] == 0.025
    assert broken.is_error and "not a usable image" in text_of(broken)
    assert fake.requests == []  # no upload, no job


async def test_a_dry_run_over_the_budget_says_the_real_call_would_be_refused(atlas):
    async with serve(atlas(FLUX_MCP_BUDGET_DAY_USD="0.01"), AtlasFake(key=ATLAS_KEY)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": DEV, "dry_run": True})
    assert not result.is_error
    assert result.structured_content["dry_run"]["allowed"] is False
    assert "would be refused now" in result.structured_content["message"]
    assert "FLUX_MCP_BUDGET_DAY_USD" in result.structured_content["message"]


async def test_max_cost_usd_refuses_a_call_estimated_above_it_before_any_request(atlas):
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(atlas(), fake) as client:
        refused = await client.call_tool("generate_image", {"prompt": "p", "model": DEV, "max_cost_usd": 0.01})
        assert fake.requests == []
        cheap = await client.call_tool("generate_image", {"prompt": "p", "max_cost_usd": 0.003})
    text = text_of(refused)
    assert refused.is_error and "$0.012" in text and "max_cost_usd=0.01" in text
    assert "black-forest-labs/flux-schnell at $0.003 per image" in text  # the way out, for the model
    assert not cheap.is_error and len(fake.ledger) == 1


async def test_max_cost_usd_refuses_a_model_whose_cost_is_unknown(atlas):
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(atlas(), fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "wavespeed-ai/flux-schnell",
                                                           "max_cost_usd": 1})
    assert result.is_error and "cannot be bounded" in text_of(result)
    assert fake.requests == []


@pytest.mark.parametrize(("name", "text"), [
    ("prices.json", '{"atlascloud": {"black-forest-labs/flux-dev": 0.005, "*": 0.001}}'),
    ("prices.toml", '[atlascloud]\n"black-forest-labs/flux-dev" = 0.005\n"*" = 0.001\n'),
])
async def test_flux_mcp_prices_replaces_the_documented_prices(atlas, workspace, name, text):
    (workspace / name).write_text(text)
    async with serve(atlas(FLUX_MCP_PRICES=name), AtlasFake(key=ATLAS_KEY)) as client:
        dev = await client.call_tool("generate_image", {"prompt": "p", "model": DEV, "dry_run": True})
        other = await client.call_tool("generate_image", {"prompt": "p", "model": "wavespeed-ai/flux-schnell",
                                                          "num_images": 3, "dry_run": True})
    assert dev.structured_content["cost_usd"] == 0.005 and "FLUX_MCP_PRICES" in dev.structured_content["message"]
    assert other.structured_content["cost_usd"] == pytest.approx(0.003)


@pytest.mark.parametrize(("text", "said"), [
    ("{not json", "not valid JSON"),
    ('{"atlas": {"m": 1}}', "'atlas' is not a provider"),
    ('{"atlascloud": {"m": -1}}', "must be a price in USD per image"),
    ('{"atlascloud": 0.1}', "must be a table"),
])
def test_an_unusable_prices_file_is_one_clear_error_at_start(make_settings, workspace, text, said):
    (workspace / "prices.json").write_text(text)
    with pytest.raises(ConfigError, match="FLUX_MCP_PRICES") as caught:
        make_settings(FLUX_MCP_PRICES="prices.json")
    assert said in str(caught.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        make_settings(FLUX_MCP_PRICES=str(Path(workspace / "missing.toml")))


async def test_every_result_carries_its_cost_and_whether_it_is_estimated(atlas):
    async with serve(atlas(), AtlasFake(key=ATLAS_KEY, hold=True)) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        checked = await client.call_tool("check_prediction", {
            "prediction_id": pending.structured_content["prediction_id"]})
    for data in (pending.structured_content, checked.structured_content):
        assert (data["cost_usd"], data["cost_estimated"]) == (0.003, True)  # the estimate, until the provider says


async def test_a_dry_run_edit_checks_a_data_uri_too(atlas):
    fake = AtlasFake(key=ATLAS_KEY)
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    async with serve(atlas(), fake) as client:
        good = await client.call_tool("edit_image", {"prompt": "p", "image": image, "dry_run": True})
        bad = await client.call_tool("edit_image", {"prompt": "p", "image": junk, "dry_run": True})
    assert not good.is_error and good.structured_content["dry_run"]["num_images"] == 1
    assert bad.is_error and fake.requests == []
