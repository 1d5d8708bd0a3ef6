"""Finished images: download them safely and keep them on disk (atomically, with provenance)."""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import ipaddress
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2

from .errors import DownloadFailed, InvalidInput, PathNotAllowed
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

__all__ = ["FORMATS", "MAX_PIXELS", "Downloader", "DownloadLimits", "ImageInfo", "atomic_write",
           "convert", "decode_data_uri", "embed_provenance", "flush_pending", "inspect_image", "make_preview",
           "origin_of", "remove_temp_files", "sweep_save_folder_once", "sweep_stale_temp_files", "to_data_uri"]

log = logging.getLogger("flux_mcp.media")

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_REDIRECTS = 5
DOWNLOAD_DEADLINE = 120.0

_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.-]+)*;base64,(.*)$", re.I | re.S)


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


def atomic_write(target: Path, data: bytes, *, overwrite: bool) -> None:
    """Writes via a temp file in the same folder and a rename, so no partial file is ever left.

    The complete file is in place when this returns (a crash of this process cannot lose or truncate
    it); the flush to stable storage (fsync of the file and its folder) follows on a background
    thread, milliseconds later, so the caller does not wait for the disk — the same bargain as the
    journal's WAL with synchronous=NORMAL. `flush_pending()` waits for it (the server does at exit).

    The temp file (`.flux-<random>.part`) exists only while this runs: a stopping server removes the
    ones of writes still under way (`remove_temp_files`), and those a killed process left behind are
    swept later (`sweep_stale_temp_files`).
    """
    tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        fd = _TEMPS.create(tmp)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _TEMPS.create(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
            else:
                with contextlib.suppress(FileNotFoundError):  # removed by a stop meanwhile: the target is whole
                    os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _TEMPS.done(tmp)
    _FLUSHER.add(target)


TEMP_PREFIX, TEMP_SUFFIX = ".flux-", ".part"
"""How atomic_write names its temp files (hidden, and recognisable by the sweeps below)."""
STALE_IN_DATA_FOLDER = 300.0
"""A temp file in the data folder older than this (seconds) was left by a process that died mid-write."""
STALE_NEXT_TO_SAVE_TO = 3600.0
"""...and in a user's save_to folder, where another program's writes are none of ours to judge quickly."""


class _TempFiles:
    """The temp files atomic_write has open in this process, so a stopping server can remove them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[Path] = set()

    def create(self, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        with self._lock:  # created and registered as one step: a stop cannot slip in between
            fd = os.open(tmp, flags, 0o666)  # the umask applies: images are ordinary user files
            self._paths.add(tmp)
        return fd

    def done(self, tmp: Path) -> None:
        with self._lock:
            self._paths.discard(tmp)

    def remove_all(self) -> int:
        with self._lock:
            paths, self._paths = self._paths, set()
        removed = 0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed


_TEMPS = _TempFiles()


def remove_temp_files() -> int:
    """Removes the temp files of writes still under way in this process (a stopping server's last step);
    returns how many. Those writes then fail; the files they were writing never appear half-written."""
    return _TEMPS.remove_all()


def sweep_stale_temp_files(folder: Path, older_than: float, *, recursive: bool = False) -> int:
    """Removes atomic_write temp files in `folder` (and, with `recursive`, its subfolders) last modified more
    than `older_than` seconds ago: left by a process killed mid-write. Returns how many were removed."""
    cutoff = time.time() - older_than
    removed = 0
    pending = [folder]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # missing or unreadable: nothing of ours to sweep there
        for entry in entries:
            try:
                if recursive and entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)
                      and entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed += 1
            except OSError as exc:
                log.debug("temp file sweep, %s: %s", entry.path, exc)
    if removed:
        log.info("removed %d stale temp file(s) in %s", removed, folder)
    return removed


_SWEPT: set[Path] = set()


def sweep_save_folder_once(folder: Path) -> None:
    """Sweeps a save_to folder of stale temp files, the first time this process writes into it."""
    if folder in _SWEPT:
        return
    if len(_SWEPT) > 1024:
        _SWEPT.clear()
    _SWEPT.add(folder)
    sweep_stale_temp_files(folder, STALE_NEXT_TO_SAVE_TO)


_COALESCE_SECONDS = 0.05
"""The flusher waits this long after a write before flushing, so a burst's files share their folders' fsync."""


class _Flusher:
    """One background thread that fsyncs written files and their folders, in batches."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="flux-mcp-fsync", daemon=True)
                self._thread.start()
        self._queue.put(path)

    def wait(self, timeout: float = 30.0) -> bool:
        """Blocks until everything queued so far is on stable storage (False on timeout)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            time.sleep(_COALESCE_SECONDS)  # let a burst of writes gather: its folder is flushed once
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            files = list(dict.fromkeys(item for item in batch if isinstance(item, Path)))
            folders = list(dict.fromkeys(path.parent for path in files))
            for path, flags in [*((f, os.O_RDONLY) for f in files),
                                *((d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) for d in folders)]:
                try:
                    fd = os.open(path, flags)
                except OSError:
                    continue  # replaced or removed meanwhile: nothing of ours left to flush
                try:
                    os.fsync(fd)
                except OSError as exc:  # e.g. a folder on a filesystem that cannot fsync directories
                    log.debug("fsync %s: %s", path, exc)
                finally:
                    os.close(fd)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()


_FLUSHER = _Flusher()


def flush_pending(timeout: float = 30.0) -> bool:
    """Waits until every file written so far is on stable storage."""
    return _FLUSHER.wait(timeout)


atexit.register(flush_pending)
