"""The gallery: the journal as a web page of thumbnails, served by `flux-mcp gallery` and at `/gallery`.

One self-contained page (`static/index.html`: no CDN, no external asset, works offline) and a small
JSON API beside it, all relative to where the app is mounted:

* `api/predictions?query=&provider=&status=&since=&before=&limit=` — a page of jobs, newest first, and
  the cursor of the next one;
* `api/predictions/<id>` — one job with the provenance embedded in each of its image files;
* `thumb/<id>/<n>` and `image/<id>/<n>` — a thumbnail (made here, cached) and the full image.

The gallery only reads. It never calls a provider, needs no key and writes nothing: a job that is
still pending changes when the server (or any process sharing the data folder) checks on it, and the
page, which polls every few seconds while it shows pending jobs, updates by itself. Images are served
only from the paths journal records name, through the image store; no request names a file. A Host
check refuses DNS-rebinding pages (a gallery on 127.0.0.1 without a token would otherwise hand the
prompts and images to any website the user visits).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from importlib.resources import files
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import history
from ..errors import FluxError
from ..journal import Journal, Record
from ..providers import registry
from ..store import ImageStore
from .thumbs import Thumbnails

log = logging.getLogger("flux_mcp.gallery")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
PAGE_SIZE = 60


def static_text(name: str) -> str:
    """A file of the package's `static` folder (the gallery page, the MCP App)."""
    return files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _image_type(data: bytes) -> str:
    from ..server import image_type

    return image_type(data) or "application/octet-stream"


