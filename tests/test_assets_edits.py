"""Edits you can compare (one before/after preview), variations of a file flux-mcp made, `flux-mcp info`."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from flux_mcp import cli
from flux_mcp.provenance import read
from tests.assets_support import Sized, opened, png
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio

RED = (220, 20, 20)


def _preview(result) -> Image.Image:
    [block] = [b for b in result.content if b.type == "image"]
    im = Image.open(io.BytesIO(base64.b64decode(block.data)))
    im.load()
    return im


async def test_the_preview_of_an_edit_shows_the_input_beside_the_result(make_settings, workspace):
    (workspace / "red.png").write_bytes(png(Image.new("RGB", (300, 200), RED)))
    settings = make_settings()
    async with connect(settings) as client:
        result = await client.call_tool("edit_image", {"prompt": "make it blue", "image": "red.png",
                                                       "width": 600, "height": 400})
    assert not result.is_error, text_of(result)
    preview = _preview(result)
    assert preview.format == "JPEG"
    px = np.asarray(preview.convert("RGB")).astype(int)
    height, width = px.shape[:2]
    before, after = px[:, : width // 2 - 8], px[:, width // 2 + 8:]
    assert width > 1.9 * height  # two images of the same shape, side by side
    assert np.abs(before.mean(axis=(0, 1)) - RED).max() < 12  # the input, on the left
    with opened(result.structured_content["images"][0]["path"]) as edited:
        shown = np.asarray(edited.convert("RGB").resize((after.shape[1], after.shape[0]))).astype(int)
    assert np.abs(after.mean(axis=(0, 1)) - shown.mean(axis=(0, 1))).max() < 12  # the result, on the right
    assert np.abs(after.mean(axis=(0, 1)) - RED).max() > 30
    shown_bytes = next(b for b in result.content if b.type == "image").data
    assert len(base64.b64decode(shown_bytes)) < settings.preview_budget


async def test_check_prediction_of_an_edit_shows_before_and_after_too(make_settings, workspace):
    (workspace / "red.png").write_bytes(png(Image.new("RGB", (256, 256), RED)))
    async with connect(make_settings()) as client:
        done = await client.call_tool("edit_image", {"prompt": "x", "image": "red.png"})
        again = await client.call_tool("check_prediction",
                                       {"prediction_id": done.structured_content["prediction_id"]})
    preview = _preview(again)
    assert preview.width > 1.9 * preview.height


async def test_a_variation_reuses_prompt_model_provider_and_size_with_a_new_seed(make_settings, workspace):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             FLUX_MCP_PROVIDER="placeholder")
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, Sized(fake)) as client:
        first = await client.call_tool("generate_image", {
            "prompt": "a fox logo", "provider": "atlascloud", "model": "black-forest-labs/flux-dev", "seed": 5,
            "width": 1200, "height": 630, "save_to": "art/fox.png"})
        assert not first.is_error, text_of(first)
        again = await client.call_tool("generate_image", {"prompt": "in autumn colours",
                                                          "variation_of": "art/fox.png"})
    assert not again.is_error, text_of(again)
    data = again.structured_content
    assert (data["provider"], data["model"]) == ("atlascloud", "black-forest-labs/flux-dev")
    original, varied = fake.ledger
    assert varied["prompt"] == "a fox logo. in autumn colours" and varied["size"] == original["size"] == "1200*640"
    assert varied["seed"] != 5
    with opened(data["images"][0]["path"]) as im:
        assert im.size == (1200, 630)
        assert im.info["prompt"] == "a fox logo. in autumn colours" and im.info["seed"] == str(varied["seed"])


async def test_a_variation_of_a_file_flux_mcp_did_not_make_is_refused(settings, workspace):
    (workspace / "photo.png").write_bytes(png(Image.new("RGB", (64, 64), RED)))
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "variation_of": "photo.png"})
    assert result.is_error and "carries no flux-mcp provenance" in text_of(result) and fake.requests == []


async def test_a_variation_keeps_transparency(make_settings, workspace):
    async with connect(make_settings()) as client:
        await client.call_tool("generate_image", {"prompt": "a fox logo", "transparent": True,
                                                  "save_to": "logo.png"})
        again = await client.call_tool("generate_image", {"prompt": "a fox logo", "variation_of": "logo.png",
                                                          "save_to": "logo-2.png"})
    assert not again.is_error, text_of(again)
    with opened(workspace / "logo-2.png") as im:
        assert im.mode == "RGBA" and im.getpixel((0, 0))[3] == 0


async def test_flux_mcp_info_prints_the_provenance(make_settings, workspace, capsys):
    async with connect(make_settings()) as client:
        made = await client.call_tool("generate_image", {"prompt": "a fox logo", "seed": 3, "save_to": "fox.jpg"})
    path = workspace / "fox.jpg"
    assert read(path.read_bytes())["prediction_id"] == made.structured_content["prediction_id"]
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: JPEG 1024x1024" in out and "prompt: a fox logo" in out and "seed: 3" in out
    assert "provider: placeholder" in out
    assert cli.main(["info", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"]["prediction_id"] == made.structured_content["prediction_id"]
    assert shown["width"] == 1024 and shown["format"] == "JPEG"


def test_flux_mcp_info_says_when_a_file_has_no_provenance(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    plain.write_bytes(png(Image.new("RGB", (8, 8))))
    assert cli.main(["info", str(plain)]) == 1
    assert "no flux-mcp provenance" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["info", str(tmp_path / "notes.txt")]) == 2
