"""Image bytes: what they really are, their provenance, format conversion, previews that fit.

Pillow is imported on first use, not at start-up (a server that is only listing its tools should
start as fast as the SDK allows). Provenance goes into PNG and JPEG files as metadata chunks
inserted into the bytes as they are, so a provider's image is never re-encoded just to label it;
the provider's own EXIF (its Orientation above all) is kept, with the provenance merged in.

Memory is bounded three ways. An image may decode to at most `pixel_bound` of the size asked for
(a 300 kB PNG can claim 10000x10000 pixels, 300 MB decoded, and more for every copy made while
converting). Previews of JPEGs are decoded at a reduced scale. And every decode and encode runs on
one of `IMAGE_WORKERS` threads of the whole process, so parallel calls queue rather than add up (the
threads are few and fixed, not merely counted: the C allocator keeps memory freed by a thread for
that thread's next use, so image work spread over many threads leaves each holding its peak).

Conversions normalise what other formats or viewers cannot take: 16-bit grayscale is scaled to 8
bits (not clipped to white), CMYK becomes RGB, palette images keep their transparency as alpha,
and alpha is laid on white where the target has none. A format that cannot hold every frame of an
animated image says so in a note.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from xml.sax.saxutils import escape, unescape

from .errors import DownloadFailed

MAX_PIXELS = 100_000_000
"""Beyond this an image is refused as a likely decompression bomb, whatever was asked for."""
PIXEL_FACTOR = 4
PIXEL_FLOOR = 4096 * 4096
"""The least `pixel_bound` allows: four times the largest image any provider documents (2048x2048, or
FLUX Ultra's ~4 MP at whatever size was asked), so a provider's own choice of size is never refused."""
IMAGE_WORKERS = 2
"""Images decoded or encoded at once, process-wide (each can take tens of MB while it is worked on)."""
_IMAGE_THREAD = "flux-mcp-image"
_IMAGE_POOL = ThreadPoolExecutor(max_workers=IMAGE_WORKERS, thread_name_prefix=_IMAGE_THREAD)
_T = TypeVar("_T")
MAX_PREVIEW_SIDE = 8000
PREVIEW_START_SIDE = 1568
"""Vision models downscale past ~1568 px anyway: previews start there and shrink until they fit."""

FORMATS = {"png": ("PNG", "image/png"), "jpg": ("JPEG", "image/jpeg"), "jpeg": ("JPEG", "image/jpeg"),
           "webp": ("WEBP", "image/webp")}
_PIL_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


LIGHT_BYTES = 256 * 1024
"""Image work on fewer bytes than this, with no decoding or encoding, costs less than a thread hand-off."""


def light_work(data: bytes, target_ext: str | None = None) -> bool:
    """Whether checking, labelling and writing `data` (as a `target_ext` file) is light: little data, and
    kept in its own format (PNG and JPEG are labelled by inserting chunks; WebP would be re-encoded)."""
    if len(data) > LIGHT_BYTES:
        return False
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        own = "PNG"
    elif data.startswith(b"\xff\xd8\xff"):
        own = "JPEG"
    else:
        return False
    return target_ext is None or FORMATS.get(target_ext.lower(), ("",))[0] == own


def pixel_bound(width: int, height: int) -> int:
    """The most pixels an answer to a `width` x `height` request may decode to: a generous multiple of
    what was asked (FLUX outputs are a few megapixels), never under `PIXEL_FLOOR` nor over `MAX_PIXELS`."""
    return min(MAX_PIXELS, max(PIXEL_FLOOR, PIXEL_FACTOR * width * height))


def on_image_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Runs `fn(*args)` on one of the process's `IMAGE_WORKERS` image threads and returns its result
    (waiting for a free one). Blocks: call it from a worker thread, never on the event loop."""
    if threading.current_thread().name.startswith(_IMAGE_THREAD):
        return fn(*args)
    return _IMAGE_POOL.submit(fn, *args).result()


@cache
def _pil() -> ModuleType:
    from PIL import Image, ImageFile

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return Image


@dataclass(frozen=True)
class ImageInfo:
    """What the bytes really are, read from their content."""

    mime_type: str
    width: int
    height: int

    @property
    def ext(self) -> str:
        return _EXT.get(self.mime_type, "img")


def inspect_image(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Checks by content (not name) that `data` is a PNG, JPEG, WebP or GIF within the pixel limit, and
    within `max_pixels` (see `pixel_bound`) when given; nothing is decoded."""
    image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", image.DecompressionBombWarning)  # the limit below decides
            im = image.open(io.BytesIO(data))
        with im:
            fmt = im.format or ""
            width, height = im.size
            if fmt not in _PIL_MIME:
                raise DownloadFailed(f"the data is a {fmt or 'unknown'} file, not a PNG, JPEG, WebP or GIF image")
            if width * height > MAX_PIXELS:
                raise DownloadFailed(f"the image is {width}x{height}, over the {MAX_PIXELS}-pixel limit")
            if max_pixels is not None and width * height > max_pixels:
                raise DownloadFailed(
                    f"the image is {width}x{height}, far larger than the size asked for (at most {max_pixels} "
                    "pixels are decoded for it): refused as a likely decompression bomb")
            im.verify()
    except DownloadFailed:
        raise
    except image.DecompressionBombError:
        raise DownloadFailed(f"the image is over the {MAX_PIXELS}-pixel limit (decompression bomb)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure means the bytes are not a usable image
        raise DownloadFailed(f"the data is not an image this server can read ({type(exc).__name__})") from None
    return ImageInfo(_PIL_MIME[fmt], width, height)


# --- provenance ------------------------------------------------------------------------------------


def embed_provenance(data: bytes, info: ImageInfo, provenance: dict[str, str]) -> bytes:
    """Adds prompt, model, provider, seed and prediction id to the file's own metadata (a JPEG's EXIF is
    merged, not replaced: its Orientation and camera fields stay)."""
    if not provenance:
        return data
    if info.mime_type == "image/png":
        return _png_with_text(data, provenance)
    if info.mime_type == "image/jpeg":
        return _jpeg_with_segments(data, provenance)
    if info.mime_type == "image/webp":
        return on_image_thread(_relabelled_webp, data, provenance)
    return data


def _relabelled_webp(data: bytes, provenance: dict[str, str]) -> bytes:
    with _pil().open(io.BytesIO(data)) as im:
        im.load()
        buf = io.BytesIO()
        _save(_normalised(im, "WEBP"), buf, "WEBP", provenance, _exif_of(im))
        return buf.getvalue()


@dataclass(frozen=True)
class Converted:
    """An image in the format asked for, and what the conversion could not keep (notes for the user)."""

    data: bytes
    notes: list[str] = field(default_factory=list)


def convert(data: bytes, info: ImageInfo, ext: str, provenance: dict[str, str], *, labelled: bool = False
            ) -> Converted:
    """The image in the format named by `ext` (png, jpg, webp), re-encoded only when it differs.

    `labelled` data already carries `provenance` (the data folder's copy): kept as it is when no
    re-encoding is needed, so the metadata is not written twice. Modes are normalised for the target
    (see the module docstring); an animated image keeps its first frame, and a note says so.
    """
    pil_format, mime = FORMATS[ext]
    if mime == info.mime_type:
        return Converted(data if labelled else embed_provenance(data, info, provenance))
    return on_image_thread(_reencoded, data, pil_format, provenance)


def _reencoded(data: bytes, pil_format: str, provenance: dict[str, str]) -> Converted:
    notes: list[str] = []
    with _pil().open(io.BytesIO(data)) as im:
        frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
        if frames > 1:
            notes.append(f"the image is animated ({frames} frames); a {pil_format} file holds only its first "
                         "frame, which is what was written")
        im.seek(0)
        im.load()
        exif = _exif_of(im)
        buf = io.BytesIO()
        _save(_normalised(im, pil_format), buf, pil_format, provenance, exif)
        return Converted(buf.getvalue(), notes)


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _normalised(im: Any, fmt: str) -> Any:
    """`im` in a mode `fmt` (PNG, JPEG, WEBP) stores faithfully: 16- and 32-bit grayscale scaled to 8 bits
    (PNG keeps 16 bits), CMYK and other colour spaces as RGB, palette images with their transparency as
    alpha, and, for JPEG, alpha laid on white."""
    mode = im.mode
    if fmt == "PNG" and mode in ("1", "L", "LA", "P", "RGB", "RGBA", *_SIXTEEN_BIT):
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        im = _gray8(im)
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode in ("La", "RGBa"):
        im = im.convert(mode.upper())
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV
    if fmt == "JPEG" and im.mode in ("LA", "RGBA"):
        im = _on_white(im)
    elif fmt == "WEBP" and im.mode in ("L", "LA"):
        im = im.convert("RGB" if im.mode == "L" else "RGBA")
    return im


def _gray8(im: Any) -> Any:
    """16-bit (or 32-bit integer, or float) grayscale as 8-bit, scaled over its range instead of clipped
    (clipping turns every value above 255 — nearly all of a 16-bit image — white)."""
    if im.mode in _SIXTEEN_BIT:
        return im.point(lambda v: v / 257).convert("L")
    low, high = im.getextrema()
    if im.mode == "F" and 0 <= low and high <= 1.0:
        return im.point(lambda v: v * 255).convert("L")
    top = max(65535, high)
    return (im.point(lambda v: v * (255 / top)) if high > 255 else im).convert("L")


def _on_white(im: Any) -> Any:
    base = _pil().new("RGB" if im.mode == "RGBA" else "L", im.size, "white")
    base.paste(im, mask=im.getchannel("A"))
    return base


def _exif_of(im: Any) -> Any:
    """The image's own EXIF (Pillow reads it from JPEG, PNG and WebP), or None."""
    try:
        exif = im.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block is dropped, not fatal
        return None
    return exif if len(exif) else None


def _save(im: Any, buf: io.BytesIO, fmt: str, provenance: dict[str, str], exif: Any = None) -> None:
    if fmt == "PNG":
        if exif is not None:
            im.save(buf, "PNG", exif=_exif(provenance, exif))  # the source's EXIF (Orientation) carried over
        else:
            im.save(buf, "PNG")
        data = _png_with_text(buf.getvalue(), provenance)
        buf.seek(0)
        buf.truncate()
        buf.write(data)
        return
    im.save(buf, fmt, exif=_exif(provenance, exif), xmp=_xmp(provenance), quality=92)


def _png_with_text(data: bytes, provenance: dict[str, str]) -> bytes:
    """Inserts one iTXt chunk per field right after IHDR, where every reader sees it before the pixels."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return data
    at = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    chunks = b""
    for key, value in provenance.items():
        body = key.encode("latin-1", "replace")[:79] + b"\x00\x00\x00\x00\x00" + value.encode()
        chunks += struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    return data[:at] + chunks + data[at:]


def _jpeg_with_segments(data: bytes, provenance: dict[str, str]) -> bytes:
    """Merges the provenance into the JPEG's EXIF segment (or adds one after SOI and a JFIF APP0) and
    adds an XMP APP1 segment beside it; the pixels are not touched."""
    if not data.startswith(b"\xff\xd8"):
        return data
    at, existing = 2, None
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    for start, end, marker in _leading_segments(data):
        if marker == 0xE1 and data[start + 4:start + 10] == b"Exif\x00\x00":
            existing = (start, end)
            break
    exif = _merged_exif(data[existing[0] + 4:existing[1]], provenance) if existing else None
    segments = b""
    for payload in (exif or _exif(provenance), _XMP_ID + _xmp(provenance)):
        if len(payload) + 2 <= 0xFFFF:
            segments += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    if existing and exif is not None:
        return data[:existing[0]] + segments + data[existing[1]:]
    return data[:at] + segments + data[at:]


def _leading_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(start, end, marker) of the APPn and other segments before a JPEG's image data."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:  # start of scan, restart or end markers: pixels follow
            return
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        yield at, end, marker
        at = end


def _merged_exif(payload: bytes, provenance: dict[str, str]) -> bytes | None:
    """The provider's EXIF with the provenance merged in, or None when it cannot be read."""
    try:
        exif = _pil().Exif()
        exif.load(payload)
        return _exif(provenance, exif)
    except Exception:  # noqa: BLE001 - unreadable EXIF: provenance is written on its own
        return None


def _exif(provenance: dict[str, str], base: Any = None) -> bytes:
    """EXIF bytes: `base` (the image's own EXIF, kept whole) with the provenance fields set."""
    exif = base if base is not None else _pil().Exif()
    exif[0x010E] = provenance.get("prompt", "")[:2000]  # ImageDescription
    exif[0x0131] = "flux-mcp"  # Software
    exif[0x9286] = "; ".join(f"{k}={v}" for k, v in provenance.items() if k != "prompt")[:2000]  # UserComment
    return bytes(exif.tobytes())


def _xmp(provenance: dict[str, str]) -> bytes:
    fields = "".join(f"<flux:{k}>{escape(v)}</flux:{k}>" for k, v in provenance.items() if re.fullmatch(r"[a-z_]+", k))
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:flux="https://github.com/flux-mcp/ns/1.0/">'
        f"{fields}</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
    ).encode()


def read_provenance(data: bytes) -> dict[str, str]:
    """The provenance flux-mcp embedded in image bytes (PNG text chunks; the XMP packet of JPEG and WebP,
    else their EXIF description); {} when the file carries none or cannot be read."""
    try:
        with _pil().open(io.BytesIO(data)) as im:
            info = dict(im.info)
            text = dict(getattr(im, "text", {}) or {}) if im.format == "PNG" else {}
            exif = im.getexif() if im.format != "PNG" else None
    except Exception:  # noqa: BLE001 - any unreadable file simply carries no provenance
        return {}
    if text:
        return {str(k): str(v) for k, v in text.items()}
    xmp = info.get("xmp")
    if isinstance(xmp, bytes | str):
        packet = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
        fields = {k: unescape(v) for k, v in re.findall(r"<flux:([a-z_]+)>(.*?)</flux:\1>", packet, re.DOTALL)}
        if fields:
            return fields
    if exif and exif.get(0x0131) == "flux-mcp":
        found = {"prompt": str(exif.get(0x010E, ""))}
        for part in str(exif.get(0x9286, "")).split("; "):
            key, sep, value = part.partition("=")
            if sep:
                found[key] = value
        return found
    return {}


# --- previews --------------------------------------------------------------------------------------


_SHOWN_AS_IS = ("image/png", "image/jpeg", "image/webp")


def shown_as_is(mime_type: str | None, width: int, height: int, size: int, budget: int | None,
                data: bytes | None = None) -> bool:
    """Whether an image can be its own preview: a format clients display, within `budget` bytes (None: any
    size) and 8000 px a side — and, when its `data` is given, not a CMYK JPEG (which clients and model
    APIs show with wrong colours, or not at all)."""
    return (mime_type in _SHOWN_AS_IS and (budget is None or size <= budget)
            and max(width, height) <= MAX_PREVIEW_SIDE
            and not (data is not None and mime_type == "image/jpeg" and _jpeg_components(data) == 4))


def _jpeg_components(data: bytes) -> int | None:
    """The colour components of a JPEG (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK), read from its frame header."""
    at = 2
    while at + 10 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[at + 9]
        if marker == 0xDA:
            return None
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return None


_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}
"""EXIF Orientation -> the Pillow transpose that shows the image upright."""


