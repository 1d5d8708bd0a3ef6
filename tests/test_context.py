"""What every conversation pays for: `tools/list` within 6,000 bytes, and still enough for a model to
call each tool right; clean descriptions, icons, a stable order, honest capabilities."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote
from xml.etree import ElementTree

import jsonschema
import pytest

from flux_mcp.providers import registry
from flux_mcp.schema import compact_input, compact_output
from flux_mcp.server import build_server
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
BOUND = 6000
"""Bytes of compact JSON for the whole `tools/list` answer, every registered tool included."""
ALL_KEYS = {s.key_env: f"key-of-{s.id}" for s in registry.keyed() if s.key_env}


def wire_size(listed: Any) -> int:
    """The bytes a client holds of a `tools/list` answer (as ../shared/hooks/context-size.py measures)."""
    data = listed.model_dump(mode="json", by_alias=True, exclude_none=True)
    return len(json.dumps(data, separators=(",", ":")))


def schema_nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every subschema of `schema` (not the property names of a `properties` map)."""
    if isinstance(schema, dict):
        yield schema
        for key, value in schema.items():
            if key == "properties":
                for sub in value.values():
                    yield from schema_nodes(sub)
            elif key in ("items", "additionalProperties", "not"):
                yield from schema_nodes(value)
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                for sub in value:
                    yield from schema_nodes(sub)


@pytest.mark.parametrize("keys", ["none", "one", "all"])
async def test_tools_list_of_every_registered_tool_fits_6000_bytes(make_settings, keys):
    env = {"none": {}, "one": {"ATLASCLOUD_API_KEY": ATLAS_KEY}, "all": ALL_KEYS}[keys]
    async with connect(make_settings(**env)) as client:
        listed = await client.list_tools()
    assert {"generate_image", "edit_image", "upload_media", "check_prediction"} <= {t.name for t in listed.tools}
    assert wire_size(listed) <= BOUND, f"tools/list is {wire_size(listed)} bytes, over {BOUND}"


async def test_schemas_carry_no_titles_no_null_unions_and_are_valid_json_schema(settings):
    async with connect(settings) as client:
        tools = (await client.list_tools()).tools
    for tool in tools:
        for schema in (tool.input_schema, tool.output_schema):
            jsonschema.Draft202012Validator.check_schema(schema)
            nodes = list(schema_nodes(schema))
            assert not [n for n in nodes if "title" in n or "$ref" in n or "$defs" in n], tool.name
        inputs = list(schema_nodes(tool.input_schema))
        assert not [n for n in inputs if {"type": "null"} in n.get("anyOf", []) or n.get("type") == "null"]
        assert not [n for n in inputs if "default" in n and n["default"] is None], tool.name


async def test_job_tools_share_one_output_shape_listing_the_fields_a_model_acts_on(settings):
    async with connect(settings) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    shapes = {json.dumps(tools[n].output_schema, sort_keys=True)
              for n in ("generate_image", "edit_image", "check_prediction")}
    assert len(shapes) == 1
    shape = tools["check_prediction"].output_schema
    from flux_mcp.models import ImageOutput, PredictionResult, UploadResult

    def core(model) -> list[str]:
        return [n for n, f in model.model_fields.items() if not (f.json_schema_extra or {}).get("x-detail")]

    assert list(shape["properties"]) == core(PredictionResult)
    assert {"prediction_id", "status", "images", "message", "error"} <= set(shape["properties"])
    assert list(shape["properties"]["images"]["items"]["properties"]) == core(ImageOutput) == ["url", "path"]
    assert list(tools["upload_media"].output_schema["properties"]) == core(UploadResult)
    images = shape["properties"]["images"]
    assert images["type"] == "array" and shape["properties"]["error"] == {"anyOf": [{"type": "string"},
                                                                                     {"type": "null"}]}
    # The details (provider, model, sizes, costs) are in every structuredContent, admitted by the schema.
    assert "additionalProperties" not in shape
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prediction_id": "a:b", "status": 3}, shape)


def test_compact_output_accepts_what_the_full_schema_accepts_and_refuses_wrong_types():
    from flux_mcp.models import PredictionResult

    full = PredictionResult.model_json_schema()
    compact = compact_output(full)
    good = PredictionResult(prediction_id="atlascloud:x", provider="atlascloud", model="m", status="processing",
                            images=[{"url": None, "path": "/p.png", "mime_type": "image/png", "width": 8,
                                     "height": 8}], error=None, cost_usd=None).model_dump(mode="json")
    for schema in (full, compact):
        jsonschema.validate(good, schema)
        for bad in ({**good, "images": {}}, {**good, "images": [{"path": 8}]}, {**good, "message": None},
                    {**good, "status": 1}, [good]):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
    for bad in ({**good, "extra": 1}, {**good, "cost_usd": "free"}):  # what only the full model refuses
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, full)


