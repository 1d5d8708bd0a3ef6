"""Finished images: download them safely and keep them on disk (atomically, with provenance)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2

from .errors import DownloadFailed, InvalidInput
from .files import (  # the durable writes, in their own module (a server's start sweeps without this one)
    STALE_IN_DATA_FOLDER,
    STALE_NEXT_TO_SAVE_TO,
    atomic_write,
    flush_pending,
    remove_temp_files,
    sweep_save_folder_once,
    sweep_stale_temp_files,
)
from .http import (
    USER_AGENT,
    BodyTooLarge,
    GaveUp,
    LazyClient,
    Retryable,
    RetryPolicy,
    read_capped,
    resolve,
    retry_after,
    with_retries,
)
from .images import FORMATS, MAX_PIXELS, ImageInfo, convert, embed_provenance, inspect_image, make_preview

__all__ = [
    "FORMATS",
    "MAX_PIXELS",
    "STALE_IN_DATA_FOLDER",
    "STALE_NEXT_TO_SAVE_TO",
    "DownloadLimits",
    "Downloader",
    "ImageInfo",
    "atomic_write",
    "convert",
    "decode_data_uri",
    "embed_provenance",
    "flush_pending",
    "inspect_image",
    "make_preview",
    "origin_of",
    "remove_temp_files",
    "sweep_save_folder_once",
    "sweep_stale_temp_files",
    "to_data_uri",
]

log = logging.getLogger("flux_mcp.media")

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_REDIRECTS = 5
DOWNLOAD_DEADLINE = 120.0

_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.-]+)*;base64,(.*)$", re.IGNORECASE | re.DOTALL)


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


def origin_of(url: str) -> str | None:
    """`scheme://host:port` of a URL (default ports made explicit, names lowercased); None if it has none."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number, or out of range
        return None
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or port is None:
        return None
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


class Downloader:
    """Fetches result images: http(s) only, public addresses only (except the trusted origins: the
    provider's own scheme, host and port), every redirect re-checked, the body read under a byte cap,
    each attempt under an overall deadline. Shares the retry loop and body reader of provider calls."""

    def __init__(self, client: httpx2.AsyncClient | LazyClient, *, max_bytes: int = MAX_IMAGE_BYTES,
                 deadline: float = DOWNLOAD_DEADLINE, attempts: int = 3):
        self.client = client
        self.max_bytes = max_bytes
        self.policy = RetryPolicy(attempts=attempts, base_delay=0.5, max_delay=4.0, max_retry_after=10.0,
                                  deadline=deadline, retry_statuses=frozenset({408, 429, 500, 502, 503, 504}))

    async def fetch(self, url: str, trusted: Iterable[str] = ()) -> bytes:
        """The image at `url`. `trusted`: origins (or URLs, e.g. the provider's base URL) whose
        addresses may be private — a local gateway or test server — matched on scheme, host and port."""
        origins = frozenset(o for o in map(origin_of, trusted) if o)

        async def attempt(final: bool) -> bytes:
            return await self._fetch_once(url, origins)

        try:
            return await with_retries(attempt, self.policy, label="download")
        except _Permanent as exc:
            raise DownloadFailed(str(exc)) from None
        except BodyTooLarge as exc:
            size = f"{exc.declared} bytes, " if exc.declared is not None else ""
            raise DownloadFailed(f"the image is {size}over the {self.max_bytes}-byte limit") from None
        except GaveUp as exc:
            raise DownloadFailed(f"download failed after {exc.attempts} tries: {exc.reason}") from None

    async def _fetch_once(self, url: str, origins: frozenset[str]) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            await check_public_url(current, origins)
            client = resolve(self.client)
            request = client.build_request("GET", current, headers={"User-Agent": USER_AGENT})
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _Permanent("redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                status = response.status_code
                if status in (404, 410):
                    raise _Permanent(f"the image URL answered HTTP {status} (expired or removed)")
                if status in self.policy.retry_statuses or status >= 500:
                    raise Retryable(f"HTTP {status}", after=retry_after(response))
                if status != 200:
                    raise _Permanent(f"the image URL answered HTTP {status}")
                return await read_capped(response, self.max_bytes)
            finally:
                await response.aclose()
        raise _Permanent(f"more than {MAX_REDIRECTS} redirects")


class _Permanent(Exception):
    pass


async def check_public_url(url: str, trusted: frozenset[str]) -> None:
    """Refuses non-http(s) URLs and hosts that resolve to private, loopback or link-local addresses,
    except on the `trusted` origins (`scheme://host:port`: the configured provider's own, so a local
    gateway works — but not another port or scheme on the same host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _Permanent(f"only http(s) image URLs are fetched (got {parts.scheme or 'no'} scheme)")
    host = (parts.hostname or "").lower()
    if not host:
        raise _Permanent("the image URL has no host")
    origin = origin_of(url)
    if origin is None:
        raise _Permanent("the image URL has an invalid port")
    if origin in trusted:
        return
    try:
        infos = await anyio.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                        type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Retryable(f"cannot resolve {host}: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise _Permanent(f"refusing to fetch from {host}: it resolves to a non-public address")



