"""One request model: the tools' parameters, the CLI's flags and the journal's record all come from
`JobRequest`, so a field added there reaches every one of them."""

from __future__ import annotations

import argparse

import pytest

from flux_mcp.request import CLI_OWN, EDIT_ONLY, GENERATE_ONLY, SERVICE_ONLY, JobRequest, add_cli_flags
from tests.conftest import connect

pytestmark = pytest.mark.anyio


def fields(kind: str) -> set[str]:
    skip = SERVICE_ONLY | (GENERATE_ONLY if kind == "edit" else EDIT_ONLY)
    return set(JobRequest.model_fields) - skip


async def test_every_field_is_a_tool_parameter_of_its_tools(make_settings):
    async with connect(make_settings()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools["generate_image"].input_schema["properties"]) == fields("generate")
    assert set(tools["edit_image"].input_schema["properties"]) == fields("edit")
    assert tools["edit_image"].input_schema["required"] == ["prompt", "image"]


def test_every_generate_field_is_a_cli_flag_or_spelled_by_the_cli_itself():
    parser = argparse.ArgumentParser()
    names = add_cli_flags(parser, "generate")
    assert set(names) | CLI_OWN == fields("generate")
    args = parser.parse_args(["--width", "640", "-n", "2", "--guidance-scale", "3.5", "--overwrite"])
    assert (args.width, args.num_images, args.guidance_scale, args.overwrite) == (640, 2, 3.5, True)
    assert args.seed is None and args.model is None  # unset flags leave the field's default to the model


def test_the_journal_keeps_every_field_but_an_inline_image_only_by_its_size():
    req = JobRequest(kind="edit", prompt="p", image="data:image/png;base64," + "A" * 1000, seed=7)
    kept = req.journaled()
    assert set(kept) == set(JobRequest.model_fields) - {"kind", "provider", "model", "idempotency_key"}
    assert kept["seed"] == 7 and kept["image"].startswith("data: URI (") and "AAAA" not in kept["image"]


def test_unknown_fields_and_bad_values_are_refused_by_the_model():
    with pytest.raises(ValueError):
        JobRequest(prompt="p", num_image=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        JobRequest(prompt="a\x00b")
