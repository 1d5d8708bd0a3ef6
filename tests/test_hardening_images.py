"""Images a provider might really send: pixel bombs within the pixel limit, many at once, rotated
JPEGs, 16-bit grayscale, CMYK, palette transparency, animations — kept faithfully and within memory."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flux_mcp.media import make_preview
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
ORIENTATION = 0x0112


class ServesImage(AtlasFake):
    """The Atlas Cloud fake, answering every job with the given image file."""

    def __init__(self, data: bytes):
        super().__init__(key=ATLAS_KEY)
        self.data = data

    def image_bytes(self) -> bytes:
        return self.data


def encoded(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    """A 40x20 landscape JPEG whose EXIF says: show me turned 90 degrees (Orientation 6), from a camera."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "CameraMaker"  # Make
    im = Image.new("RGB", (40, 20), (200, 30, 30))
    im.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left, to tell the sides apart
    return encoded(im, "JPEG", exif=exif.tobytes(), quality=95)


def gray16() -> bytes:
    return encoded(Image.new("I;16", (32, 32), 30000), "PNG")  # mid-gray: 30000 of 65535


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK


def transparent_gif() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), index 1 red
    im.paste(1, (8, 0, 16, 16))
    return encoded(im, "GIF", transparency=0)


def animated_gif(frames: int = 3) -> bytes:
    images = [Image.new("P", (16, 16), i) for i in range(frames)]
    for im in images:
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    return encoded(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


async def generate(settings, data: bytes, save_to: str | None = None, **args) -> dict:
    fake = ServesImage(data)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", **({"save_to": save_to} if save_to else {}),
                                                           **args})
    return {"data": result.structured_content, "text": text_of(result), "result": result}


# --- fidelity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_to", [None, "out/r.png", "out/r.webp", "out/r.jpg"])
async def test_the_providers_exif_orientation_survives_keeping_and_converting(settings, save_to):
    got = await generate(settings, rotated_jpeg(), save_to)
    path = Path(got["data"]["images"][0]["path"])
    with Image.open(path) as im:
        exif = im.getexif()
    assert exif.get(ORIENTATION) == 6 and exif.get(0x010F) == "CameraMaker"
    assert exif.get(0x010E) == "p" and exif.get(0x0131) == "flux-mcp"  # the provenance, merged in


def test_a_rotated_jpegs_preview_is_upright(tmp_path):
    preview, mime = make_preview(tmp_path / "x.jpg", 500, rotated_jpeg())  # too small a budget: re-encoded
    with Image.open(io.BytesIO(preview)) as im:
        assert mime == "image/jpeg" and im.size == (20, 40)
        r, _, b = im.convert("RGB").getpixel((10, 2))  # the band that was on the left is on top now
    assert b > 150 and r < 100


@pytest.mark.parametrize("save_to", ["out/g.jpg", "out/g.webp"])
async def test_16_bit_grayscale_is_scaled_not_clipped_to_white(settings, save_to):
    got = await generate(settings, gray16(), save_to)
    with Image.open(Path(got["data"]["images"][0]["path"])) as im:
        value = im.convert("L").getpixel((16, 16))
    assert 105 <= value <= 130  # 30000/65535 of 255 is 117


def test_16_bit_grayscale_previews_are_gray(tmp_path):
    preview, _ = make_preview(tmp_path / "g.png", 50, gray16())  # re-encoded: over the budget
    with Image.open(io.BytesIO(preview)) as im:
        assert 105 <= im.convert("L").getpixel((16, 16)) <= 130


async def test_a_cmyk_result_is_previewed_in_rgb_and_saved_as_png(settings):
    got = await generate(settings, cmyk_jpeg(), "out/c.png")
    [preview] = [b for b in got["result"].content if b.type == "image"]
    with Image.open(io.BytesIO(base64.b64decode(preview.data))) as im:
        assert im.mode in ("RGB", "L")
        r, g, b = im.convert("RGB").getpixel((16, 16))
    assert r > 180 and g < 90 and b < 90
    with Image.open(Path(got["data"]["images"][0]["path"])) as saved:
        assert saved.format == "PNG" and saved.mode == "RGB"


async def test_palette_transparency_becomes_alpha_or_white(settings, workspace):
    webp = await generate(settings, transparent_gif(), "out/t.webp")
    jpg = await generate(settings, transparent_gif(), "out/t.jpg")
    with Image.open(Path(webp["data"]["images"][0]["path"])) as im:
        assert im.mode == "RGBA" and im.getpixel((2, 2))[3] == 0 and im.getpixel((12, 2))[3] == 255
    with Image.open(Path(jpg["data"]["images"][0]["path"])) as im:
        assert min(im.convert("RGB").getpixel((2, 2))) > 230  # transparent -> white, not black
        assert im.convert("RGB").getpixel((12, 2))[0] > 200