class Gallery:
    """The gallery's state: where records and images come from, whose records it shows, the thumbnails."""

    def __init__(self, journal: Callable[[], Journal], store: ImageStore, *,
                 principal: Callable[[Request], str | None] = lambda _: None,
                 allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS):
        self._open_journal = journal
        self._journal: Journal | None = None
        self._opening = anyio.Lock()
        self.store = store
        self.principal = principal
        self.allowed_hosts = allowed_hosts
        """Host names (any port) the page may be reached under; None: no check (a token guards the app)."""
        self.thumbs = Thumbnails(store)
        self.page = static_text("index.html")

    async def journal(self) -> Journal:
        async with self._opening:
            if self._journal is None:
                self._journal = await anyio.to_thread.run_sync(self._open_journal)
            return self._journal

    async def aclose(self) -> None:
        if self._journal is not None:
            await self._journal.close()
            self._journal = None

    async def record(self, request: Request) -> Record | None:
        """The record named in the path, if the caller may see it."""
        record = await (await self.journal()).get(request.path_params["prediction_id"])
        who = self.principal(request)
        if record is None or (who is not None and record.principal != who):
            return None
        return record

    # --- routes ---------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        return Response(self.page.replace("{{nonce}}", nonce), media_type="text/html; charset=utf-8",
                        headers={**_SECURITY, "Cache-Control": "no-store", "Content-Security-Policy": (
                            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                            "frame-ancestors 'none'")})

    async def predictions(self, request: Request) -> Response:
        q = request.query_params
        try:
            since = _since(q.get("since", ""))
            limit = int(q.get("limit") or PAGE_SIZE)
            found = await history.page(await self.journal(), principal=self.principal(request),
                                       query=q.get("query"), provider=q.get("provider"), status=q.get("status"),
                                       since=since, limit=limit, before=q.get("before") or None)
        except (FluxError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400, headers=_SECURITY)
        rows = [await self.shown(history.full(r), r) for r in found.records]
        return JSONResponse({"predictions": rows, "next": found.next,
                             "providers": registry.ids()}, headers={**_SECURITY, "Cache-Control": "no-store"})

    async def prediction(self, request: Request) -> Response:
        record = await self.record(request)
        if record is None:
            return JSONResponse({"error": "no such prediction"}, status_code=404, headers=_SECURITY)
        row = history.full(record)
        for image, shown in zip(record.images, row["images"], strict=True):
            shown["provenance"] = await self._provenance(image.path)
            shown["on_disk"] = await self.store.present(image.path)
        row["request"] = {k: v for k, v in record.request.items() if k != "prompt"}
        row = await self.shown(row, record)
        return JSONResponse(row, headers={**_SECURITY, "Cache-Control": "no-store"})

    async def shown(self, row: dict[str, Any], record: Record) -> dict[str, Any]:
        """A row as the page gets it (a shared server's gallery hides server paths: `remote`)."""
        return row

    async def _provenance(self, path: str | None) -> dict[str, str]:
        if not path:
            return {}
        try:
            data = await self.store.read(path)
        except OSError:
            return {}
        from ..images import read_provenance  # the image code, imported when a page first asks for details

        return await anyio.to_thread.run_sync(read_provenance, data)

    async def thumbnail(self, request: Request) -> Response:
        record = await self.record(request)
        index = _index(request)
        thumb = None if record is None or index is None else await self.thumbs.get(record, index)
        if thumb is None:
            return Response(status_code=404, headers=_SECURITY)
        return Response(thumb, media_type="image/webp",
                        headers={**_SECURITY, "Cache-Control": "private, max-age=86400"})

    async def image(self, request: Request) -> Response:
        record = await self.record(request)
        index = _index(request)
        if record is None or index is None or index >= len(record.images) or not record.images[index].path:
            return Response(status_code=404, headers=_SECURITY)
        try:
            data = await self.store.read(str(record.images[index].path))
        except OSError:
            return Response(status_code=404, headers=_SECURITY)
        return Response(data, media_type=_image_type(data),
                        headers={**_SECURITY, "Cache-Control": "private, max-age=3600"})

    def app(self, *, lifespan: bool = False) -> Starlette:
        """The ASGI app. `lifespan` closes the journal when the app stops (a mounted app gets no lifespan
        events in Starlette: the mounting server's process exit releases it instead)."""

        @contextlib.asynccontextmanager
        async def span(_: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await self.aclose()

        routes = [
            Route("/", self.index),
            Route("/api/predictions", self.predictions),
            Route("/api/predictions/{prediction_id:str}", self.prediction),
            Route("/thumb/{prediction_id:str}/{index:str}", self.thumbnail),
            Route("/image/{prediction_id:str}/{index:str}", self.image),
        ]
        app = Starlette(routes=routes, lifespan=span if lifespan else None)
        return HostCheck(app, self.allowed_hosts) if self.allowed_hosts is not None else app  # type: ignore[return-value]


_SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def _since(raw: str) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        return float(raw)  # the page's own polls send epoch seconds
    except ValueError:
        return history.parse_since(raw)


def _index(request: Request) -> int | None:
    raw = str(request.path_params["index"])
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 4 else None


class HostCheck:
    """Refuses requests whose Host is not one of `hosts` (any port): a page from another site that made
    its name resolve to 127.0.0.1 (DNS rebinding) gets nothing."""

    def __init__(self, app: Any, hosts: Sequence[str]):
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.hosts:
                response = Response("Unknown host.", status_code=421, media_type="text/plain")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(settings: Any, *, port: int = 0, open_browser: bool = True, out: Any = None) -> int:
    """`flux-mcp gallery`: the gallery of the data folder on 127.0.0.1 (`port` 0: a free one) until Ctrl-C."""
    import socket
    import sys
    import webbrowser

    import uvicorn

    from ..journal import open_journal
    from ..store import FolderStore

    out = out or sys.stdout
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        print(f"flux-mcp: cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another --port, or omit it "
              "for a free one.", file=sys.stderr)
        return 2
    sock.listen(64)  # listening already: the browser opened below waits in the backlog until uvicorn accepts
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    gallery = Gallery(lambda: open_journal(settings.home), FolderStore(settings.home))
    config = uvicorn.Config(gallery.app(lifespan=True), log_level="warning", access_log=False, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=2)
    print(f"Gallery of {settings.home} at {url} (Ctrl-C to stop)", file=out, flush=True)
    if open_browser:
        webbrowser.open(url)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
