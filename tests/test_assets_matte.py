"""Real transparency: the key background, the local matte, its verification, and the whole path offline."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_mcp import matte
from tests.assets_support import opened, painted_checkerboard, png, subject_on
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio

DISC = math.pi * 128**2 / 512**2
"""The share of the 512 px frame the synthetic subject (a 128 px radius disc) covers."""


def _alpha(im: Image.Image) -> np.ndarray:
    return np.asarray(im.getchannel("A"))


# --- the matte, on synthetic images ------------------------------------------------------------------


def test_a_subject_on_green_gets_a_real_alpha_channel_with_the_right_coverage():
    result = matte.matte(subject_on((20, 235, 40)), "green")
    assert result.failure is None
    alpha = _alpha(result.image)
    assert alpha[0, 0] == 0 and alpha[-1, -1] == 0 and alpha[256, 256] == 255
    assert abs(result.coverage - DISC) < 0.01
    assert abs((alpha >= 128).mean() - DISC) < 0.01


def test_edges_carry_no_green_spill():
    rgba = np.asarray(matte.matte(subject_on((20, 235, 40)), "green").image).astype(int)
    edge = rgba[(rgba[..., 3] > 10) & (rgba[..., 3] < 245)]
    assert len(edge) > 100  # the soft edge is there...
    assert (edge[:, 1] <= np.maximum(edge[:, 0], edge[:, 2]) + 2).all()  # ...without a green fringe


def test_a_green_subject_is_keyed_on_magenta_and_keeps_its_green():
    assert matte.choose_key("a frog on a lily leaf") == "magenta"
    assert matte.choose_key("a fox logo") == "green"
    result = matte.matte(subject_on((240, 20, 230), colour=(40, 200, 60)), "magenta")
    assert result.failure is None and abs(result.coverage - DISC) < 0.01
    r, g, _, a = np.asarray(result.image)[300, 256].astype(int)  # inside the disc, outside the square
    assert a == 255 and g > 150 and g > r + 80


def test_the_prompt_asks_for_the_key_background_and_drops_transparency_words():
    sent = matte.key_prompt("a fox logo on a transparent background", "green", edit=False)
    assert "transparent" not in sent and "flat uniform pure green (#00FF00) chroma-key background" in sent
    assert matte.key_of_prompt(sent) == ("green", "a fox logo")
    edit = matte.key_prompt("the same mug", "magenta", edit=True)
    assert "Replace the whole background" in edit and matte.key_of_prompt(edit) == ("magenta", "the same mug")


@pytest.mark.parametrize("cell", [6, 16, 32])
def test_the_checkerboard_detector_flags_a_painted_fake_transparency(cell):
    fake = painted_checkerboard(cell=cell)
    assert matte.checkerboard(np.asarray(fake, dtype=np.float32))
    assert "checkerboard" in (matte.matte(fake, "green").failure or "")


def test_the_checkerboard_detector_passes_a_real_matte_and_natural_pictures():
    real = matte.matte(subject_on((20, 235, 40)), "green").image
    px = np.asarray(real, dtype=np.float32)
    assert not matte.checkerboard(px[..., :3], px[..., 3] >= 200)
    assert matte.verify(real).failure is None
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (512, 512, 3)).astype(np.float32)
    stripes = np.zeros((512, 512, 3), np.float32)
    stripes[:, (np.arange(512) // 12) % 2 == 1] = 210
    gradient = np.repeat(np.linspace(0, 255, 512, dtype=np.float32)[None, :, None], 512, axis=0).repeat(3, 2)
    assert not any(matte.checkerboard(p) for p in (noise, stripes, gradient))


def test_verification_flags_a_checkerboard_baked_into_the_opaque_part():
    im = painted_checkerboard(cell=16).convert("RGBA")
    alpha = np.zeros((512, 512), np.uint8)
    alpha[64:448, 64:448] = 255  # "transparent" only at the margin; the squares inside are opaque
    im.putalpha(Image.fromarray(alpha))
    assert "checkerboard" in (matte.verify(im).failure or "")


def test_a_background_that_is_not_the_key_fails_plainly():
    result = matte.matte(subject_on((200, 200, 210)), "green")
    assert result.failure is not None and "not the green key colour" in result.failure
    assert matte.verify(Image.new("RGB", (64, 64))).failure == "the image has no alpha channel"
    empty = Image.new("RGBA", (128, 128), (0, 255, 0, 0))
    empty.putpixel((0, 0), (0, 0, 0, 255))
    assert "no subject" in (matte.verify(empty).failure or "")


# --- the whole path, through the MCP client -----------------------------------------------------------


async def test_a_fox_logo_with_transparent_true_is_a_verified_png_in_the_project(make_settings, workspace):
    async with connect(make_settings()) as client:  # no key: the offline placeholder
        result = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                           "save_to": "public/logo.png"})
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert data["provider"] == "placeholder" and data["status"] == "succeeded" and data["error"] is None
    with opened(workspace / "public" / "logo.png") as logo:
        assert logo.format == "PNG" and logo.mode == "RGBA" and logo.size == (1024, 1024)
        alpha = _alpha(logo)
        assert alpha[:8].max() == 0 and alpha[:, :8].max() == 0  # the background is really clear
        assert alpha[512, 512] == 255  # the subject is really opaque
        assert 0.05 < (alpha >= 128).mean() < 0.8
        assert matte.verify(logo).failure is None
        assert logo.info["transparent"] == "true" and logo.info["prompt"] == "a fox logo"
    with opened(workspace / "public" / "logo.unmatted.png") as original:  # kept beside it
        assert original.mode == "RGB"
        r, g, b = original.getpixel((4, 4))
        assert g > 200 and r < 60 and b < 60  # the key background it was matted from
    assert data["images"][0]["path"] == str(workspace / "public" / "logo.png")
    assert data["files"] == ["public/logo.unmatted.png"]
    assert "matted and verified" in text_of(result) and "matted and verified" in data["message"]


async def test_a_model_that_ignores_the_key_gets_a_plain_failure_not_a_fake(settings, workspace):
    """The Atlas Cloud fake paints flat red whatever it is asked: no key background, so no matte."""
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                           "save_to": "public/logo.png"})
    data = result.structured_content
    assert data["status"] == "succeeded" and len(fake.ledger) == 1  # paid for, and kept
    assert "FAILED verification" in data["error"] and "not the green key colour" in data["error"]
    assert "FAILED verification" in text_of(result)
    assert not (workspace / "public" / "logo.png").exists()  # no fake transparency where the code looks
    unmatted = workspace / "public" / "logo.unmatted.png"
    assert data["images"][0]["path"] == str(unmatted) and opened(unmatted).size == (1024, 1024)
    assert "flat uniform pure green (#00FF00) chroma-key background" in fake.ledger[0]["prompt"]


class _CheckerPainter(AtlasFake):
    """A provider that answers "transparent background" with a painted checkerboard."""

    def image_bytes(self) -> bytes:
        return png(painted_checkerboard(1024, 32))


async def test_a_painted_checkerboard_is_named_as_such(settings, workspace):
    async with connect(settings, _CheckerPainter(key=ATLAS_KEY)) as client:
        result = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                           "save_to": "public/"})
    assert "painted a checkerboard" in result.structured_content["error"], text_of(result)


async def test_transparent_on_an_image_to_image_edit_is_refused_before_paying_naming_what_can(settings, workspace):
    (workspace / "cat.png").write_bytes(png(subject_on((90, 90, 90))))
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("edit_image", {"prompt": "the cat", "image": "cat.png", "transparent": True,
                                                       "model": "black-forest-labs/flux-schnell"})
    assert result.is_error and "image-to-image, which keeps the input's background" in text_of(result)
    assert "atlascloud black-forest-labs/flux-kontext-dev" in text_of(result)
    assert fake.requests == []  # not even the upload


async def test_transparent_into_a_jpeg_is_refused_before_paying(settings):
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                           "save_to": "public/logo.jpg"})
    assert result.is_error and "use .png or .webp" in text_of(result) and fake.requests == []


async def test_a_deleted_transparent_image_comes_back_matted_from_its_kept_original(make_settings, workspace):
    async with connect(make_settings()) as client:
        made = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                         "save_to": "public/logo.png"})
        logo, beside = workspace / "public" / "logo.png", workspace / "public" / "logo.unmatted.png"
        first = logo.read_bytes()
        logo.unlink()
        beside.unlink()
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": made.structured_content["prediction_id"]})
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert logo.read_bytes() == first and beside.is_file()
    with opened(logo) as im:
        assert matte.verify(im).failure is None


async def test_prune_removes_the_kept_unmatted_original_too(make_settings, home):
    from flux_mcp.journal import open_journal
    from flux_mcp.prune import prune
    from flux_mcp.store import FolderStore

    async with connect(make_settings()) as client:
        made = await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True})
    [original] = made.structured_content["files"]
    assert "unmatted" not in original and original.endswith("-1000.png") and Path(original).is_file()
    journal = open_journal(home)
    try:
        done = await prune(journal, FolderStore(home), older_than_days=0, now=time.time() + 60)
    finally:
        await journal.close()
    assert original in done.files and not Path(original).exists()
    assert not Path(made.structured_content["images"][0]["path"]).exists()