async def test_an_animated_image_saved_as_png_says_its_frames_were_dropped(settings):
    got = await generate(settings, animated_gif(3), "out/a.png")
    assert got["data"]["status"] == "succeeded"
    assert Path(got["data"]["images"][0]["path"]).is_file()
    assert "animated (3 frames)" in got["data"]["error"] and "first frame" in got["data"]["error"]
    assert "animated (3 frames)" in got["text"]


async def test_a_still_image_gets_no_frame_note(settings):
    got = await generate(settings, gray16(), "out/s.webp")
    assert got["data"]["error"] is None


async def test_a_provider_may_answer_larger_than_asked_within_reason(settings):
    """FLUX Ultra answers ~4 MP whatever the size asked; the bound never refuses that."""
    got = await generate(settings, encoded(Image.new("RGB", (2752, 1536), (9, 9, 9)), "PNG"), width=256, height=256)
    assert got["data"]["status"] == "succeeded" and got["data"]["images"][0]["path"], got["text"]
    assert (got["data"]["images"][0]["width"], got["data"]["images"][0]["height"]) == (2752, 1536)


# --- memory ----------------------------------------------------------------------------------------

PROBE = r"""
import io, json, sys, tempfile
from pathlib import Path
import anyio, httpx2
from mcp import Client
from PIL import Image
from flux_mcp.config import Settings
from flux_mcp.server import build_server
from tests.fakes.atlascloud import AtlasFake

jobs, kind, ext = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind == "bomb":  # 10000 x 10000 pixels in a few hundred kB: exactly the pixel limit
    buf = io.BytesIO(); Image.new("1", (10000, 10000)).save(buf, "PNG", optimize=True)
else:  # a legitimate large result (2048 x 2048, photo-like gradient)
    buf = io.BytesIO(); Image.linear_gradient("L").resize((2048, 2048)).convert("RGB").save(buf, "PNG")
data = buf.getvalue()

class Serves(AtlasFake):
    def image_bytes(self):
        return data

def status_mb(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

def reset_peak():
    # The high-water mark of this process's own memory: getrusage's can carry the parent's over the exec.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status_mb("VmRSS")

def peak_mb():
    return status_mb("VmHWM")

async def main():
    tmp = Path(tempfile.mkdtemp()); (tmp / "ws").mkdir()
    key = "k" * 24
    settings = Settings.from_env({"FLUX_MCP_HOME": str(tmp / "home"), "ATLASCLOUD_API_KEY": key,
                                  "ATLASCLOUD_BASE_URL": "http://atlas.test"}, cwd=tmp / "ws")
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(Serves(key=key).handle))
    async with Client(build_server(settings, http_client=http)) as client:
        await client.call_tool("generate_image", {"prompt": "warm up", "width": 64, "height": 64})
        base = max(reset_peak(), peak_mb())
        results = []
        async def one(i):
            results.append(await client.call_tool("generate_image", {"prompt": f"job {i}", "save_to": f"o/{i}.{ext}"}))
        async with anyio.create_task_group() as tg:
            for i in range(jobs):
                tg.start_soon(one, i)
    print(json.dumps({"delta_mb": peak_mb() - base, "results": [r.structured_content for r in results]}))

anyio.run(main)
"""


def probe(jobs: int, kind: str, ext: str) -> dict:
    """Peak memory (RSS high-water mark) added by `jobs` concurrent generate_image calls, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLUX_MCP_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(jobs), kind, ext], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LINUX_MEMORY = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


@LINUX_MEMORY
@pytest.mark.subprocess
def test_a_pixel_bomb_within_the_pixel_limit_is_refused_unread():
    got = probe(1, "bomb", "webp")
    [result] = got["results"]
    assert result["images"][0]["path"] is None
    assert "10000x10000" in result["error"] and "far larger than the size asked for" in result["error"]
    assert got["delta_mb"] < 100, got["delta_mb"]  # decoding it would take 300 MB and more


@LINUX_MEMORY
@pytest.mark.subprocess
def test_four_concurrent_large_conversions_take_no_more_memory_than_two():
    """Image work is bounded process-wide (two at a time): twice the calls, not twice the memory."""
    two = probe(2, "large", "webp")
    four = probe(4, "large", "webp")
    assert all(r["status"] == "succeeded" and r["images"][0]["path"] for r in two["results"] + four["results"])
    assert two["delta_mb"] > 30, two  # the work is measurable at all (~13 MB of pixels per image)
    assert four["delta_mb"] < 1.4 * two["delta_mb"], (two["delta_mb"], four["delta_mb"])
