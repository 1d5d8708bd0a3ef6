"""Finished images: download them safely, keep them on disk, write copies, make previews."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import logging
import os
import re
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2
from PIL import Image, ImageFile, PngImagePlugin

from .errors import DownloadFailed, InvalidInput, PathNotAllowed

log = logging.getLogger("flux_mcp.media")

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 100_000_000
"""Beyond this an image is refused as a likely decompression bomb."""
MAX_PREVIEW_SIDE = 8000
PREVIEW_START_SIDE = 1568
MAX_REDIRECTS = 5
DOWNLOAD_DEADLINE = 120.0

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_UMASK = os.umask(0o022)
os.umask(_UMASK)
ImageFile.LOAD_TRUNCATED_IMAGES = False

FORMATS = {"png": ("PNG", "image/png"), "jpg": ("JPEG", "image/jpeg"), "jpeg": ("JPEG", "image/jpeg"),
           "webp": ("WEBP", "image/webp")}
_PIL_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.-]+)*;base64,(.*)$", re.I | re.S)


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            im = Image.open(io.BytesIO(data))
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
    except Image.DecompressionBombError:
        raise DownloadFailed(f"the image is over the {MAX_PIXELS}-pixel limit (decompression bomb)") from None
    except Exception as exc:
        raise DownloadFailed(f"the data is not an image this server can read ({type(exc).__name__})") from None
    return ImageInfo(_PIL_MIME[fmt], width, height)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI (or of a bare base64 string)."""
    m = _DATA_URI.match(uri.strip())
    payload = m.group(3) if m else uri.strip()
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidInput("The data: URI is not valid base64.") from None


