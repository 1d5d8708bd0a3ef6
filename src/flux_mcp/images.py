"""Image bytes: what they really are, their provenance, format conversion, previews that fit.

Pillow is imported on first use, not at start-up (a server that is only listing its tools should
start as fast as the SDK allows). Provenance goes into PNG and JPEG files as metadata chunks
inserted into the bytes as they are, so a provider's image is never re-encoded just to label it.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from xml.sax.saxutils import escape, unescape

from .errors import DownloadFailed

MAX_PIXELS = 100_000_000
"""Beyond this an image is refused as a likely decompression bomb."""
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


def inspect_image(data: bytes) -> ImageInfo:
    """Checks by content (not name) that `data` is a PNG, JPEG, WebP or GIF within the pixel limit."""
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
            im.verify()
    except DownloadFailed:
        raise
    except image.DecompressionBombError:
        raise DownloadFailed(f"the image is over the {MAX_PIXELS}-pixel limit (decompression bomb)") from None
    except Exception as exc:
        raise DownloadFailed(f"the data is not an image this server can read ({type(exc).__name__})") from None
    return ImageInfo(_PIL_MIME[fmt], width, height)


# --- provenance ------------------------------------------------------------------------------------


def embed_provenance(data: bytes, info: ImageInfo, provenance: dict[str, str]) -> bytes:
    """Adds prompt, model, provider, seed and prediction id to the file's own metadata."""
    if not provenance:
        return data
    if info.mime_type == "image/png":
        return _png_with_text(data, provenance)
    if info.mime_type == "image/jpeg":
        return _jpeg_with_segments(data, provenance)
    if info.mime_type == "image/webp":
        with _pil().open(io.BytesIO(data)) as im:
            im.load()
            buf = io.BytesIO()
            _save(im, buf, "WEBP", provenance)
            return buf.getvalue()
    return data


def convert(data: bytes, info: ImageInfo, ext: str, provenance: dict[str, str], *, labelled: bool = False) -> bytes:
    """The image in the format named by `ext` (png, jpg, webp), re-encoded only when it differs.

    `labelled` data already carries `provenance` (the data folder's copy): kept as it is when no
    re-encoding is needed, so the metadata is not written twice.
    """
    pil_format, mime = FORMATS[ext]
    if mime == info.mime_type:
        return data if labelled else embed_provenance(data, info, provenance)
    with _pil().open(io.BytesIO(data)) as im:
        im.load()
        if pil_format == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        _save(im, buf, pil_format, provenance)
        return buf.getvalue()


def _save(im, buf: io.BytesIO, fmt: str, provenance: dict[str, str]) -> None:
    if fmt == "PNG":
        im.save(buf, "PNG")
        buf.seek(0)
        data = _png_with_text(buf.getvalue(), provenance)
        buf.seek(0)
        buf.truncate()
        buf.write(data)
        return
    kwargs = {"exif": _exif(provenance), "xmp": _xmp(provenance), "quality": 92}
    im.save(buf, fmt, **kwargs)


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
    """Inserts an EXIF and an XMP APP1 segment after SOI (and after a JFIF APP0, when there is one)."""
    if not data.startswith(b"\xff\xd8"):
        return data
    at = 2
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    segments = b""
    for payload in (_exif(provenance), _XMP_ID + _xmp(provenance)):
        if len(payload) + 2 <= 0xFFFF:
            segments += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:at] + segments + data[at:]


def _exif(provenance: dict[str, str]) -> bytes:
    exif = _pil().Exif()
    exif[0x010E] = provenance.get("prompt", "")[:2000]  # ImageDescription
    exif[0x0131] = "flux-mcp"  # Software
    exif[0x9286] = "; ".join(f"{k}={v}" for k, v in provenance.items() if k != "prompt")[:2000]  # UserComment
    return exif.tobytes()


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


def shown_as_is(mime_type: str | None, width: int, height: int, size: int, budget: int | None) -> bool:
    """Whether an image can be its own preview: a format clients display, within `budget` bytes (None: any
    size) and 8000 px a side."""
    return (mime_type in _SHOWN_AS_IS and (budget is None or size <= budget)
            and max(width, height) <= MAX_PREVIEW_SIDE)


def make_preview(path: Path, budget: int, data: bytes | None = None) -> tuple[bytes, str]:
    """A JPEG (or the original, when it already fits) no larger than `budget` bytes and 8000 px a side."""
    data = path.read_bytes() if data is None else data
    image = _pil()
    with image.open(io.BytesIO(data)) as im:
        mime = _PIL_MIME.get(im.format or "")
        if shown_as_is(mime, *im.size, len(data), budget):
            assert mime is not None
            return data, mime
        im.load()
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        side = min(max(rgb.size), PREVIEW_START_SIDE)
        quality = 85
        while True:
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
