"""The offline provider: draws a deterministic placeholder image from prompt, seed and size.

Useful with no key at all: layout mock-ups, trying the server out, tests. Its results say plainly
that they are placeholders and which variable to set for real FLUX images.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import textwrap
import uuid
from typing import Any

from ..matte import KEYS, key_of_prompt
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import PLACEHOLDER, key_variables

NOTE = (
    "This is a PLACEHOLDER image drawn offline, not a FLUX generation. For real images set one of "
    f"{key_variables()} in the server's environment."
)


class Placeholder(Provider):
    spec = PLACEHOLDER
    models = (
        ModelInfo(
            "placeholder",
            frozenset({"generate", "edit"}),
            "Deterministic placeholder art: the same prompt, seed and size give the same image.",
            size=Range(16, 4096),
            steps=Range(1, 100),
            guidance=Range(0, 30),
            max_images=4,
            price_usd=0.0,
            render_step=1,
            key_background=frozenset({"generate", "edit"}),
        ),
    )
    default_model = "placeholder"
    default_edit_model = "placeholder"
    accepts_data_uri = True
    allow_unknown_models = False

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        seed = req.seed if req.seed is not None else 0
        # Like a real model, it follows a key-background instruction in the prompt (transparent=true).
        keyed = key_of_prompt(req.prompt)
        key, prompt = keyed if keyed else (None, req.prompt)
        outputs = [
            OutputRef(data=draw(prompt, seed + i, req.width, req.height, edit=req.kind == "edit", key=key),
                      mime_type="image/png")
            for i in range(req.num_images)
        ]
        return Submitted(native_id=uuid.uuid4().hex, state=JobState(status="succeeded", outputs=outputs, cost_usd=0.0))


def draw(prompt: str, seed: int, width: int, height: int, *, edit: bool = False, key: str | None = None) -> bytes:
    """A PNG whose colours and shapes follow from (prompt, seed), labelled as a placeholder. With `key`
    (green or magenta) the subject is drawn on that flat key colour, for the local matte."""
    if key is not None:
        return _on_key(prompt, seed, width, height, key, edit=edit)
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    hue = digest[0] / 255
    top = _rgb(hue, 0.55, 0.85)
    bottom = _rgb((hue + 0.12 + digest[1] / 1020) % 1, 0.65, 0.35)
    from PIL import Image, ImageDraw  # on first use: a server that only lists its tools starts without Pillow

    im = Image.new("RGB", (width, height))
    grad = Image.linear_gradient("L").resize((width, height))
    im.paste(Image.composite(Image.new("RGB", im.size, bottom), Image.new("RGB", im.size, top), grad))
    d = ImageDraw.Draw(im, "RGBA")
    for i in range(6):
        b = digest[2 + i * 4 : 6 + i * 4]
        cx, cy = b[0] / 255 * width, b[1] / 255 * height
        r = (0.08 + b[2] / 255 * 0.25) * min(width, height)
        color = (*_rgb((hue + b[3] / 255 * 0.5) % 1, 0.5, 0.9), 70)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    scale = max(min(width, height) / 1024, 0.05)
    font = _font(max(int(44 * scale), 8))
    small = _font(max(int(28 * scale), 7))
    margin = int(48 * scale) + 4
    label = "PLACEHOLDER EDIT" if edit else "PLACEHOLDER"
    d.text((margin, margin), label, fill=(255, 255, 255, 235), font=font)
    d.text((margin, margin + int(60 * scale) + 6), f"{width}x{height}  seed {seed}", fill=(255, 255, 255, 200),
           font=small)
    chars = max(int((width - 2 * margin) / max(16 * scale, 4)), 10)
    lines = textwrap.wrap(prompt, width=chars)[:8]
    y = height - margin - len(lines) * (int(36 * scale) + 4)
    for line in lines:
        d.text((margin, y), line, fill=(255, 255, 255, 230), font=small)
        y += int(36 * scale) + 4
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _on_key(prompt: str, seed: int, width: int, height: int, key: str, *, edit: bool) -> bytes:
    """A subject (a badge: disc, ring and label) on a flat key background, its edges anti-aliased."""
    from PIL import Image, ImageDraw

    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    # Hues far from the key: reds, oranges and blues on green; yellows to teals on magenta.
    hue = (digest[0] / 255 * 0.12 + (0.55 if digest[1] % 2 else 0.97)) % 1 if key == "green" \
        else 0.12 + digest[0] / 255 * 0.33
    scale = 2  # drawn at twice the size and reduced: soft, mixed edge pixels like a real render's
    w, h = width * scale, height * scale
    im = Image.new("RGB", (w, h), KEYS[key])
    d = ImageDraw.Draw(im)
    side = min(w, h)
    r = side * (0.25 + digest[2] / 255 * 0.1)
    cx, cy = w / 2, h / 2
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(hue, 0.75, 0.85))
    inner = r * 0.62
    d.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=_rgb((hue + 0.5) % 1 if key == "green"
                                                                          else hue, 0.6, 0.35))
    font = _font(max(int(side * 0.045), 8))
    label = "PLACEHOLDER EDIT" if edit else "PLACEHOLDER"
    try:
        d.text((cx, cy), label, fill=(250, 250, 250), font=font, anchor="mm")
    except ValueError:  # a bitmap font (Pillow without FreeType) takes no anchor
        d.text((cx - inner * 0.8, cy), label, fill=(250, 250, 250), font=font)
    im = im.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()