def to_data_uri(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds on fetching one result image."""

    max_bytes: int = MAX_IMAGE_BYTES
    deadline: float = DOWNLOAD_DEADLINE
    """Overall seconds for one attempt, every redirect and the whole body included."""
    attempts: int = 3


class Downloader:
    """Fetches result images: http(s) only, public addresses only (except the provider's own host),
    every redirect re-checked, the body streamed under a byte cap and an overall deadline."""

    def __init__(self, client: httpx2.AsyncClient, *, max_bytes: int = MAX_IMAGE_BYTES,
                 deadline: float = DOWNLOAD_DEADLINE, attempts: int = 3):
        self.client = client
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.attempts = attempts

    async def fetch(self, url: str, trusted_hosts: frozenset[str] = frozenset()) -> bytes:
        last = "no attempt"
        for attempt in range(self.attempts):
            try:
                with anyio.fail_after(self.deadline):
                    return await self._fetch_once(url, trusted_hosts)
            except _Permanent as exc:
                raise DownloadFailed(str(exc)) from None
            except TimeoutError:
                last = f"no complete answer within {self.deadline:g} s"
            except (httpx2.TransportError, _Transient) as exc:
                last = str(exc) or type(exc).__name__
            if attempt < self.attempts - 1:
                await anyio.sleep(0.5 * 2**attempt)
        raise DownloadFailed(f"download failed after {self.attempts} tries: {last}")

    async def _fetch_once(self, url: str, trusted: frozenset[str]) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            await check_public_url(current, trusted)
            request = self.client.build_request("GET", current, headers={"User-Agent": "flux-mcp"})
            response = await self.client.send(request, stream=True, follow_redirects=False)
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _Permanent("redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                if response.status_code in (404, 410):
                    raise _Permanent(f"the image URL answered HTTP {response.status_code} (expired or removed)")
                if response.status_code in (408, 429) or response.status_code >= 500:
                    raise _Transient(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _Permanent(f"the image URL answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise _Permanent(f"the image is {declared} bytes, over the {self.max_bytes}-byte limit")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _Permanent(f"the image is over the {self.max_bytes}-byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()
        raise _Permanent(f"more than {MAX_REDIRECTS} redirects")


class _Permanent(Exception):
    pass


class _Transient(Exception):
    pass


async def check_public_url(url: str, trusted_hosts: frozenset[str]) -> None:
    """Refuses non-http(s) URLs and hosts that resolve to private, loopback or link-local addresses,
    except `trusted_hosts` (the configured providers' own hosts, so local fakes work in tests)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _Permanent(f"only http(s) image URLs are fetched (got {parts.scheme or 'no'} scheme)")
    host = (parts.hostname or "").lower()
    if not host:
        raise _Permanent("the image URL has no host")
    if host in trusted_hosts:
        return
    try:
        infos = await anyio.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                        type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _Transient(f"cannot resolve {host}: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise _Permanent(f"refusing to fetch from {host}: it resolves to a non-public address")


class ImageStore:
    """The data folder's copy of every finished image, and the copies written to `save_to`."""

    def __init__(self, home: Path):
        self.root = home / "images"

    def path_for(self, prediction_id: str, index: int, ext: str) -> Path:
        provider, _, native = prediction_id.partition(":")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", native)[:120] or "image"
        digest = hashlib.sha256(prediction_id.encode()).hexdigest()[:8]
        return self.root / re.sub(r"[^a-z0-9_-]", "_", provider) / f"{safe}-{digest}-{index}.{ext}"

    def existing(self, prediction_id: str, index: int) -> Path | None:
        for ext in ("png", "jpg", "webp", "gif"):
            p = self.path_for(prediction_id, index, ext)
            if p.is_file():
                return p
        return None

    def keep(self, prediction_id: str, index: int, data: bytes, info: ImageInfo,
             provenance: dict[str, str]) -> Path:
        """Writes the image into the data folder (atomically), with its provenance in the file."""
        target = self.path_for(prediction_id, index, info.ext)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = embed_provenance(data, info, provenance)
        atomic_write(target, payload, overwrite=True)
        return target


def atomic_write(target: Path, data: bytes, *, overwrite: bool) -> None:
    """Writes via a temp file in the same folder and a rename, so no partial file is ever left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".flux-", suffix=".part", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; images are ordinary user files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target exists: never overwrites by accident
            except FileExistsError:
                raise PathNotAllowed(
                    f"{target} already exists; pass overwrite=true or choose another file name."
                ) from None
            except OSError:
                if target.exists():
                    raise PathNotAllowed(f"{target} already exists; choose another file name.") from None
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def convert(data: bytes, info: ImageInfo, ext: str, provenance: dict[str, str]) -> bytes:
    """Re-encodes to the format named by `ext` (png, jpg, webp) when needed, keeping provenance."""
    pil_format, mime = FORMATS[ext]
    if mime == info.mime_type:
        return embed_provenance(data, info, provenance)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if pil_format == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        _save_with_provenance(im, buf, pil_format, provenance)
        return buf.getvalue()


def embed_provenance(data: bytes, info: ImageInfo, provenance: dict[str, str]) -> bytes:
    """Adds prompt, model, provider, seed and prediction id to the file's own metadata."""
    if not provenance or info.mime_type not in ("image/png", "image/jpeg", "image/webp"):
        return data
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        buf = io.BytesIO()
        fmt = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}[info.mime_type]
        _save_with_provenance(im, buf, fmt, provenance, lossless_hint=True)
        return buf.getvalue()


def _save_with_provenance(im: Image.Image, buf: io.BytesIO, fmt: str, provenance: dict[str, str],
                          *, lossless_hint: bool = False) -> None:
    if fmt == "PNG":
        meta = PngImagePlugin.PngInfo()
        for k, v in provenance.items():
            meta.add_itxt(k, v)
        im.save(buf, "PNG", pnginfo=meta, optimize=False)
        return
    exif = Image.Exif()
    exif[0x010E] = provenance.get("prompt", "")[:2000]  # ImageDescription
    exif[0x0131] = "flux-mcp"  # Software
    exif[0x9286] = "; ".join(f"{k}={v}" for k, v in provenance.items() if k != "prompt")[:2000]  # UserComment
    xmp = _xmp(provenance)
    quality = 95 if lossless_hint else 92
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality, exif=exif.tobytes(), xmp=xmp)
    else:
        im.save(buf, "WEBP", quality=quality, exif=exif.tobytes(), xmp=xmp)


def _xmp(provenance: dict[str, str]) -> bytes:
    from xml.sax.saxutils import escape

    fields = "".join(f"<flux:{k}>{escape(v)}</flux:{k}>" for k, v in provenance.items() if re.fullmatch(r"[a-z_]+", k))
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:flux="https://github.com/flux-mcp/ns/1.0/">'
        f"{fields}</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
    ).encode()


def make_preview(path: Path, budget: int) -> tuple[bytes, str]:
    """A JPEG (or the original, when it already fits) no larger than `budget` bytes and 8000 px a side."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fits_side = max(im.size) <= MAX_PREVIEW_SIDE
        if len(data) <= budget and fits_side and im.format in ("PNG", "JPEG", "WEBP"):
            return data, _PIL_MIME[im.format]
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        # Vision models downscale past ~1568 px anyway; start there and shrink until the bytes fit.
        side = min(max(rgb.size), PREVIEW_START_SIDE)
        quality = 85
        while True:
            scaled = rgb.copy()
            scaled.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            scaled.save(buf, "JPEG", quality=quality, optimize=True)
            out = buf.getvalue()
            if len(out) <= budget or side <= 64:
                return out, "image/jpeg"
            if quality > 70:
                quality -= 10
            else:
                side = int(side * 0.75)
