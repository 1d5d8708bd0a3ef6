"""Real transparency, made locally: the subject is generated on a flat key colour, then matted here.

Asked for "a transparent background", image models paint a grey-and-white checkerboard: a picture
of transparency, opaque in the file. So the model is asked for a flat chroma-key background instead
(`key_prompt`), and this module turns that into alpha:

1. the key colour actually painted is measured on the image border (models never paint #00FF00
   exactly, and shade it);
2. a colour-difference keyer (green: G - max(R, B); magenta: min(R, B) - G, relative to the
   border's own value) gives a soft alpha: subject, background, and the mixed pixels between;
3. mixed pixels are decontaminated (the key's share of their colour is taken out) and the edge band
   despilled (no green or magenta fringe), then the edge is feathered inwards by a fraction of a pixel;
4. the result is verified (`verify`): an alpha channel with both opaque and clear pixels, a subject
   that is neither empty nor the whole frame, a mostly clear border, and no painted checkerboard
   left (`checkerboard`). A failed check is reported as such, never delivered as transparent.

Green is the default key (the usual chroma key, and rare in logos and products); magenta is used
when the prompt asks for green things (plants, frogs, emerald...), which a green key would eat.
numpy and Pillow are imported on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

KEYS: dict[str, tuple[int, int, int]] = {"green": (0, 255, 0), "magenta": (255, 0, 255)}
KEY_NAMES = {"green": "pure green (#00FF00)", "magenta": "pure magenta (#FF00FF)"}

_GREEN_WORDS = re.compile(
    r"\b(green\w*|lime|emerald|jade|olive|mint|sage|teal|turquoise|cyan|aqua|chartreuse|leaf|leaves|leafy|"
    r"foliage|grass\w*|lawn|forest|jungle|plant\w*|tree|trees|moss\w*|fern\w*|ivy|clover|shamrock|cactus|"
    r"succulent|frog\w*|lizard\w*|gecko|turtle|dinosaur|alien|avocado|broccoli|lettuce|cucumber|pickle|"
    r"kiwi|pear|apple tree|matcha|grinch|hulk|yoda|shrek)\b", re.IGNORECASE)
_MAGENTA_WORDS = re.compile(r"\b(magenta|pink\w*|fuchsia|purple|violet|lilac|lavender|orchid|raspberry|"
                            r"flamingo\w*)\b", re.IGNORECASE)
_TRANSPARENCY_WORDS = re.compile(
    r"[,;.]?\s*(on |with |against )?(a |an )?(fully |completely )?(transparent|see-through|clear|no|alpha|"
    r"without( a)?) (png )?(background|backdrop|bg)( \(png\))?|,?\s*(transparent png|png with (alpha|"
    r"transparency)|with transparency|isolated on transparent)", re.IGNORECASE)
_KEY_MARK = re.compile(r"flat uniform pure (green|magenta) \(#([0-9A-F]{6})\) chroma-key", re.IGNORECASE)

BORDER = 0.02
"""The border band measured for the key colour: this share of the shorter side (at least 2 px)."""
MIN_KEY = 60.0
"""A border whose key strength (e.g. G - max(R, B)) is below this was not painted in the key colour."""
MIN_COVERAGE, MAX_COVERAGE = 0.005, 0.95
"""A subject covering less than 0.5% of the frame is empty; more than 95% means no background was found."""
MIN_CLEAR_BORDER = 0.5
"""At least half of the border must come out clear: the subject stands on the background."""


def choose_key(prompt: str) -> str:
    """Green, unless the prompt asks for more green things than magenta ones."""
    greens = len(_GREEN_WORDS.findall(prompt))
    return "magenta" if greens > len(_MAGENTA_WORDS.findall(prompt)) else "green"


def key_prompt(prompt: str, key: str, *, edit: bool) -> str:
    """The prompt sent to the model: the subject on a flat key background. Words asking for a
    "transparent background" are dropped (they are what makes models paint a checkerboard)."""
    cleaned = _TRANSPARENCY_WORDS.sub("", prompt).strip(" ,;.") or prompt
    colour = KEY_NAMES[key]
    backdrop = f"flat uniform {colour} chroma-key"
    if edit:
        return f"{cleaned}. Replace the whole background with a {backdrop} backdrop; keep the subject as it is."
    return (f"{cleaned}. The subject isolated and fully in frame with a margin, on a {backdrop} background, "
            "even lighting, crisp edges, no cast shadow.")


def key_of_prompt(prompt: str) -> tuple[str, str] | None:
    """(the key's name, the prompt without the key instruction) when `prompt` asks for a key background."""
    m = _KEY_MARK.search(prompt)
    if m is None:
        return None
    before = prompt[: m.start()]
    for cut in (". The subject isolated", ". Replace the whole background"):
        if cut in before:
            before = before[: before.index(cut)]
    return m.group(1).lower(), before.strip()


@dataclass
class Matte:
    """A matted image and what verifying it found."""

    image: Image
    """RGBA."""
    coverage: float
    """Share of the frame the subject covers (alpha >= 50%)."""
    failure: str | None = None
    """Why the matte is not a real transparent image; None: verified."""


def matte(rgb: Image, key: str, *, allow_checkers: bool = False) -> Matte:
    """Mattes `rgb` (the subject on the `key` background) and verifies the result."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageFilter

    px = np.asarray(rgb.convert("RGB"), dtype=np.float32)
    height, width = px.shape[:2]
    strength = _key_strength(px, key)
    ring = _border(height, width)
    painted = np.median(px[ring], axis=0)
    level = float(np.median(strength[ring]))
    if level < MIN_KEY:
        checkers = not allow_checkers and checkerboard(px)
        why = ("the model painted a checkerboard 'transparency' pattern instead of the key background"
               if checkers else f"the background is not the {key} key colour the model was asked for "
                                f"(its border is {_hex(painted)})")
        return Matte(rgb.convert("RGBA"), 1.0, why)
    low, high = 0.3 * level, 0.65 * level
    alpha = 1.0 - np.clip((strength - low) / (high - low), 0.0, 1.0)

    # Decontaminate mixed pixels: C = a*F + (1-a)*K, so F = (C - (1-a)*K) / a.
    mixed = (alpha > 0.02) & (alpha < 0.98)
    a = alpha[mixed][:, None]
    px[mixed] = np.clip((px[mixed] - (1.0 - a) * painted) / a, 0.0, 255.0)
    # Despill the edge band (a few pixels around every edge): no key-coloured fringe.
    edge = PILImage.fromarray(((alpha < 0.98) * 255).astype(np.uint8)).filter(
        ImageFilter.BoxBlur(max(1, min(height, width) // 300)))  # a dilation (any neighbour is clear)
    band = (np.asarray(edge) > 0) & (alpha > 0.02)
    _despill(px, band, key)

    matte8 = PILImage.fromarray(np.round(alpha * 255).astype(np.uint8))
    feathered = np.minimum(np.asarray(matte8), np.asarray(matte8.filter(ImageFilter.GaussianBlur(0.6))))
    rgba = np.dstack([np.round(px).astype(np.uint8), feathered])
    out = PILImage.fromarray(rgba, "RGBA")
    return verify(out, allow_checkers=allow_checkers)


def verify(image: Image, *, allow_checkers: bool = False) -> Matte:
    """Checks that `image` is really transparent where it should be (see the module docstring)."""
    import numpy as np

    if image.mode != "RGBA":
        return Matte(image, 1.0, "the image has no alpha channel")
    px = np.asarray(image, dtype=np.float32)
    alpha = px[..., 3]
    coverage = float((alpha >= 128).mean())
    ring = _border(*alpha.shape)
    if alpha.min() > 12 or alpha.max() < 243:
        return Matte(image, coverage, "the alpha channel has no fully clear and opaque parts")
    if coverage < MIN_COVERAGE:
        return Matte(image, coverage, f"no subject was left ({coverage:.1%} of the frame is opaque)")
    if coverage > MAX_COVERAGE:
        return Matte(image, coverage, f"no background was removed ({coverage:.0%} of the frame is opaque)")
    clear = float((alpha[ring] < 128).mean())
    if clear < MIN_CLEAR_BORDER:
        return Matte(image, coverage, f"the subject is not on a background (only {clear:.0%} of the border "
                                      "came out clear)")
    if not allow_checkers and checkerboard(px[..., :3], alpha >= 200):
        return Matte(image, coverage, "a painted checkerboard 'transparency' pattern is left in the image")
    return Matte(image, coverage)


def checkerboard(px: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Whether `px` (HxWx3) holds a painted grey-and-white checkerboard (a fake transparency) over a
    real share of its area (`mask`: the pixels to look at).

    A checkerboard of cell size s is the one pattern whose pixels differ from the pixel s away (in x
    and in y) but equal the pixel 2s away and the one diagonally s away; natural images change more,
    not less, with distance. The test runs on sampled rows and columns, for cell sizes from 3 px to
    a sixth of the shorter side, over low-saturation pixels only (the fake is always grey).
    """
    import numpy as np

    height, width = px.shape[:2]
    if min(height, width) < 24:
        return False
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    grey = (r + g + b) / 3.0
    top = np.maximum(np.maximum(r, g), b)
    usable = top - np.minimum(np.minimum(r, g), b) < 0.15 * top + 8  # grey pixels only
    if mask is not None:
        usable &= mask
    rows = np.unique(np.linspace(0, height - 1, min(height, 97)).astype(int))
    cols = np.unique(np.linspace(0, width - 1, min(width, 97)).astype(int))
    if usable.sum() < 0.03 * height * width:
        return False
    lines = ((grey[rows, :], usable[rows, :]), (grey[:, cols].T, usable[:, cols].T))
    sizes = sorted({round(3 * 1.06 ** i) for i in range(80) if 3 * 1.06 ** i <= min(height, width) / 6})
    return any(all(_axis_checker(g, ok, s) for g, ok in lines) and _diagonal_checker(grey, usable, rows, s)
               for s in sizes)


_CONTRAST = 10.0
"""Grey levels that count as a different square."""


def _axis_checker(g: np.ndarray, ok: np.ndarray, s: int) -> bool:
    """Along sampled lines: pixels s apart differ and 2s apart match, over most textured pixels and a
    real share of all of them."""
    import numpy as np

    n = g.shape[1] - 2 * s
    if n <= 0:
        return False
    here, near, far = g[:, :n], g[:, s:s + n], g[:, 2 * s:2 * s + n]
    valid = ok[:, :n] & ok[:, s:s + n] & ok[:, 2 * s:2 * s + n]
    d1, d2 = np.abs(near - here), np.abs(far - here)
    differs = valid & (d1 > _CONTRAST)
    textured = differs | (valid & (d2 > _CONTRAST))
    hits = int((differs & (d2 < _CONTRAST / 2)).sum())
    total = int(textured.sum())
    return total > 0 and hits / total > 0.6 and hits / valid.size > 0.02


def _diagonal_checker(grey: np.ndarray, usable: np.ndarray, rows: np.ndarray, s: int) -> bool:
    """Diagonal neighbours (s, s) are the same colour on a checkerboard, where the side neighbour is not."""
    import numpy as np

    rows = rows[rows + s < grey.shape[0]]
    if len(rows) == 0:
        return False
    w = grey.shape[1] - s
    here, diag, side = grey[rows, :w], grey[rows + s, s:], grey[rows, s:]
    valid = usable[rows, :w] & usable[rows + s, s:] & usable[rows, s:]
    flips = valid & (np.abs(side - here) > _CONTRAST)
    same = flips & (np.abs(diag - here) < _CONTRAST / 2)
    return int(same.sum()) > 0.6 * max(int(flips.sum()), 1)


def _key_strength(px: np.ndarray, key: str) -> np.ndarray:
    import numpy as np

    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    if key == "green":
        out: np.ndarray = g - np.maximum(r, b)
    else:
        out = np.minimum(r, b) - g
    return out


def _despill(px: np.ndarray, where: np.ndarray, key: str) -> None:
    """Takes the key colour's excess out of `where`: green G - max(R, B), magenta min(R, B) - G."""
    import numpy as np

    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    if key == "green":
        spill = np.where(where, np.maximum(g - np.maximum(r, b), 0.0), 0.0)
        px[..., 1] = g - spill
    else:
        spill = np.where(where, np.maximum(np.minimum(r, b) - g, 0.0), 0.0)
        px[..., 0] = r - spill
        px[..., 2] = b - spill


def _border(height: int, width: int) -> Any:
    import numpy as np

    band = max(2, int(min(height, width) * BORDER))
    ring = np.zeros((height, width), dtype=bool)
    ring[:band, :] = ring[-band:, :] = True
    ring[:, :band] = ring[:, -band:] = True
    return ring


def _hex(rgb: Any) -> str:
    return "#" + "".join(f"{round(float(c)):02X}" for c in rgb)
