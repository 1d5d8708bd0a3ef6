"""One FLUX model named once: canonical names map to each provider's own id and limits, `model` takes
either, and `flux-mcp providers` / flux://providers show who serves what. Also the documented typical
durations that a model's first jobs are polled by."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from flux_mcp.cli import main
from flux_mcp.config import Settings
from flux_mcp.providers import catalog, registry
from flux_mcp.providers.acedatacloud import AceDataCloud
from flux_mcp.providers.atlascloud import AtlasCloud
from flux_mcp.providers.base import ModelInfo, Range
from flux_mcp.providers.registry import ProviderSpec
from flux_mcp.providers.segmind import Segmind
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.appypie import AppyPieFake
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.segmind import SegmindFake

pytestmark = pytest.mark.anyio


# --- the table -------------------------------------------------------------------------------------


def test_every_canonical_name_on_a_model_is_in_the_catalog_and_every_catalog_name_is_served():
    named = {m.canonical for cls in catalog.adapters() for m in cls.models if m.canonical}
    assert named == set(catalog.CANONICAL)


def test_canonical_names_map_to_each_providers_own_ids_per_kind():
    table = catalog.table()
    assert table["flux-schnell"] == {
        "atlascloud": {"generate": "black-forest-labs/flux-schnell", "edit": "black-forest-labs/flux-schnell"},
        "segmind": {"generate": "flux-schnell"},
        "imagepipeline": {"generate": "flux-schnell"},
        "appypie": {"generate": "flux-1-schnell"},
    }
    assert table["flux-dev"]["segmind"] == {"generate": "flux-dev", "edit": "flux-img2img"}
    assert table["flux-kontext-dev"] == {"atlascloud": {"edit": "black-forest-labs/flux-kontext-dev"}}
    assert set(table["flux-kontext-pro"]) == {"segmind", "acedatacloud"}
    assert "placeholder" not in {p for served in table.values() for p in served}


def test_serving_lists_the_providers_of_a_model_kind_and_size_in_the_order_asked():
    assert catalog.serving("flux-dev") == ["atlascloud", "segmind", "acedatacloud"]
    assert catalog.serving("flux-schnell", "edit") == ["atlascloud"]
    # 2048 px is beyond Atlas Cloud's and ImagePipeline's documented limits, within Segmind's and AppyPie's.
    assert catalog.serving("flux-schnell", "generate", 2048, 2048) == ["segmind", "appypie"]
    # Segmind's schnell takes multiples of 8 only.
    assert catalog.serving("flux-schnell", "generate", 1020, 1024) == ["atlascloud", "imagepipeline", "appypie"]
    assert catalog.serving("flux-dev", among=["acedatacloud", "atlascloud", "nosuch"]) == [
        "acedatacloud", "atlascloud"]
    assert catalog.serving("flux-3-ultra") == []


def test_model_for_gives_the_providers_model_with_its_own_limits():
    img2img = Segmind.model_for("flux-dev", "edit")
    assert img2img is not None and img2img.id == "flux-img2img" and img2img.requires_image
    dev = AtlasCloud.model_for("flux-dev")
    assert dev is not None and dev.id == "black-forest-labs/flux-dev" and dev.steps == Range(1, 50)
    assert AtlasCloud.model_for("flux-kontext-dev", "generate") is None
    assert AceDataCloud.model_for("flux-2-klein", "edit") is None


# --- `model` takes either name ----------------------------------------------------------------------


@pytest.fixture
def atlas_settings(make_settings) -> Settings:
    return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                         ATLASCLOUD_SYNC_MODE="off")


@pytest.mark.parametrize("model", ["flux-dev", "black-forest-labs/flux-dev"])
async def test_a_canonical_name_or_the_own_id_runs_the_same_model_and_the_result_names_the_own_id(
        atlas_settings, model):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(atlas_settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": model, "steps": 30})
        pid = result.structured_content["prediction_id"]
        checked = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert [job["model"] for job in fake.ledger] == ["black-forest-labs/flux-dev"]
    assert result.structured_content["model"] == "black-forest-labs/flux-dev"
    assert checked.structured_content["model"] == "black-forest-labs/flux-dev"  # what the journal kept
    assert "black-forest-labs/flux-dev" in text_of(result) or "flux-dev" in text_of(result)


async def test_a_canonical_name_is_checked_against_the_providers_own_limits(atlas_settings):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(atlas_settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-schnell", "steps": 4})
    assert result.is_error
    assert "steps is not a setting of atlascloud model black-forest-labs/flux-schnell" in text_of(result)
    assert fake.requests == []


async def test_an_edit_by_canonical_name_picks_the_model_that_edits(make_settings):
    settings = make_settings(SEGMIND_API_KEY="SG_0123456789abcdef", SEGMIND_BASE_URL="http://segmind.test")
    fake = SegmindFake(key="SG_0123456789abcdef")
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it dusk", "model": "flux-dev",
                                                       "image": "https://example.com/cat.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert result.structured_content["model"] == "flux-img2img"
    assert fake.count("POST /v1/flux-img2img") == 1


async def test_a_canonical_name_with_another_own_id_reaches_the_providers_endpoint(make_settings):
    settings = make_settings(APPYPIE_SUBSCRIPTION_KEY="appypie-canary-0123456789abcdef",
                             APPYPIE_BASE_URL="http://appypie.test")
    fake = AppyPieFake(key="appypie-canary-0123456789abcdef")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-schnell"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert result.structured_content["model"] == "flux-1-schnell"
    assert fake.count("POST /flux-1-schnell/v1/getData") == 1


async def test_a_canonical_model_the_provider_lacks_is_refused_naming_who_serves_it(make_settings):
    settings = make_settings(APPYPIE_SUBSCRIPTION_KEY="appypie-canary-0123456789abcdef",
                             APPYPIE_BASE_URL="http://appypie.test")
    fake = AppyPieFake(key="appypie-canary-0123456789abcdef")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": "flux-kontext-pro"})
    text = text_of(result)
    assert result.is_error and "Unknown model 'flux-kontext-pro' for appypie" in text
    assert "Known generate models: flux-1-schnell (flux-schnell)." in text
    assert "flux-kontext-pro (generate) is served by: acedatacloud." in text  # Segmind's edits only
    assert fake.requests == []


# --- what `flux-mcp providers` and flux://providers show -------------------------------------------


async def test_the_providers_resource_shows_who_serves_each_canonical_model(atlas_settings):
    async with connect(atlas_settings) as client:
        listing = json.loads((await client.read_resource("flux://providers")).contents[0].text)
    models = listing["canonical_models"]
    assert models["flux-dev"]["label"] == "FLUX.1 [dev]"
    assert models["flux-dev"]["served_by"]["segmind"] == {"generate": "flux-dev", "edit": "flux-img2img"}
    assert models["flux-dev"]["configured"] == ["atlascloud"]
    assert models["flux-2-pro"]["configured"] == []
    atlas = next(p for p in listing["providers"] if p["id"] == "atlascloud")
    assert {m["id"]: m["canonical"] for m in atlas["models"]}["black-forest-labs/flux-dev-lora"] is None


def test_flux_mcp_providers_lists_the_canonical_models_with_the_configured_providers_marked(
        monkeypatch, capsys, home, workspace):
    for spec in registry.SPECS:
        for variable in spec.variables:
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("FLUX_MCP_PROVIDER", raising=False)
    monkeypatch.setenv("FLUX_MCP_HOME", str(home))
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_0123456789abcdef")
    monkeypatch.chdir(workspace)
    assert main(["providers"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.strip().startswith("flux-dev ")]
    assert line.split()[1:] == ["FLUX.1", "[dev]", "atlascloud,", "*segmind,", "acedatacloud"]
    assert "SG_0123456789abcdef" not in out


# --- documented typical durations --------------------------------------------------------------------


def test_typical_seconds_is_the_documented_figure_only_for_the_providers_own_service(make_settings):
    own = AceDataCloud(make_settings(ACEDATACLOUD_API_TOKEN="t").providers["acedatacloud"], None)  # type: ignore[arg-type]
    assert own.typical_seconds("flux-dev") == 10.0
    assert own.typical_seconds("flux-nonesuch") is None
    elsewhere = make_settings(ACEDATACLOUD_API_TOKEN="t", ACEDATACLOUD_BASE_URL="http://acedatacloud.test")
    assert AceDataCloud(elsewhere.providers["acedatacloud"], None).typical_seconds("flux-dev") is None  # type: ignore[arg-type]
    atlas = AtlasCloud(make_settings(ATLASCLOUD_API_KEY="k").providers["atlascloud"], None)  # type: ignore[arg-type]
    assert atlas.typical_seconds("black-forest-labs/flux-dev") is None  # Atlas Cloud documents none


QUICK, UNKNOWN = "black-forest-labs/flux-schnell", "wavespeed-ai/flux-schnell"
DOCUMENTED = ProviderSpec("documented", "Documented", "DOCUMENTED_API_KEY", "DOCUMENTED_BASE_URL",
                          "http://documented.test", "tests.test_models_catalog:Documented")


class Documented(AtlasCloud):
    """Atlas Cloud's wire, with two of its models documented differently: one as taking 1.2 s, one not."""

    spec = DOCUMENTED
    models = (
        ModelInfo(QUICK, frozenset({"generate"}), "documented", size=Range(256, 1536), typical_seconds=1.2),
        ModelInfo(UNKNOWN, frozenset({"generate"}), "undocumented", size=Range(256, 1536)),
    )
    default_model = QUICK


