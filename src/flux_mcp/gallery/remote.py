"""The gallery of a shared server: each person sees their own images, logged in without a header.

A browser cannot send the bearer token a person's assistant uses, and pasting a long-lived token into
a web page is worse. So a person logs in with a link their assistant asks for:

1. `create_gallery_link` (a tool, shared mode only) answers `<server>/gallery/login/<link>`: 256 random
   bits, bound to the caller's principal, usable once within ten minutes (`uploads.LINK_SECONDS`).
2. Opening it shows one button; pressing it (a POST: a link preview or a prefetch, which only GET, never
   spends a link) spends it (a create-only write in the store: one winner on any replica) and sets a
   session cookie (`flux_gallery`: HttpOnly, SameSite=Lax, Path=/gallery, Secure over https) for
   SESSION_SECONDS, then redirects to `/gallery/`. A spent, expired or unknown link is refused, and so
   is a POST another site's page sends (its Origin is not this server's).
3. Every gallery request reads the session's principal (kept in the store, so any replica knows it) and
   shows that principal's jobs only; another person's id is answered as one that does not exist.
   Full images are presigned URLs of the bucket (the page is allowed to load images from it), never a
   path on the server; thumbnails are made by the server from the stored image.

The routes are the gallery's own (`Gallery`), registered on the MCP server's HTTP app; the bearer check
lets `/gallery` through in shared mode because the session cookie guards it instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..uploads import LINK_SECONDS, Ticket, digest, new_link, public_base
from . import Gallery

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ..journal import Record

COOKIE = "flux_gallery"
SESSION_SECONDS = 12 * 3600.0
"""How long a gallery login lasts in the browser."""
PREFIX = "/gallery"
_CACHE_MAX = 4096

GALLERY_DOC = """A one-time link (10 min) for the user: opens their own image gallery in a browser."""


def gallery_link_text(base: str, link: str, ticket: Ticket) -> tuple[str, dict[str, Any]]:
    url = f"{base}{PREFIX}/login/{link}"
    minutes = round((ticket.expires_at - ticket.created_at) / 60)
    text = (f"Gallery login link for the user (one use, valid {minutes} min; it logs their browser in for "
            f"{SESSION_SECONDS / 3600:g} h): {url}\nGive it to the user to open; do not open it yourself.")
    return text, {"url": url, "expires_in_seconds": int(ticket.expires_at - ticket.created_at)}


class Logins:
    """One-time login links and the sessions they start, kept in the image store (`uploads.ObjectStore`)."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self._sessions: dict[str, Ticket] = {}

    async def create(self, principal: str) -> tuple[str, Ticket]:
        link, now = new_link(), self.clock()
        ticket = Ticket(principal, now, now + LINK_SECONDS)
        await self.store.put_object(f"gallery/{digest(link)}/login.json", ticket.dump(), create=True)
        return link, ticket

    async def usable(self, link: str) -> Ticket | None:
        """The ticket of `link` if it can still log someone in (known, not expired, not spent)."""
        if len(link) != 43:
            return None
        folder = f"gallery/{digest(link)}"
        ticket = Ticket.load(await self.store.get_object(f"{folder}/login.json"))
        if ticket is None or self.clock() > ticket.expires_at or await self.store.get_object(f"{folder}/used"):
            return None
        return ticket

    async def log_in(self, link: str) -> tuple[str, Ticket] | None:
        """Spends `link` and starts a session: (session secret, its ticket); None when the link is unknown,
        spent or expired."""
        ticket = await self.usable(link)
        now = self.clock()
        if ticket is None:
            return None
        if not await self.store.put_object(f"gallery/{digest(link)}/used", b"1", create=True):
            return None  # spent already (by this browser or another, on any replica)
        secret = new_link()
        session = Ticket(ticket.principal, now, now + SESSION_SECONDS)
        await self.store.put_object(f"gallery/{digest(secret)}/session.json", session.dump(), create=True)
        return secret, session

    async def principal(self, request: Request) -> str | None:
        """Whose session the request's cookie is (None: no valid session)."""
        secret = request.cookies.get(COOKIE, "")
        if len(secret) != 43:
            return None
        key = digest(secret)
        session = self._sessions.get(key)
        if session is None:
            session = Ticket.load(await self.store.get_object(f"gallery/{key}/session.json"))
            if session is None:
                return None
            if len(self._sessions) >= _CACHE_MAX:
                self._sessions.clear()
            self._sessions[key] = session
        if self.clock() > session.expires_at:
            self._sessions.pop(key, None)
            return None
        return session.principal


