"""Upload links (shared mode): a local file gets onto a shared server without a path on its disk.

A remote user's files are on their machine, which the server cannot read, and a data: URI of a large
photo is heavy for a model to carry. So, in shared mode only:

1. `create_upload_link` (a tool) answers a one-time URL, `<server>/uploads/<link>`, and the reference
   `upload:<link>` for it. The link is 256 random bits, bound to the caller's principal, and expires
   after LINK_SECONDS.
2. The user (or their client) PUTs the file there, e.g. `curl -T photo.png '<url>'`. The route needs
   no bearer token: the unguessable, single-use, expiring link is the capability, and a person at a
   terminal does not have the token of their assistant's configuration at hand. A bearer header sent
   anyway is ignored. The body is capped at MAX_BYTES, must be a PNG, JPEG, WebP or GIF (checked by
   its content, with Pillow), and is kept in the image store (the bucket in shared mode) with a
   create-only write, so a second PUT, on any replica, is refused: the link is spent.
3. `edit_image(image="upload:<link>")` (or the URL itself) and `upload_media(path="upload:<link>")`
   resolve the reference to the file's bytes, for the same principal only: for anyone else it is
   answered exactly as a link that does not exist. An uploaded file can be used for KEEP_SECONDS.

Everything lives in the image store (`ObjectStore`), never in one process's memory, so the replica that
made the link, the one that takes the PUT and the one that runs the edit may all differ. Only SHA-256
digests of links name the objects: a listing of the bucket shows no link that works.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import DownloadFailed, InvalidInput

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

LINK_SECONDS = 600.0
"""How long an upload link (and a gallery login link) can be used: ten minutes."""
KEEP_SECONDS = 86_400.0
"""How long an uploaded file can be referred to by edit_image and upload_media: a day."""
MAX_BYTES = 20 * 1024 * 1024
"""The largest file an upload link takes."""
PATH = "/uploads/"
REFERENCE = "upload:"
SHARED_IMAGE = "A URL, data: URI or upload:... reference (create_upload_link)."
"""edit_image's `image` on a shared server (no local paths there)."""
SHARED_UPLOAD_PATH = "An upload:... reference (create_upload_link)."
"""upload_media's `path` on a shared server."""
_LINK = re.compile(r"^[A-Za-z0-9_-]{43}$")
_URL_LINK = re.compile(r"^https?://[^/?#]+/uploads/([A-Za-z0-9_-]{43})$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class ObjectStore(Protocol):
    """Small named objects beside the images (`FolderStore` and `S3Store` both keep them)."""

    async def put_object(self, name: str, payload: bytes, *, create: bool = False) -> bool: ...

    async def get_object(self, name: str) -> bytes | None: ...


def new_link() -> str:
    """256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def digest(link: str) -> str:
    return hashlib.sha256(link.encode()).hexdigest()


@dataclass(frozen=True)
class Ticket:
    """What a link was made for: whose it is and until when it can be used."""

    principal: str
    created_at: float
    expires_at: float

    def dump(self) -> bytes:
        return json.dumps({"principal": self.principal, "created_at": self.created_at,
                           "expires_at": self.expires_at}).encode()

    @classmethod
    def load(cls, data: bytes | None) -> Ticket | None:
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return cls(str(raw["principal"]), float(raw["created_at"]), float(raw["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def public_base(request: Any) -> str | None:
    """`scheme://host[:port]` under which the caller reached this server (a proxy's X-Forwarded-Proto and
    X-Forwarded-Host win over the request's own: behind a load balancer they are what the user sees).
    Only the caller's own answer carries it, so a forged header misleads nobody but its sender."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() or request.url.scheme
    host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host", "")
    if proto not in ("http", "https") or not _HOST.match(host):
        return None
    return f"{proto}://{host}"


def link_of(reference: str) -> str | None:
    """The link of `upload:<link>` or of an upload URL of this server's shape; None for anything else."""
    text = reference.strip()
    if text.startswith(REFERENCE):
        link = text[len(REFERENCE):]
        return link if _LINK.match(link) else ""
    m = _URL_LINK.match(text)
    return m.group(1) if m else None


def is_reference(image: str | None) -> bool:
    return image is not None and link_of(image) is not None


class Uploads:
    """Upload links, the files PUT to them, and their resolution; state in `store`, none in memory."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.time):
        self.store: ObjectStore = store
        self.clock = clock

    @staticmethod
    def _names(link: str) -> tuple[str, str, str]:
        """The link's ticket, its file, and the small mark saying the file is in (read instead of the file)."""
        folder = f"uploads/{digest(link)}"
        return f"{folder}/ticket.json", f"{folder}/image", f"{folder}/used"

    async def create(self, principal: str) -> tuple[str, Ticket]:
        """A new link for `principal`, recorded in the store."""
        link, now = new_link(), self.clock()
        ticket = Ticket(principal, now, now + LINK_SECONDS)
        await self.store.put_object(self._names(link)[0], ticket.dump(), create=True)
        return link, ticket

    async def accept(self, link: str, body: Any, declared: int | None) -> tuple[int, dict[str, Any]]:
        """A PUT to `link`: (HTTP status, JSON answer). `body` is an async iterator of the request's chunks."""
        from .images import inspect_image

        if not _LINK.match(link):
            return 404, {"error": "no such upload link"}
        ticket_name, image_name, used = self._names(link)
        ticket = Ticket.load(await self.store.get_object(ticket_name))
        if ticket is None:
            return 404, {"error": "no such upload link"}
        if await self.store.get_object(used) is not None:
            return 409, {"error": "this upload link was used already; ask for a new one (create_upload_link)"}
        if self.clock() > ticket.expires_at:
            return 410, {"error": "this upload link expired; ask for a new one (create_upload_link)"}
        too_big = {"error": f"the file is over the {MAX_BYTES // (1024 * 1024)} MB an upload link takes"}
        if declared is not None and declared > MAX_BYTES:
            return 413, too_big
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > MAX_BYTES:
                return 413, too_big
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            return 400, {"error": "the request had no body: PUT the file itself (curl -T FILE URL)"}
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            return 415, {"error": f"not an image this server takes: {exc} (PNG, JPEG, WebP or GIF)"}
        if not await self.store.put_object(image_name, data, create=True):  # the one gate: first writer wins
            return 409, {"error": "this upload link was used already; ask for a new one (create_upload_link)"}
        await self.store.put_object(used, b"1")
        return 201, {"image": REFERENCE + link, "mime_type": info.mime_type, "width": info.width,
                     "height": info.height, "size_bytes": len(data),
                     "message": f"Uploaded. Pass image=\"{REFERENCE}{link}\" to edit_image."}

    async def resolve(self, reference: str, principal: str) -> bytes:
        """The bytes PUT to the link `reference` names, for the principal the link was made for (for anyone
        else: InvalidInput, worded as for a link that does not exist)."""
        link = link_of(reference) or ""
        missing = InvalidInput("No such upload: the reference is not one this server gave you (create_upload_link "
                               "answers a new one, with the `image` reference to pass here after the PUT).")
        if not _LINK.match(link):
            raise missing
        ticket_name, image_name, _ = self._names(link)
        ticket = Ticket.load(await self.store.get_object(ticket_name))
        if ticket is None or ticket.principal != principal:
            raise missing
        if self.clock() > ticket.created_at + KEEP_SECONDS:
            raise InvalidInput("That upload is over a day old and no longer used; upload the file again "
                               "(create_upload_link).")
        data = await self.store.get_object(image_name)
        if data is None:
            raise InvalidInput("Nothing was uploaded to that link yet: PUT the file to the link's URL first "
                               "(curl -T FILE URL), then call again.")
        return data


# --- the HTTP route and the tool --------------------------------------------------------------------

def add_upload_route(server: Any, uploads: Callable[[], Uploads | None]) -> None:
    """`PUT /uploads/<link>` on the HTTP app (see the module text). `uploads` answers None before start."""
    from starlette.responses import JSONResponse

    from .httpguard import HttpLimits
    from .middleware import FailureThrottle, client_key

    throttle = FailureThrottle(HttpLimits.auth_burst, HttpLimits.auth_per_second)

    @server.custom_route(PATH + "{link}", methods=["PUT"])
    async def put_upload(request: Request) -> Response:
        running = uploads()
        if running is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        client = client_key(request.scope)
        wait = throttle.retry_after(client)
        if wait:
            return JSONResponse({"error": f"too many bad upload links; retry in {wait} s"}, status_code=429,
                                headers={"Retry-After": str(wait)})
        raw = request.headers.get("content-length", "")
        status, body = await running.accept(str(request.path_params["link"]), request.stream(),
                                            int(raw) if raw.isdigit() else None)
        if status in (404, 409, 410):
            throttle.failed(client)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


UPLOAD_DOC = """A one-time URL (10 min) to PUT a local image to (curl -T FILE URL, max 20 MB); then pass the
`image` it answers to edit_image or upload_media."""


def upload_link_text(base: str, link: str, ticket: Ticket) -> tuple[str, dict[str, Any]]:
    url = f"{base}{PATH}{link}"
    minutes = round((ticket.expires_at - ticket.created_at) / 60)
    text = (f"Upload link (one use, valid {minutes} min): {url}\nPUT the file there, e.g.:\n"
            f"  curl -T photo.png '{url}'\nThen call edit_image with image=\"{REFERENCE}{link}\" (the user's file "
            "stays on their machine; only its bytes are sent). PNG, JPEG, WebP or GIF, up to "
            f"{MAX_BYTES // (1024 * 1024)} MB.")
    return text, {"url": url, "image": REFERENCE + link, "expires_in_seconds": int(ticket.expires_at - ticket.created_at),
                  "max_bytes": MAX_BYTES, "command": f"curl -T FILE '{url}'"}