def test_compact_input_keeps_what_decides_validity_and_drops_null_arms():
    schema = {"type": "object", "title": "X", "properties": {
        "seed": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None,
                 "title": "Seed", "description": "d"},
        "kind": {"enum": ["a", "b"], "type": "string", "title": "Kind"},
        "many": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
        "title": {"type": "string", "title": "Title"}}, "required": ["title"]}
    assert compact_input(schema) == {"type": "object", "properties": {
        "seed": {"type": "integer", "minimum": 0, "description": "d"},
        "kind": {"enum": ["a", "b"], "type": "string"},  # a type beside an enum: Gemini's dialect wants one
        "many": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "title": {"type": "string"}}, "required": ["title"]}  # a property may be called "title"


async def test_every_tool_still_runs_with_the_arguments_a_model_sends_nulls_included(settings, fake, workspace):
    (workspace / "in.png").write_bytes(png_bytes(32, 32))
    async with connect(settings, fake) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        nulls = {name: {p: None for p in tool.input_schema["properties"]
                        if p not in tool.input_schema.get("required", [])} for name, tool in tools.items()}
        calls = [("generate_image", {"prompt": "a lighthouse", "width": 768, "height": 512, "seed": 7,
                                     "save_to": "img/light.png", "wait_seconds": 20}),
                 ("generate_image", {"prompt": "a lighthouse", **nulls["generate_image"]}),
                 ("edit_image", {"prompt": "make it night", "image": "in.png", "save_to": "img/night.webp"}),
                 ("edit_image", {"prompt": "make it night", "image": "in.png", **nulls["edit_image"]}),
                 ("upload_media", {"path": "in.png"}),
                 ("upload_media", {"path": "in.png", **nulls["upload_media"]})]
        results = [(name, args, await client.call_tool(name, args)) for name, args in calls]
        pid = results[0][2].structured_content["prediction_id"]
        for args in ({"prediction_id": pid}, {"prediction_id": pid, "wait_seconds": 0}):
            results.append(("check_prediction", args, await client.call_tool("check_prediction", args)))
    for name, args, result in results:
        assert not result.is_error, (name, args, text_of(result))
        without_nulls = {k: v for k, v in args.items() if v is not None}
        jsonschema.validate(without_nulls, tools[name].input_schema)  # what the model read allows the call
        jsonschema.validate(result.structured_content, tools[name].output_schema)
    assert (workspace / "img" / "light.png").is_file() and (workspace / "img" / "night.webp").is_file()
    assert len(fake.ledger) == 4


async def test_the_parameters_a_model_needs_are_described(settings):
    async with connect(settings) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    generate = tools["generate_image"].input_schema["properties"]
    assert "atlascloud (default)" in generate["provider"]["description"]
    assert "flux://providers" in generate["model"]["description"]
    assert "256-1536" in generate["width"]["description"]
    assert ".webp" in generate["save_to"]["description"] and "folder" in generate["save_to"]["description"]
    assert "at most 50" in generate["wait_seconds"]["description"]
    edit = tools["edit_image"]
    assert "data: URI" in edit.input_schema["properties"]["image"]["description"]
    assert "as generate_image" in (edit.description or "")  # its other parameters are described once, there
    assert set(edit.input_schema["required"]) == {"prompt", "image"}
    assert "check_prediction" in (tools["generate_image"].description or "")
    assert "paid" not in (tools["check_prediction"].description or "")


async def test_descriptions_have_no_docstring_indentation_or_trailing_whitespace(make_settings):
    async with connect(make_settings()) as client:
        tools = (await client.list_tools()).tools
        prompts = (await client.list_prompts()).prompts
    texts = [t.description or "" for t in tools] + [p.description or "" for p in prompts]
    texts += [a.description or "" for p in prompts for a in p.arguments or []]
    assert all(texts)  # every tool, prompt and prompt argument has one
    texts += [s["description"] for t in tools for s in schema_nodes(t.input_schema) if "description" in s]
    for text in texts:
        assert text == inspect.cleandoc(text), repr(text)
        assert not [line for line in text.splitlines() if line != line.strip()], repr(text)


async def test_tools_are_listed_in_the_same_order_byte_for_byte(make_settings, tmp_path):
    async with connect(make_settings()) as client:
        first, second = await client.list_tools(), await client.list_tools()
    other = make_settings(FLUX_MCP_WAIT_SECONDS="10")
    async with connect(other) as client:
        third = await client.list_tools()
    names = [t.name for t in first.tools]
    assert names[:4] == ["generate_image", "edit_image", "upload_media", "check_prediction"]
    assert [t.name for t in third.tools] == names
    assert first.model_dump_json() == second.model_dump_json()


