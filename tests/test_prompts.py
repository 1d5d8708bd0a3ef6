"""The MCP prompts, through the SDK client: listed with their arguments, rendered with them, and the
sizes they recommend accepted by every provider's FLUX models."""

from __future__ import annotations

import json

import pytest
from mcp.shared.exceptions import MCPError

from flux_mcp.prompts import SIZES, uses_in
from flux_mcp.providers import registry
from tests.conftest import connect

pytestmark = pytest.mark.anyio


async def test_prompts_are_listed_with_their_arguments_and_cost_little(make_settings):
    async with connect(make_settings()) as client:
        listed = await client.list_prompts()
    prompts = {p.name: p for p in listed.prompts}
    assert list(prompts) == ["web_image", "edit_steps", "web_sizes"]
    args = {name: {a.name: a.required for a in p.arguments or []} for name, p in prompts.items()}
    assert args == {"web_image": {"subject": True, "use": False, "style": False, "save_to": False},
                    "edit_steps": {"image": True, "goal": True}, "web_sizes": {"uses": False}}
    assert all(p.title and p.description for p in prompts.values())
    size = len(json.dumps([p.model_dump(mode="json", by_alias=True, exclude_none=True) for p in listed.prompts],
                          separators=(",", ":")))
    assert size <= 1500


async def test_web_image_renders_a_flux_prompt_brief_and_the_call_at_the_right_size(make_settings):
    async with connect(make_settings()) as client:
        og = await client.get_prompt("web_image", {"subject": "a lighthouse at dusk", "use": "og-image",
                                                   "style": "flat vector"})
        plain = await client.get_prompt("web_image", {"subject": "a fox"})
        odd = await client.get_prompt("web_image", {"subject": "a fox", "use": "billboard"})
    [message] = og.messages
    text = message.content.text
    assert message.role == "user"
    assert "a lighthouse at dusk" in text and "flat vector" in text and "double quotes" in text
    assert "width=1216, height=640" in text and "1200x630" in text and "public/images/og.webp" in text
    assert "generate_image" in text and "paid" in text
    assert "width=1344, height=768" in plain.messages[0].content.text  # a hero unless told otherwise
    assert "'billboard' is not a use" in odd.messages[0].content.text


async def test_edit_steps_renders_the_image_and_goal_into_a_step_by_step_plan(make_settings):
    async with connect(make_settings()) as client:
        rendered = await client.get_prompt("edit_steps", {"image": "public/hero.png",
                                                          "goal": "a night scene with a full moon"})
    text = rendered.messages[0].content.text
    assert "public/hero.png" in text and "a night scene with a full moon" in text
    assert "edit_image" in text and "one per step" in text and "save_to" in text


async def test_web_sizes_lists_the_uses_asked_for_or_all(make_settings):
    async with connect(make_settings()) as client:
        some = (await client.get_prompt("web_sizes", {"uses": "hero, favicon and a Twitter image"})).messages[0]
        every = (await client.get_prompt("web_sizes", {})).messages[0]
    rows = [line for line in some.content.text.splitlines() if line.startswith("- ")]
    assert [row.split(":")[0] for row in rows] == ["- hero", "- og", "- icon"]
    assert len([line for line in every.content.text.splitlines() if line.startswith("- ")]) == len(SIZES)


async def test_a_missing_required_argument_is_an_error(make_settings):
    async with connect(make_settings()) as client:
        with pytest.raises(MCPError):
            await client.get_prompt("edit_steps", {"image": "a.png"})


def test_every_recommended_size_is_taken_by_every_providers_flux_models():
    for use, (_, width, height, _) in SIZES.items():
        for spec in registry.keyed():
            for model in spec.load().models:
                if model.size is not None and "generate" in model.kinds:
                    for side in (width, height):
                        model.size.check("width", side, f"{spec.id} {model.id} ({use})")


def test_uses_are_found_by_name_plural_or_other_word_in_order():
    assert uses_in("OG images, a banner; favicons") == ["og", "hero", "icon"]
    assert uses_in("nothing known") == []
