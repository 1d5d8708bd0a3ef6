"""save_to names that would break on another system (Windows, macOS) are refused before paying, with
a message that says why; names that work everywhere still do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import connect, text_of

pytestmark = pytest.mark.anyio

REFUSED = [
    ("hero.", "ends with a dot"),
    ("img/hero.png.", "ends with a dot"),
    ("art./x.png", "ends with a dot"),
    (".png", "only an extension"),
    ("img/.webp", "only an extension"),
    ("c:foo.png", "drive letter"),
    ("img/x.png:hidden", "drive letter or stream"),
    ("NUL.png", "reserved device name"),
    ("con", "reserved device name"),
    ("COM1.png", "reserved device name"),
    ("img/lpt\u00b9.tar.png", "reserved device name"),
    ("aux.d/x.png", "reserved device name"),
    ("aux /x.png", "ends with a dot or a space"),
    ("invoice\u202egnp.exe.png", "RIGHT-TO-LEFT OVERRIDE"),
    ("a\u2066b.png", "invisible formatting"),
    ("a\u200bb.png", "ZERO WIDTH SPACE"),
    ("what?.png", "Windows does not allow"),
    ('say "hi".png', "Windows does not allow"),
    ("a|b.png", "Windows does not allow"),
    ("x" * 252 + ".png", "over the 255"),
]
ACCEPTED = ["img/hero.png", "img/", "h\u00e9ros/\u00e9t\u00e9.webp", "my picture.png", ".cache/x.png",
            "family-\U0001f468\u200d\U0001f469\u200d\U0001f467.png", "console.png", "nullable/x.jpg", "com10.png"]


@pytest.mark.parametrize(("save_to", "why"), REFUSED)
async def test_a_name_unsafe_on_some_system_is_refused_before_paying(settings, fake, workspace, save_to, why):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": save_to})
    assert result.is_error, text_of(result)
    assert why in text_of(result) and "not a safe file name" in text_of(result)
    assert fake.ledger == []
    assert [p for p in workspace.rglob("*")] == []


async def test_names_safe_everywhere_are_still_written(settings, fake, workspace):
    async with connect(settings, fake) as client:
        results = [await client.call_tool("generate_image", {"prompt": "a red bicycle", "save_to": s})
                   for s in ACCEPTED]
    for save_to, result in zip(ACCEPTED, results, strict=True):
        assert not result.is_error and result.structured_content["status"] == "succeeded", (save_to, text_of(result))
        path = Path(result.structured_content["images"][0]["path"])
        assert path.is_file() and path.is_relative_to(workspace)


async def test_a_prompt_that_spells_a_device_name_gets_a_safe_file_name_in_a_folder(settings, fake, workspace):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "CON", "save_to": "img/"})
    path = Path(result.structured_content["images"][0]["path"])
    assert path.parent == workspace / "img" and path.name == "con-image.png"


async def test_an_existing_folder_with_an_odd_name_is_the_users_own(settings, fake, workspace):
    (workspace / "drafts.").mkdir()  # made by the user, not by the server: not second-guessed
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "drafts./x.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