class SharedGallery(Gallery):
    """The gallery over a shared server's journal and bucket, for the principal of the session cookie."""

    def __init__(self, service: Callable[[], Any]):
        running = service()
        super().__init__(lambda: service().journal, running.store,
                         principal=lambda request: request.state.flux_principal, allowed_hosts=None)
        self.logins = Logins(running.store, running.money.clock)

    async def journal(self) -> Any:
        return self._open_journal()  # the running server's own journal (opened and closed by it)

    async def shown(self, row: dict[str, Any], record: Record) -> dict[str, Any]:
        """No server path in a row: each kept image has a presigned `download` URL instead."""
        presign = getattr(self.store, "presign", None)
        for image, kept in zip(row["images"], record.images, strict=True):
            location = image.pop("path", None) or kept.path
            image["path"] = None
            image["kept"] = bool(location)
            image["download"] = await presign(location) if presign is not None and location else None
        return row

    async def image(self, request: Request) -> Response:
        from starlette.responses import RedirectResponse

        record = await self.record(request)
        raw = str(request.path_params["index"])
        index = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 4 else None
        presign = getattr(self.store, "presign", None)
        if record is None or index is None or index >= len(record.images) or not record.images[index].path \
                or presign is None:
            return await super().image(request)  # not found, or a store without links: the bytes themselves
        url = await presign(str(record.images[index].path))
        return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"}) if url else \
            await super().image(request)

    async def image_origin(self) -> str:
        origin = getattr(self.store, "presign_origin", None)
        return await origin() if origin is not None else ""


def add_gallery_routes(server: Any, service: Callable[[], Any]) -> None:
    """The gallery's routes under /gallery, each behind the session cookie (see the module text)."""
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse

    made: list[SharedGallery] = []

    def gallery() -> SharedGallery | None:
        if not made and service() is not None:
            made.append(SharedGallery(service))
        return made[0] if made else None

    def guarded(handler: Callable[[SharedGallery, Request], Any], *, page: bool = False) -> Any:
        async def route(request: Request) -> Response:
            shown = gallery()
            if shown is None:
                return JSONResponse({"error": "starting"}, status_code=503)
            who = await shown.logins.principal(request)
            if who is None:
                if page:
                    return HTMLResponse(_LOGIN_PAGE, status_code=401, headers={"Cache-Control": "no-store"})
                return JSONResponse({"error": "not logged in: open a link from create_gallery_link"},
                                    status_code=401)
            request.state.flux_principal = who
            response: Response = await handler(shown, request)
            return response
        return route

    async def index(shown: SharedGallery, request: Request) -> Response:
        response = await shown.index(request)
        origin = await shown.image_origin()
        if origin:
            policy = response.headers["content-security-policy"]
            response.headers["content-security-policy"] = policy.replace("img-src 'self' data:",
                                                                         f"img-src 'self' data: {origin}")
        return response

    async def login(request: Request) -> Response:
        shown = gallery()
        if shown is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        link = str(request.path_params["link"])
        if request.method == "GET":  # a look only (a person, or a link preview): the button spends the link
            usable = await shown.logins.usable(link) is not None
            return HTMLResponse(_CONFIRM_PAGE if usable else _SPENT_PAGE, status_code=200 if usable else 410,
                                headers={**_PAGE_HEADERS, "Content-Security-Policy": (
                                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                    "base-uri 'none'; frame-ancestors 'none'")})
        origin = request.headers.get("origin")
        if origin is not None and origin != public_base(request) and origin != f"{request.url.scheme}://" \
                f"{request.headers.get('host', '')}":
            return HTMLResponse(_SPENT_PAGE, status_code=403, headers=_PAGE_HEADERS)
        started = await shown.logins.log_in(link)
        if started is None:
            return HTMLResponse(_SPENT_PAGE, status_code=410, headers=_PAGE_HEADERS)
        secret, session = started
        response = RedirectResponse(f"{PREFIX}/", status_code=303, headers={"Cache-Control": "no-store",
                                                                              "Referrer-Policy": "no-referrer"})
        base = public_base(request) or ""
        response.set_cookie(COOKIE, secret, max_age=int(session.expires_at - session.created_at), path=PREFIX,
                            httponly=True, samesite="lax", secure=base.startswith("https://"))
        return response

    async def to_index(_: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    server.custom_route(PREFIX, methods=["GET"])(to_index)
    server.custom_route(f"{PREFIX}/", methods=["GET"])(guarded(index, page=True))
    server.custom_route(f"{PREFIX}/login/{{link}}", methods=["GET", "POST"])(login)
    for path, handler in (("/api/predictions", SharedGallery.predictions),
                          ("/api/predictions/{prediction_id:str}", SharedGallery.prediction),
                          ("/thumb/{prediction_id:str}/{index:str}", SharedGallery.thumbnail),
                          ("/image/{prediction_id:str}/{index:str}", SharedGallery.image)):
        server.custom_route(PREFIX + path, methods=["GET"])(guarded(handler))


_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}
"""`same-origin`, not `no-referrer`: under the latter a browser sends `Origin: null` with the form's POST."""
_CONFIRM_PAGE = """<!doctype html><meta charset="utf-8"><title>FLUX gallery</title>
<form method="post"><p>This link logs this browser in to your FLUX gallery, once.</p>
<button id="open" type="submit">Open my gallery</button></form>"""
_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>FLUX gallery</title>
<p>Not logged in. Ask your assistant for a gallery link (its <code>create_gallery_link</code> tool) and open it
here: it logs this browser in to your own images.</p>"""
_SPENT_PAGE = """<!doctype html><meta charset="utf-8"><title>FLUX gallery</title>
<p>This gallery link was used already, has expired or is unknown. Ask your assistant for a new one
(<code>create_gallery_link</code>); each link works once, within ten minutes.</p>"""
