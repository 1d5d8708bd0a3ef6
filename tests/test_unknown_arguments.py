"""Arguments a tool does not have are refused before anything is sent: a misspelt or imagined parameter
must never run a paid job without it. Null for an optional parameter means "omitted"."""

from __future__ import annotations

import pytest

from flux_mcp.server import unknown_arguments_text
from tests.conftest import connect, text_of

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize(("arguments", "named", "suggested"), [
    ({"dry_run": True}, ["dry_run"], None),
    ({"transparent": True}, ["transparent"], None),
    ({"num_image": 2}, ["num_image"], "num_images"),
    ({"sead": 7, "dry_run": True}, ["sead", "dry_run"], "seed"),
])
async def test_generate_image_refuses_an_unknown_argument_before_any_request(settings, fake, mode, arguments,
                                                                              named, suggested):
    async with connect(settings, fake, mode=mode) as client:
        refused = await client.call_tool("generate_image", {"prompt": "a lighthouse", **arguments})
    text = text_of(refused)
    assert refused.is_error and refused.structured_content is None
    assert all(repr(name) in text for name in named), text
    if suggested:
        assert f"did you mean {suggested!r}?" in text
    assert "Nothing was run" in text and "num_images" in text  # and the parameters there are
    assert fake.requests == [] and fake.ledger == []


async def test_the_call_made_right_after_a_refusal_runs_once(settings, fake):
    async with connect(settings, fake) as client:
        refused = await client.call_tool("generate_image", {"prompt": "p", "num_image": 2})
        done = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    assert refused.is_error and not done.is_error
    assert len(fake.ledger) == 1 and fake.ledger[0]["num_images"] == 2


async def test_every_tool_refuses_arguments_it_does_not_have(settings, fake, workspace):
    (workspace / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    async with connect(settings, fake) as client:
        edit = await client.call_tool("edit_image", {"prompt": "p", "imgae": "a.png"})
        num = await client.call_tool("edit_image", {"prompt": "p", "image": "a.png", "num_images": 2})
        upload = await client.call_tool("upload_media", {"path": "a.png", "public": True})
        check = await client.call_tool("check_prediction", {"prediction": "atlascloud:x"})
    assert edit.is_error and "did you mean 'image'?" in text_of(edit)
    assert num.is_error and "'num_images'" in text_of(num)  # generate_image has it; edit_image does not
    assert upload.is_error and "'public'" in text_of(upload)
    assert check.is_error and "did you mean 'prediction_id'?" in text_of(check)
    assert fake.requests == []


async def test_null_for_any_optional_parameter_is_taken_as_omitted(settings, fake):
    async with connect(settings, fake) as client:
        done = await client.call_tool("generate_image", {"prompt": "p", "width": None, "num_images": None,
                                                          "overwrite": None, "seed": None})
        missing = await client.call_tool("generate_image", {"prompt": None})
    assert not done.is_error, text_of(done)
    assert fake.ledger[0]["size"] == "1024*1024" and fake.ledger[0]["num_images"] == 1
    assert missing.is_error and "prompt" in text_of(missing) and len(fake.ledger) == 1


def test_the_refusal_text_names_each_argument_its_closest_parameter_and_all_of_them():
    text = unknown_arguments_text("check_prediction", ["wait", "xyz"], ["prediction_id", "wait_seconds"])
    assert text == ("check_prediction has no parameters 'wait' (did you mean 'wait_seconds'?), 'xyz'. "
                    "Nothing was run. Its parameters: prediction_id, wait_seconds.")