def make_preview(path: Path, budget: int, data: bytes | None = None) -> tuple[bytes, str]:
    """A JPEG (or the original, when it already fits) no larger than `budget` bytes and 8000 px a side.

    A JPEG is decoded at a reduced scale (it needs no more than the preview's pixels); every image is
    shown upright (its EXIF Orientation applied) and in RGB."""
    data = path.read_bytes() if data is None else data
    with _pil().open(io.BytesIO(data)) as im:  # the header only: an image that is its own preview needs no decode
        mime = _PIL_MIME.get(im.format or "")
        width, height = im.size
        if shown_as_is(mime, width, height, len(data), budget, data):
            assert mime is not None
            return data, mime
    return on_image_thread(_preview, data, budget)


def _preview(data: bytes, budget: int) -> tuple[bytes, str]:
    image = _pil()
    with image.open(io.BytesIO(data)) as im:
        start = min(max(im.size), PREVIEW_START_SIDE)
        if im.format == "JPEG":
            im.draft(None, (start, start))  # decoded at 1/2, 1/4 or 1/8 scale while that stays large enough
        orientation = (_exif_of(im) or {}).get(0x0112)
        im.load()
        rgb = _normalised(im, "JPEG")
        rgb = rgb.convert("RGB") if rgb.mode != "RGB" else rgb
        rgb.thumbnail((start, start), image.Resampling.LANCZOS)
        if orientation in _UPRIGHT:  # the preview carries no EXIF: turn the pixels the way viewers would
            rgb = rgb.transpose(getattr(image.Transpose, _UPRIGHT[orientation]))
        side = max(rgb.size)
        quality = 85
        while True:
            scaled = rgb
            if side < max(rgb.size):
                scaled = rgb.copy()
                scaled.thumbnail((side, side), image.Resampling.LANCZOS)
            buf = io.BytesIO()
            scaled.save(buf, "JPEG", quality=quality, optimize=True)
            out = buf.getvalue()
            if len(out) <= budget or side <= 64:
                return out, "image/jpeg"
            if quality > 70:
                quality -= 10
            else:
                side = int(side * 0.75)