@pytest.fixture
def documented(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registers `Documented` as a provider, the way a new adapter joins: one registry line."""
    monkeypatch.setattr(registry, "SPECS", (*registry.SPECS[:-1], DOCUMENTED, registry.SPECS[-1]))
    monkeypatch.setattr(registry, "BY_ID", {s.id: s for s in registry.SPECS})
    yield


@pytest.mark.parametrize(("model", "asked"), [(QUICK, 1), (UNKNOWN, 2)])
async def test_a_documented_models_first_job_is_asked_about_once_when_it_ends_in_its_documented_time(
        documented: None, make_settings: Any, model: str, asked: int):
    """The job takes 1 s. Documented as 1.2 s, it is checked once, at 1.3 s (fixed 2-second polling
    would also ask once); undocumented, the first jobs explore: at once, 0.5 s, 0.7 s, ..."""
    settings = make_settings(DOCUMENTED_API_KEY=ATLAS_KEY, FLUX_MCP_PROVIDER="documented")
    fake = AtlasFake(key=ATLAS_KEY, duration=1.0)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "model": model, "wait_seconds": 20})
    assert result.structured_content and result.structured_content["status"] == "succeeded", text_of(result)
    polls = fake.count("GET /api/v1/model/prediction/")
    assert polls == 1 if asked == 1 else polls >= asked
