"""What the tests/test_assets_*.py files share: fakes that render the size they are asked for, synthetic
images (a subject on a key colour, a painted checkerboard), and a crude token count for result texts."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx2
from PIL import Image, ImageDraw, ImageFilter

from tests.fakes.base import FakeBase

RATIO_PIXELS = 1024 * 1024
"""Aspect-ratio models render about one megapixel, on a 16 px grid."""


def asked_size(body: dict[str, Any]) -> tuple[int, int] | None:
    """The pixel size a provider renders for a request body: `size` "W*H"/"WxH", width/height, or a ratio."""
    size = body.get("size")
    if isinstance(size, str) and (m := re.fullmatch(r"(\d+)[*x](\d+)", size)):
        return int(m.group(1)), int(m.group(2))
    ratio = body.get("aspect_ratio") or (size if isinstance(size, str) and ":" in size else None)
    if isinstance(ratio, str) and (m := re.fullmatch(r"(\d+):(\d+)", ratio)):
        a, b = int(m.group(1)), int(m.group(2))
        w = math.sqrt(RATIO_PIXELS * a / b)
        return round(w / 16) * 16, round(w * b / a / 16) * 16
    if isinstance(body.get("width"), int) and isinstance(body.get("height"), int):
        return body["width"], body["height"]
    return None


class Sized:
    """A fake whose images come at the size each paid request asked for (as a real provider renders)."""

    def __init__(self, fake: FakeBase):
        self.fake = fake

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.content:
            try:
                body = json.loads(request.content)
            except ValueError:
                body = None
            if isinstance(body, dict):
                size = asked_size({**body.get("input", {}), **body})
                if size is not None:
                    self.fake.image_size = size  # type: ignore[attr-defined]
        return await self.fake.handle(request)


class Router:
    """Several provider fakes behind one transport, by host (each provider's base URL has its own)."""

    def __init__(self, **fakes: Any):
        self.fakes = fakes

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        return await self.fakes[request.url.host].handle(request)


def subject_on(background: tuple[int, int, int], size: int = 512, *, radius: int = 128,
               colour: tuple[int, int, int] = (220, 90, 30)) -> Image.Image:
    """A disc (with a darker square on it) on a flat background, its edges softened like a render's."""
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    c = size // 2
    d.ellipse((c - radius, c - radius, c + radius, c + radius), fill=colour)
    d.rectangle((c - radius // 3, c - radius // 3, c + radius // 3, c + radius // 3), fill=(30, 40, 160))
    return im.filter(ImageFilter.GaussianBlur(1.2))


def painted_checkerboard(size: int = 512, cell: int = 16) -> Image.Image:
    """What models paint when asked for a transparent background: the subject on grey-and-white squares."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for y in range(0, size, cell):
        for x in range(0, size, cell):
            if (x // cell + y // cell) % 2:
                d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(204, 204, 204))
    c = size // 2
    d.ellipse((c - size // 4, c - size // 4, c + size // 4, c + size // 4), fill=(220, 90, 30))
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def tokens(text: str) -> int:
    """A deliberately generous token count: every word and every punctuation mark is one."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def opened(path: Path | str) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im
