"""Asset sets (`preset`): one generation, every file of the set at its exact size, the snippet to paste."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from flux_mcp.presets import avif_supported, presets
from tests.assets_support import opened, png, tokens
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio


async def _make(make_settings, **arguments):
    async with connect(make_settings()) as client:  # the offline placeholder: the whole path, no key
        return await client.call_tool("generate_image", {"prompt": "a fox logo", **arguments})


async def test_favicon_writes_the_full_set_and_returns_the_snippet(make_settings, workspace):
    result = await _make(make_settings, preset="favicon", save_to="public/")
    assert not result.is_error, text_of(result)
    public = workspace / "public"
    for name, side in [("favicon-16x16.png", 16), ("favicon-32x32.png", 32), ("favicon-48x48.png", 48),
                       ("apple-touch-icon.png", 180), ("icon-192.png", 192), ("icon-512.png", 512)]:
        with opened(public / name) as im:
            assert im.format == "PNG" and im.size == (side, side), name
    with opened(public / "favicon.ico") as ico:
        assert ico.format == "ICO" and sorted(ico.info["sizes"]) == [(16, 16), (32, 32), (48, 48)]
    data = result.structured_content
    assert sorted(data["files"]) == sorted(f"public/{f.name}" for f in presets()["favicon"].files)
    assert data["images"][0]["path"] == str(public / "icon-512.png")
    snippet = data["snippet"]
    assert '<link rel="icon" href="/favicon.ico"' in snippet and 'href="/apple-touch-icon.png"' in snippet
    assert '"src":"/icon-512.png","sizes":"512x512"' in snippet
    text = text_of(result)
    assert snippet in text and "favicon-{16x16,32x32,48x48}.png" in text
    assert tokens(text) < 300, text


async def test_every_srcset_file_of_the_hero_exists_at_its_width(make_settings, workspace):
    result = await _make(make_settings, preset="hero", save_to="web/")
    assert not result.is_error, text_of(result)
    snippet = result.structured_content["snippet"]
    entries = re.findall(r"/(hero-\d+\.(\w+)) (\d+)w", snippet)
    formats = {ext for _, ext, _ in entries}
    assert formats == ({"avif", "webp", "jpg"} if avif_supported() else {"webp", "jpg"})
    assert len(entries) == 3 * len(formats)
    for name, ext, width in entries:
        with opened(workspace / "web" / name) as im:
            assert im.size == (int(width), int(width) * 9 // 16), name
            assert im.format == {"avif": "AVIF", "webp": "WEBP", "jpg": "JPEG"}[ext]
    assert '<img src="/hero-1920.jpg"' in snippet and 'width="1920" height="1080"' in snippet
    assert tokens(text_of(result)) < 300, text_of(result)


async def test_app_icon_writes_ios_and_android_sizes_with_opaque_ios_icons(make_settings, workspace):
    result = await _make(make_settings, preset="app-icon", save_to="app/", transparent=True)
    assert not result.is_error, text_of(result)
    for side in (20, 29, 40, 58, 60, 76, 80, 87, 120, 152, 167, 180, 1024):
        with opened(workspace / "app" / "ios" / f"AppIcon-{side}.png") as im:
            assert im.size == (side, side) and im.mode == "RGB"  # the App Store refuses alpha
    for density, side in [("mdpi", 48), ("hdpi", 72), ("xhdpi", 96), ("xxhdpi", 144), ("xxxhdpi", 192)]:
        with opened(workspace / "app" / "android" / f"mipmap-{density}" / "ic_launcher.png") as im:
            assert im.size == (side, side) and im.mode == "RGBA" and im.getpixel((0, 0))[3] == 0
    assert len(result.structured_content["files"]) == 19
    assert tokens(text_of(result)) < 300, text_of(result)


async def test_twitter_card_is_exactly_1200x600(make_settings, workspace):
    result = await _make(make_settings, preset="twitter-card", save_to="site/")
    assert not result.is_error, text_of(result)
    with opened(workspace / "site" / "twitter-card.png") as im:
        assert im.size == (1200, 600)
    assert 'twitter:image" content="/twitter-card.png"' in result.structured_content["snippet"]


# --- bad input: each refused before anything is paid for ---------------------------------------------


@pytest.mark.parametrize(("arguments", "says"), [
    ({"preset": "og-image", "save_to": "public/og.png"}, "save_to must be a folder, not the file 'public/og.png'"),
    ({"preset": "favicon"}, "pass save_to, e.g. 'public/'"),
    ({"preset": "hero", "save_to": "web/", "transparent": True}, "transparent=true does not suit preset=hero"),
    ({"preset": "favicon", "save_to": "public/", "num_images": 2}, "leave num_images at 1"),
    ({"preset": "favicon", "save_to": "public/", "width": 640, "height": 480}, "leave width and height out"),
])
async def test_bad_preset_input_is_refused_before_paying(settings, arguments, says):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a fox logo", **arguments})
    assert result.is_error and says in text_of(result), text_of(result)
    assert fake.ledger == [] and fake.requests == []


async def test_a_set_that_would_replace_files_is_refused_unless_overwrite(settings, workspace):
    (workspace / "public").mkdir()
    (workspace / "public" / "favicon.ico").write_bytes(b"mine")
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        refused = await client.call_tool("generate_image", {"prompt": "p", "preset": "favicon",
                                                            "save_to": "public/"})
        assert refused.is_error and "public/favicon.ico" in text_of(refused) and "overwrite=true" in \
            text_of(refused)
        assert fake.ledger == []
        replaced = await client.call_tool("generate_image", {"prompt": "p", "preset": "favicon",
                                                             "save_to": "public/", "overwrite": True})
    assert not replaced.is_error, text_of(replaced)
    assert (workspace / "public" / "favicon.ico").read_bytes()[:4] == b"\x00\x00\x01\x00"  # an .ico now


async def test_favicon_from_a_non_square_image_is_refused_before_paying(settings, workspace):
    (workspace / "banner.png").write_bytes(png(Image.new("RGB", (1200, 630), (30, 60, 90))))
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "as an icon", "image": "banner.png",
                                                       "preset": "favicon", "save_to": "public/"})
    assert result.is_error and "preset=favicon needs a square image, but banner.png is 1200x630" in \
        text_of(result)
    assert "generate_image with preset='favicon'" in text_of(result)
    assert fake.requests == []  # nothing paid, nothing even uploaded


async def test_a_deleted_set_is_written_again_by_check_prediction(make_settings, workspace):
    async with connect(make_settings()) as client:
        made = await client.call_tool("generate_image", {"prompt": "a fox logo", "preset": "favicon",
                                                         "save_to": "public/"})
        public = workspace / "public"
        before = {p.name: p.read_bytes() for p in public.iterdir()}
        (public / "icon-512.png").unlink()
        (public / "favicon.ico").unlink()
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": made.structured_content["prediction_id"]})
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert {p.name: p.read_bytes() for p in public.iterdir()} == before
    assert again.structured_content["files"] == made.structured_content["files"]


def test_the_terminal_takes_preset_and_transparent_as_flags():
    from flux_mcp.cli import _parser

    args = _parser().parse_args(["generate", "a fox logo", "--preset", "favicon", "--transparent", "-o", "public/"])
    assert (args.preset, args.transparent, args.save_to) == ("favicon", True, "public/")
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "p", "--preset", "banner"])
