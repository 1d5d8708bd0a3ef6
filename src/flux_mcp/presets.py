"""The asset sets of `preset`: one table of what each set generates and which exact files it writes.

One generation makes the set's master image (`Preset.size`); every file of the set is cut from it
at its own size and format, under the `save_to` folder. `Preset.main` is the file the result points
at; `snippet` is the HTML (or manifest) lines to paste, with paths as served from the folder's root.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .request import Preset as PresetId


@dataclass(frozen=True)
class OutFile:
    """One file of a set: its name under the folder, its exact size and format."""

    name: str
    width: int
    height: int
    format: str
    """png, jpg, webp, avif or ico."""
    ico_sizes: tuple[int, ...] = ()
    """For an .ico: the square sizes it holds."""
    opaque: bool = False
    """Flattened onto white: the App Store refuses icons with an alpha channel."""


@dataclass(frozen=True)
class Preset:
    id: PresetId
    size: tuple[int, int]
    """The master image generated (and the aspect ratio every file keeps)."""
    main: str
    files: tuple[OutFile, ...]
    hint: str
    """Appended to the prompt sent (never to the journaled one): what makes a good image of this kind."""
    alpha: bool = False
    """Whether `transparent` suits the set (an icon), not only a photo-like banner."""

    @property
    def square(self) -> bool:
        return self.size[0] == self.size[1]


def _png(name: str, side: int, *, opaque: bool = False) -> OutFile:
    return OutFile(name, side, side, "png", opaque=opaque)


_IOS = (20, 29, 40, 58, 60, 76, 80, 87, 120, 152, 167, 180, 1024)
"""The iOS app icon sizes (iPhone, iPad, Settings, Spotlight, notifications, App Store)."""
_ANDROID = (("mdpi", 48), ("hdpi", 72), ("xhdpi", 96), ("xxhdpi", 144), ("xxxhdpi", 192))
"""The Android launcher icon densities (48 dp)."""
HERO_WIDTHS = (640, 1280, 1920)


@cache
def avif_supported() -> bool:
    from PIL import features

    return bool(features.check("avif"))


def _hero_files() -> tuple[OutFile, ...]:
    formats = ("avif", "webp", "jpg") if avif_supported() else ("webp", "jpg")
    return tuple(OutFile(f"hero-{w}.{ext}", w, w * 9 // 16, ext) for ext in formats for w in HERO_WIDTHS)


def presets() -> dict[str, Preset]:
    """Every preset by id (hero's formats depend on whether this Pillow writes AVIF)."""
    return {p.id: p for p in (
        Preset("og-image", (1200, 630), "og-image.png", (OutFile("og-image.png", 1200, 630, "png"),),
               "a social share banner, the subject clear at thumbnail size"),
        Preset("twitter-card", (1200, 600), "twitter-card.png", (OutFile("twitter-card.png", 1200, 600, "png"),),
               "a social share banner, the subject clear at thumbnail size"),
        Preset("favicon", (512, 512), "icon-512.png", (
            OutFile("favicon.ico", 48, 48, "ico", ico_sizes=(16, 32, 48)),
            _png("favicon-16x16.png", 16), _png("favicon-32x32.png", 32), _png("favicon-48x48.png", 48),
            _png("apple-touch-icon.png", 180), _png("icon-192.png", 192), _png("icon-512.png", 512)),
            "a simple bold flat icon, centered with a margin, legible at 16 pixels", alpha=True),
        Preset("app-icon", (1024, 1024), "ios/AppIcon-1024.png", (
            *(_png(f"ios/AppIcon-{s}.png", s, opaque=True) for s in _IOS),
            *(_png(f"android/mipmap-{d}/ic_launcher.png", s) for d, s in _ANDROID),
            _png("android/ic_launcher-playstore.png", 512)),
            "an app icon: one simple bold shape, centered, no text", alpha=True),
        Preset("hero", (1920, 1080), "hero-1920.jpg", _hero_files(),
               "a wide hero image with calm space for a headline"),
    )}


def snippet(preset: Preset) -> str | None:
    """The lines to paste for the set, its files served from the site's root."""
    if preset.id == "og-image":
        return ('<meta property="og:image" content="/og-image.png"><meta property="og:image:width" '
                'content="1200"><meta property="og:image:height" content="630">')
    if preset.id == "twitter-card":
        return '<meta name="twitter:card" content="summary_large_image"><meta name="twitter:image" ' \
               'content="/twitter-card.png">'
    if preset.id == "favicon":
        return ('<link rel="icon" href="/favicon.ico" sizes="any">\n'
                '<link rel="apple-touch-icon" href="/apple-touch-icon.png">\n'
                'manifest "icons": [{"src":"/icon-192.png","sizes":"192x192","type":"image/png"},'
                '{"src":"/icon-512.png","sizes":"512x512","type":"image/png"}]')
    if preset.id == "hero":
        def srcset(ext: str) -> str:
            return ", ".join(f"/hero-{w}.{ext} {w}w" for w in HERO_WIDTHS)

        sources = "".join(f'<source type="image/{ext}" srcset="{srcset(ext)}">'
                          for ext in (("avif", "webp") if avif_supported() else ("webp",)))
        return (f'<picture>{sources}<img src="/hero-1920.jpg" srcset="{srcset("jpg")}" sizes="100vw" '
                'width="1920" height="1080" alt=""></picture>')
    return None