def svg_of(icon: Any) -> ElementTree.Element:
    """The SVG document an icon's `data:` URI holds, parsed (it must be well-formed XML in the SVG namespace,
    sized by a viewBox, drawing nothing from outside)."""
    assert icon.src.startswith("data:image/svg+xml,"), icon.src
    text = unquote(icon.src.removeprefix("data:image/svg+xml,"))
    assert not set(icon.src.removeprefix("data:")) & set('<> "'), "characters a URI may not hold unescaped"
    root = ElementTree.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox")
    assert "http" not in text.replace("http://www.w3.org/2000/svg", ""), text
    return root


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_server_carries_an_embedded_svg_icon_and_the_tools_none_by_default(make_settings, mode):
    """By default tools carry no icon of their own: each costs ~150 bytes in every tools/list, five of them
    more than the bound leaves; clients show the server's beside its tools."""
    server = build_server(make_settings())
    async with connect(make_settings(), mode=mode) as client:
        tools = (await client.list_tools()).tools
        info = client.server_info
    assert server.icons and info is not None and info.icons == server.icons
    [icon] = info.icons
    svg_of(icon)
    assert not [t.name for t in tools if t.icons]


async def test_tool_icons_on_give_every_tool_its_own_embedded_svg(make_settings):
    plain, iconic = make_settings(), make_settings(FLUX_MCP_TOOL_ICONS="on")
    async with connect(plain) as client:
        without = await client.list_tools()
    async with connect(iconic) as client:
        listed = await client.list_tools()
    assert [t.name for t in listed.tools] == [t.name for t in without.tools]
    marks = {}
    for tool in listed.tools:
        assert tool.icons and len(tool.icons) == 1, tool.name
        root = svg_of(tool.icons[0])
        marks[tool.name] = ElementTree.tostring(root)
    assert len(set(marks.values())) == len(marks)  # each tool its own glyph
    extra = wire_size(listed) - wire_size(without)
    assert 0 < extra <= 160 * len(listed.tools)  # what the option costs every conversation, as documented


def test_tool_icons_take_only_on_or_off(make_settings):
    from flux_mcp.config import ConfigError

    with pytest.raises(ConfigError, match="FLUX_MCP_TOOL_ICONS must be on or off"):
        make_settings(FLUX_MCP_TOOL_ICONS="maybe")


async def test_prompts_capability_is_advertised_only_with_prompts_to_list(make_settings):
    async with connect(make_settings()) as client:
        caps = client.server_capabilities
        prompts = (await client.list_prompts()).prompts
    assert (caps.prompts is not None) == bool(prompts) and prompts


async def test_annotations_say_read_only_and_the_hints_that_differ_from_the_protocol_defaults(settings):
    async with connect(settings) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    wire = {name: t.annotations.model_dump(exclude_none=True) for name, t in tools.items()}
    assert wire["generate_image"] == wire["edit_image"] == {"read_only_hint": False}  # destructive, open world
    for name in ("upload_media", "check_prediction"):
        assert wire[name] == {"read_only_hint": False, "destructive_hint": False, "idempotent_hint": True}
    # Titles are left out of the listing (clients show the name): five of them cost bytes every conversation.
    assert not any(t.title or (t.annotations and t.annotations.title) for t in tools.values())


def test_the_bench_reports_the_figure_against_the_same_bound():
    from bench import context

    assert context.BOUND == BOUND


async def test_a_finished_result_text_stays_under_300_tokens(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "save_to": "img/"})
    assert not result.is_error and len(text_of(result).encode()) <= 300 * 4


@pytest.mark.browser
async def test_every_icon_draws_its_glyph_in_a_real_browser(make_settings):
    """Chromium loads each icon as an image (as a client's UI would) and draws something: a broken or
    namespace-less SVG loads as an empty or failed image."""
    from playwright.async_api import async_playwright

    from tests.browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS, ensure_chromium

    if problem := ensure_chromium():
        pytest.skip(problem)
    async with connect(make_settings(FLUX_MCP_TOOL_ICONS="on")) as client:
        icons = {t.name: t.icons[0].src for t in (await client.list_tools()).tools if t.icons}
        icons["server"] = client.server_info.icons[0].src
    html = "".join(f'<img id="{name}" width="32" height="32" src="{src}">' for name, src in icons.items())
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = await browser.new_page()
            await page.set_content(f"<body style='margin:0;background:#fff'>{html}</body>")
            drawn = await page.evaluate("""() => Array.from(document.images).map(img => {
                const c = document.createElement('canvas'); c.width = 32; c.height = 32;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0, 32, 32);
                const px = g.getImageData(0, 0, 32, 32).data; let ink = 0;
                for (let i = 3; i < px.length; i += 4) if (px[i] > 128) ink++;
                return [img.id, img.complete && img.naturalWidth > 0, ink];
            })""")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "icons.png"), clip={"x": 0, "y": 0, "width": 32 * len(icons),
                                                                          "height": 32})
        finally:
            await browser.close()
    assert {name for name, _, _ in drawn} == set(icons)
    for name, loaded, ink in drawn:
        assert loaded and 32 * 32 // 8 < ink < 32 * 32, (name, loaded, ink)  # some of the square, not all of it
