"""The MCP wiring: `build_server()` and the four thin tools."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import httpx2
from mcp.server.apps import Apps
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.prompts import Prompt
from mcp_types import (
    CallToolResult,
    EmptyResult,
    Icon,
    InputRequiredResult,
    SetLevelRequestParams,
    TextContent,
    ToolAnnotations,
)
from mcp_types import Tool as MCPTool
from pydantic import AnyUrl, Field

if TYPE_CHECKING:
    from .replica import Replica

from . import __version__, heap, history
from .backends import open_journal, open_store
from .compat import add_request_handler, drop_middleware, registered_tool
from .config import Settings
from .errors import FluxError, error_result
from .folders import Folders
from .http import LazyClient, RetryPolicy
from .icons import GLYPHS
from .icons import icons as tool_icons
from .models import PredictionResult, UploadResult
from .paths import PathPolicy
from .prompts import add_prompts
from .providers import overview, registry
from .redact import Redactor, protect_logs
from .request import MAX_WAIT_SECONDS, JobRequest, Kind, tool_parameters
from .schema import compact_annotations, compact_input, compact_output, quiet
from .shared import LOCAL, PRINCIPAL_KEY, REFUSED_HERE, add_health_routes, present
from .uploads import SHARED_IMAGE, SHARED_UPLOAD_PATH

if TYPE_CHECKING:
    from .jobs import Alive, Outcome
    from .journal import Journal, Record
    from .media import DownloadLimits
    from .oauth import ResourceServer
    from .service import FluxService, ProgressFn

log = logging.getLogger("flux_mcp.server")

INSTRUCTIONS = """\
Generate and edit images with FLUX models. generate_image makes new images from a prompt;
edit_image changes an existing image (URL, local path or data: URI) following a prompt.
Finished images are saved locally: use the path from the result in code (pass save_to to put
the file straight into the project, e.g. "public/hero.png"). A job still running when the call
returns is not lost: call check_prediction with its prediction_id. Never call generate_image
again for the same request just because it is pending: each call is a new paid job."""



@dataclass
class AppState:
    """Process-wide resources, built once by the lifespan."""

    settings: Settings
    journal: Journal
    """Opened at start: an unusable data folder or database stops the server there, in one line."""
    client: httpx2.AsyncClient | LazyClient
    make_service: Callable[[], FluxService]
    folders: Folders
    """The folder policy of each client session (FLUX_MCP_ALLOWED_DIRS, the client's roots, the working
    directory) and its caches."""
    paths: PathPolicy | None = None
    """A folder policy fixed by the caller of build_server (the terminal's `generate -o`), used instead of
    the roots and the settings."""
    replica: Replica | None = None
    """Shared mode: this process's `replica.Replica` (heartbeat, reconciler, wake-ups); None on SQLite."""

    @functools.cached_property
    def service(self) -> FluxService:
        """The service, made on first use: the job machinery (the providers' adapters, the runner, the
        ledger, image work) is imported then, not before the first `tools/list` answer."""
        service = self.make_service()
        heap.settled()  # what that import and construction made lives as long as the process
        return service


ProviderArg = Annotated[str | None, Field(max_length=40, json_schema_extra=quiet("maxLength"))]

APP_URI = "ui://flux-mcp/app"
"""The MCP App: a result's images and the recent gallery, in clients that render Apps."""
APP_META = {"ui": {"resourceUri": APP_URI}}
"""What a tool carries in `tools/list` to be shown through the App (other clients ignore it)."""

PredictionOut = Annotated[CallToolResult, PredictionResult]
UploadOut = Annotated[CallToolResult, UploadResult]
ListingOut = Annotated[CallToolResult, history.Listing]


def build_server(settings: Settings, *, http_client: httpx2.AsyncClient | None = None,
                 retry: RetryPolicy | None = None, downloads: DownloadLimits | None = None,
                 paths: PathPolicy | None = None, clock: Callable[[], float] = time.time,
                 oauth: ResourceServer | None = None) -> MCPServer[AppState]:
    """Builds a server; nothing is opened until its lifespan starts. `http_client` lets tests inject a
    client over `httpx2.MockTransport`; `retry` and `downloads` tune the network limits. `paths` fixes
    the folders every call may use (the terminal's `generate -o`: the person chose the path), instead
    of FLUX_MCP_ALLOWED_DIRS and the client's roots. `clock` is the time the budgets and confirmations
    are kept by (tests move it). `oauth` makes the HTTP apps an OAuth resource server (see `oauth`)."""

    # One state per server, shared by every lifespan entry (SSE enters it once per connection).
    live: list[AppState] = []
    users = 0
    lock = anyio.Lock()

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        nonlocal users
        async with lock:
            if not live:
                live.append(await _open_state(settings, http_client, retry, downloads, paths, clock))
            users += 1
        try:
            yield live[0]
        finally:
            async with lock:
                users -= 1
                if users == 0:
                    await _close_state(live.pop(), own_client=http_client is None)

    server = _Server(
        "flux-mcp", title="FLUX image generation", version=__version__, instructions=INSTRUCTIONS, icons=tool_icons("server"),
        lifespan=lifespan, extensions=[_app()], log_level=settings.log_level if settings.log_level in
        ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO",  # type: ignore[arg-type]
        **(oauth.server_kwargs() if oauth is not None else {}),
    )

    # Handshake-era clients send logging/setLevel, which MCPServer has no handler for (-32601). This server
    # sends no log notifications, so the level is simply accepted; 2026-07-28 requests still get -32601.
    add_request_handler(server, "logging/setLevel", SetLevelRequestParams, _accept_log_level)
    if not settings.tracing:
        # The SDK wraps every message in an OpenTelemetry span, a no-op without an exporter that still
        # costs each call; dropping it is the SDK's documented opt-out. Set any OTEL_* variable (as
        # `opentelemetry-instrument` does) to keep the spans.
        drop_middleware(server, "OpenTelemetryMiddleware")

    job_annotations = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                      open_world_hint=True)

    # Shared mode: the parameters refused there (they name the server's disk) are not listed, which keeps
    # tools/list within its bound with the link tools; a call that sends one gets the refusal saying why.
    dropped = frozenset(REFUSED_HERE) if settings.shared else frozenset()
    server.refused_here = REFUSED_HERE if settings.shared else {}
    server.tool_icons = settings.tool_icons
    provider = provider_text(settings)
    described = {"provider": provider, "wait_seconds": (
        f"Default {settings.wait_seconds:g}, at most {settings.max_wait_seconds:g}.")}
    server.tool(title="Generate image", annotations=job_annotations, meta=APP_META)(
        _job_tool("generate_image", "generate", "Generated", GENERATE_DOC, {**described}, drop=dropped))
    # edit_image's other parameters mean what generate_image's do, and its description says so: the
    # model reads both tools, so their descriptions are not paid for twice.
    as_generate = dict.fromkeys(JobRequest.model_fields.keys() - {"prompt", "image"})
    server.tool(title="Edit image", annotations=job_annotations, meta=APP_META)(
        _job_tool("edit_image", "edit", "Edited", EDIT_DOC, {
            **as_generate, "prompt": "The change, e.g. 'make the sky a sunset'.",
            **({"image": SHARED_IMAGE} if settings.shared else {})}, drop=dropped))

    async def upload_media(
        path: Annotated[str, Field(min_length=1, max_length=4096, json_schema_extra=quiet("minLength", "maxLength"),
                                   description="A PNG, JPEG, WebP or GIF in the project.")],
        ctx: Context[AppState, Any],
        provider: ProviderArg = None,
    ) -> UploadOut:
        """A provider URL for a local image (edit_image takes paths too); provider as generate_image."""
        state = _state(ctx)
        try:
            paths = await _path_policy(ctx, state)
            result = await state.service.upload(path, provider, paths, principal=principal_of(ctx))
        except FluxError as exc:
            return error_result(state.service.redactor.scrub(str(exc)))
        text = (f"Uploaded {paths.display(result.path)} to {result.provider}"
                f"{' (reused the earlier upload)' if result.reused else ''}.\nURL: {result.url}\n"
                "Pass this URL as `image` to edit_image. Provider storage is temporary.")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=result.model_dump(mode="json"))

    server.tool(title="Upload image", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True))(
        _redescribe(upload_media, path=SHARED_UPLOAD_PATH) if settings.shared else upload_media)

    async def check_prediction(
        prediction_id: Annotated[str, Field(min_length=3, max_length=230,
                                            json_schema_extra=quiet("minLength", "maxLength"))],
        ctx: Context[AppState, Any],
        wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS, json_schema_extra=quiet("minimum", "maximum"),
                                             description="Seconds to wait if still running (0 = just look).")]
        = 0,
    ) -> PredictionOut:
        """Status and images of a generate_image or edit_image prediction_id, even after a restart."""
        state = _state(ctx)
        try:
            paths = await _path_policy(ctx, state)
            outcome = await state.service.check(prediction_id, wait_seconds, paths, _progress(ctx, state),
                                                principal=principal_of(ctx))
        except FluxError as exc:
            return error_result(state.service.redactor.scrub(str(exc)))
        return await _deliver(ctx, state, outcome, await _render(outcome, paths, state, "Finished"))

    server.tool(title="Check prediction", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True))(
        _redescribe(check_prediction, wait_seconds=(
            f"Wait if still running: at most {settings.max_wait_seconds:g}.")))

    _add_history(server)
    _add_resources(server, settings)
    add_prompts(server)
    add_health_routes(server, lambda: live[0].service if live else None)
    if settings.shared:  # remote users: upload links and their own gallery (see `remote`)
        from .remote import add_remote_io

        add_remote_io(server, lambda: live[0].service if live else None, principal_of)
    return server


async def _open_state(settings: Settings, http_client: httpx2.AsyncClient | None, retry: RetryPolicy | None,
                      downloads: DownloadLimits | None, paths: PathPolicy | None = None,
                      clock: Callable[[], float] = time.time) -> AppState:
    protect_logs(settings.secrets())
    journal = await open_journal(settings)
    store = open_store(settings)
    client: httpx2.AsyncClient | LazyClient = http_client or LazyClient()

    def make_service() -> FluxService:
        from .media import Downloader, DownloadLimits
        from .service import FluxService

        limits = downloads or DownloadLimits()
        downloader = Downloader(client, max_bytes=limits.max_bytes, deadline=limits.deadline,
                                attempts=limits.attempts)
        return FluxService(settings, client, journal, store=store, redactor=Redactor(settings.secrets()),
                           retry=retry, downloader=downloader, clock=clock)

    state = AppState(settings, journal, client, make_service, Folders(settings), paths=paths)
    if settings.database_url is not None:  # shared mode: this replica's part in the cluster
        from .journal_pg import PgJournal
        from .replica import Replica

        if isinstance(journal, PgJournal):
            service = state.service  # made now: the replica finishes other replicas' jobs from the start
            state.replica = Replica(journal, service.runner, service.providers, paths or PathPolicy([], settings.home))
            await state.replica.start()
    return state


async def _close_state(state: AppState, *, own_client: bool) -> None:
    from .lifecycle import STOP_TIMEOUT, inflight

    if inflight.count:  # a call admitted during the stop may still be submitting: its id is journaled first
        await inflight.drain(STOP_TIMEOUT)
    if state.replica is not None:
        await state.replica.stop()  # its leases end now: other replicas take its jobs over at once
    if own_client:
        await state.client.aclose()
    await state.journal.close()
    if "service" in state.__dict__:  # a job ran: every image written is on stable storage before exit
        from .media import flush_pending

        await anyio.to_thread.run_sync(flush_pending)


async def _accept_log_level(_ctx: Any, _params: SetLevelRequestParams) -> EmptyResult:
    return EmptyResult()


GENERATE_DOC = """Generate images with FLUX: local paths (use in code), a preview. Still running after \
wait_seconds: a prediction_id for check_prediction (calling again pays again)."""
EDIT_DOC = """Edit an image by instruction (FLUX Kontext or img2img); parameters and answer as generate_image."""


def _app_html() -> str:
    """The MCP App's page, read from the gallery package's files without importing the gallery (its web
    server is for `flux-mcp gallery` and the HTTP transports)."""
    return (Path(__file__).parent / "gallery" / "static" / "app.html").read_text(encoding="utf-8")


def _job_tool(name: str, kind: Kind, action: str, doc: str, descriptions: dict[str, str | None], *,
              drop: frozenset[str] = frozenset()) -> Any:
    """A generate/edit tool whose parameters are `JobRequest`'s fields (see request.tool_parameters)."""

    async def tool(ctx: Context[AppState, Any], **args: Any) -> CallToolResult | InputRequiredResult:
        return await _run_job(ctx, JobRequest(kind=kind, **args), action=action)

    params = [p for p in tool_parameters(kind, descriptions) if p.name not in drop]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context[AppState, Any])
    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = doc
    tool.__signature__ = inspect.Signature([*params, context], return_annotation=PredictionOut)  # type: ignore[attr-defined]
    tool.__annotations__ = {**{p.name: p.annotation for p in params}, "ctx": Context[AppState, Any],
                            "return": PredictionOut}
    return tool


def _redescribe(fn: Any, **texts: str) -> Any:
    """Gives parameters of `fn` descriptions known only when the server is built (e.g. its limits)."""
    sig = inspect.signature(fn, eval_str=True)
    params = [p.replace(annotation=Annotated[p.annotation, Field(description=texts[p.name])])
              if p.name in texts else p for p in sig.parameters.values()]
    fn.__signature__ = sig.replace(parameters=params)
    fn.__annotations__ = {**{p.name: p.annotation for p in params}, "return": sig.return_annotation}
    return fn


async def _run_job(ctx: Context[AppState, Any], req: JobRequest, *, action: str
                   ) -> CallToolResult | InputRequiredResult:
    from .consent import InputNeeded, asker
    from .money import Planned

    state = _state(ctx)
    try:
        paths = await _path_policy(ctx, state)
        outcome = await state.service.run(req, paths, _progress(ctx, state), asker(ctx, state.service.money.clock),
                                          principal_of(ctx), alive=_caller_alive(ctx))
    except InputNeeded as needed:  # 2026-07-28: the user is asked first; the client calls again with the answer
        return needed.result
    except FluxError as exc:
        return error_result(state.service.redactor.scrub(str(exc)))
    if isinstance(outcome, Planned):
        return CallToolResult(content=[TextContent(type="text", text=outcome.message)],
                              structured_content=outcome.result().model_dump(mode="json"))
    return await _deliver(ctx, state, outcome, await _render(outcome, paths, state, action))


def principal_of(ctx: Context[AppState, Any]) -> str:
    """Who is calling (whose jobs, whose budget): the authenticated identity over HTTP (an OAuth access
    token's subject, or the user FLUX_MCP_AUTH_TOKENS names for the bearer token presented), else the local
    user."""
    token = get_access_token()
    if token is not None:
        return token.subject or token.client_id
    try:
        request = ctx.request_context.request
    except (AttributeError, ValueError, LookupError):
        return LOCAL
    scope = getattr(request, "scope", None)
    state = scope.get("state") if isinstance(scope, dict) else None
    principal = state.get(PRINCIPAL_KEY) if isinstance(state, dict) else None
    return principal if isinstance(principal, str) and principal else LOCAL


def _caller_alive(ctx: Context[AppState, Any]) -> Alive | None:
    """Whether the caller of this request is still connected (HTTP transports; None where it cannot be told)."""
    is_disconnected = getattr(ctx.request_context.request, "is_disconnected", None)
    if is_disconnected is None:
        return None

    async def alive() -> bool:
        return not await is_disconnected()

    return alive


async def _deliver(ctx: Context[AppState, Any], state: AppState, outcome: Outcome,
                   result: CallToolResult) -> CallToolResult:
    """Records that this answer reaches the caller, unless the caller is known to be gone (its HTTP request
    was dropped): a job whose answer never arrived is joined by the caller's identical next call instead of
    paid for again. A cancelled call never gets here."""
    alive = _caller_alive(ctx)
    if alive is not None and not await alive():
        log.info("the caller of %s is gone; its answer is not delivered", outcome.record.id)
        return result
    if not outcome.record.delivered:  # a job whose answer already reached the caller needs no write
        await state.journal.mark_delivered(outcome.record.id)
    return result



async def _render(outcome: Any, paths: PathPolicy, state: AppState, action: str) -> CallToolResult:
    from .render import needs_image_work, prediction_result

    settings = state.settings
    outcome = await present(outcome, state.service.store)  # shared mode: download links, previews from the bucket
    render = functools.partial(prediction_result, outcome, paths, settings, action=action)
    if needs_image_work(outcome, settings):
        # Shrinking previews decodes and encodes images: CPU work that must not stall the other calls.
        return await anyio.to_thread.run_sync(render)
    return render()


def _state(ctx: Context[AppState, Any]) -> AppState:
    return ctx.request_context.lifespan_context


def _progress(ctx: Context[AppState, Any], state: AppState) -> ProgressFn:
    scrub = state.service.redactor.scrub

    async def report(progress: float, total: float | None, message: str) -> None:
        try:
            await ctx.report_progress(progress, total, scrub(message))
        except Exception as exc:  # noqa: BLE001 - a client that went away must not break the wait
            log.debug("progress not sent: %s", exc)

    return report


async def _path_policy(ctx: Context[AppState, Any], state: AppState) -> PathPolicy:
    """The folders this call may read and write: a policy fixed when the server was built, else
    `folders.Folders.policy_for`."""
    if state.paths is not None:
        return state.paths
    return await state.folders.policy_for(ctx)


# --- history ------------------------------------------------------------------------------------------

def _add_history(server: MCPServer[AppState]) -> None:
    """list_predictions and the paginated flux://history resource: the journal for the model, newest first."""

    @server.tool(title="List predictions", annotations=ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False), meta=APP_META)
    async def list_predictions(
        ctx: Context[AppState, Any],
        query: str | None = None,
        provider: Annotated[str | None, Field(max_length=40, json_schema_extra=quiet("maxLength"),
                                              description="Only this provider's jobs.")] = None,
        status: Literal["succeeded", "failed", "canceled", "pending", "unknown"] | None = None,
        since: Annotated[str | None, Field(description='"2d", "yesterday", a date...')] = None,
        limit: Annotated[int, Field(ge=1, le=history.MAX_LIMIT)] = 20,
    ) -> ListingOut:
        """Earlier generate/edit jobs, newest first, found by prompt words."""
        state = _state(ctx)
        try:
            found = await history.page(
                state.service.journal, principal=principal_of(ctx), query=query,
                provider=(provider or "").strip().lower(), status=status,
                since=history.parse_since(since) if since else None, limit=limit)
        except FluxError as exc:
            return error_result(str(exc))
        rows = [history.compact(r) for r in found.records]
        return CallToolResult(content=[TextContent(type="text", text=history.model_text(found.records,
                                                                                         found.next is not None))],
                              structured_content={"predictions": rows, "more": found.next is not None})

    @server.resource("flux://history{?before,query,provider,status,since,limit}", name="history",
                     mime_type="application/json",
                     description="Earlier predictions, newest first, a page at a time (`next` is the next page's URI).")
    async def history_resource(ctx: Context[AppState, Any], before: str = "", query: str = "", provider: str = "",
                               status: str = "", since: str = "", limit: str = "20") -> str:
        try:
            count = int(limit) if limit.isascii() and limit.isdigit() else 20
            found = await history.page(
                _state(ctx).service.journal, principal=principal_of(ctx), query=query, provider=provider,
                status=status, since=history.parse_since(since) if since else None, limit=count, before=before or None)
        except FluxError as exc:
            raise ResourceNotFoundError(str(exc)) from None
        args = {k: v for k, v in {"query": query, "provider": provider, "status": status, "since": since,
                                  "limit": limit if limit != "20" else ""}.items() if v}
        following = None
        if found.next:
            from urllib.parse import urlencode

            following = "flux://history?" + urlencode({**args, "before": found.next})
        return json.dumps({"predictions": [history.compact(r) for r in found.records], "next": following}, indent=1)


def _app() -> Apps:
    """The MCP App (the SDK's Apps extension): one self-contained page, `static/app.html`, that shows the
    images of the result it is given and the recent gallery, reading them through the host as resources
    (flux://thumbnails, flux://images, flux://history). Clients without Apps get the same results as ever."""
    apps = Apps()
    apps.add_html_resource(APP_URI, _app_html(), name="gallery-app", title="FLUX gallery",
                           description="The images of a result and the recent gallery (MCP App).", prefers_border=True)
    return apps


# --- resources ---------------------------------------------------------------------------------------

def _add_resources(server: MCPServer[AppState], settings: Settings) -> None:
    """The prediction, image and thumbnail resources, and the providers. The templated ones read the journal
    of the server answering the request
    (through its request context); an id this server never returned is the SDK's not-found error
    (-32602), logged at INFO without a traceback."""

    @server.resource("flux://providers", name="providers", mime_type="application/json",
                     description="Each provider: configured or not (and the variable to set), models, capabilities.")
    async def providers_resource() -> str:
        # Static resources get no request context in the SDK; this one needs none: it is the settings.
        return json.dumps(overview(settings), indent=2)

    @server.resource("flux://predictions/{prediction_id}", name="prediction", mime_type="application/json",
                     description="A prediction made by this server, as JSON (status, images, error).")
    async def prediction_resource(prediction_id: str, ctx: Context[AppState, Any]) -> str:
        record = await _record(ctx, prediction_id)
        if record is None:
            raise ResourceNotFoundError(f"No prediction {prediction_id!r} on this server.")
        from .jobs import Outcome
        from .render import structured

        shown = await present(Outcome(record), _state(ctx).service.store, previews=False)
        return json.dumps(structured(shown.record, _state(ctx).settings), indent=2)

    @server.resource("flux://images/{prediction_id}/{index}", name="image", mime_type="image/png",
                     description="A finished image of a prediction, full resolution.")
    async def image_resource(prediction_id: str, index: str, ctx: Context[AppState, Any]) -> bytes:
        record = await _record(ctx, prediction_id)
        if record is None or not (index.isascii() and index.isdigit()) or int(index) >= len(record.images):
            raise ResourceNotFoundError(f"No image {index} for prediction {prediction_id!r} on this server.")
        path = record.images[int(index)].path
        try:
            if path:
                return await _state(ctx).service.store.read(path)
        except OSError:
            pass
        raise ResourceNotFoundError(
            f"Image {index} of {prediction_id!r} is not on disk; call check_prediction to fetch it again.")


    from .gallery.thumbs import Thumbnails

    thumbs: list[Thumbnails] = []

    @server.resource("flux://thumbnails/{prediction_id}/{index}", name="thumbnail", mime_type="image/webp",
                     description="A small WebP of a finished image (at most 512 px a side).")
    async def thumbnail_resource(prediction_id: str, index: str, ctx: Context[AppState, Any]) -> bytes:
        record = await _record(ctx, prediction_id)
        if not thumbs:
            thumbs.append(Thumbnails(_state(ctx).service.store))
        small = None
        if record is not None and index.isascii() and index.isdigit() and len(index) < 4:
            small = await thumbs[0].get(record, int(index))
        if small is None:
            raise ResourceNotFoundError(f"No image {index} for prediction {prediction_id!r} on this server.")
        return small


async def _record(ctx: Context[AppState, Any], prediction_id: str) -> Record | None:
    record = await _state(ctx).journal.get(prediction_id)
    # Another principal's prediction is answered as one that does not exist.
    return record if record is not None and record.principal == principal_of(ctx) else None


class _Server(MCPServer[AppState]):
    """An MCPServer that serves the model what it reads compactly, and its calls strictly.

    * A tool's or prompt's description is its docstring without the indentation (`inspect.cleandoc`).
    * `tools/list` serves every tool's schemas and annotations in `schema`'s compact form, in
      registration order.
    * A call with an argument its tool does not have is refused before the tool runs: a misspelt
      or imagined parameter (`num_image`, `dry_run`) must not silently run a paid job without it.
      An optional argument sent as null is taken as omitted (the schemas list no null: see `schema`).
    * Each binary resource is labelled with the type of its bytes: a resource template declares one
      MIME type when it is registered, but one prediction's images are PNG and another's JPEG or WebP.
    """

    _arguments: dict[str, tuple[list[str], frozenset[str]]] | None = None
    """Each tool's parameter names as clients send them, in order, and the required ones; None until
    asked (or after a tool was added or removed)."""
    _listed: list[MCPTool] | None = None
    """The tools as `tools/list` serves them; None until asked (or after a tool was added or removed)."""
    refused_here: Mapping[str, str] = MappingProxyType({})
    """Parameters not listed on this server, each with the refusal a call sending it gets (shared mode)."""
    tool_icons = False
    """List each tool with its icon (FLUX_MCP_TOOL_ICONS); set before the tools are added."""

    def add_tool(self, fn: Callable[..., Any], name: str | None = None, title: str | None = None,
                 description: str | None = None, annotations: ToolAnnotations | None = None,
                 icons: list[Icon] | None = None, meta: dict[str, Any] | None = None,
                 structured_output: bool | None = None) -> None:
        # Tools declaring the same result model share its output schema, derived once per process by the SDK
        # (deriving it is most of what registering a tool costs, and a server start registers three
        # PredictionResult tools).
        model = _declared_result(fn)
        name = name or fn.__name__
        if icons is None and self.tool_icons and name in GLYPHS:  # each tool of ours has its glyph (see `icons`)
            icons = tool_icons(name)
        known = _OUTPUT_SCHEMAS.get(model) if model is not None and structured_output is None else None
        super().add_tool(fn, name=name, title=title, description=inspect.cleandoc(description or fn.__doc__ or ""),
                         annotations=annotations, icons=icons, meta=meta,
                         structured_output=False if known is not None else structured_output)
        meta_of = registered_tool(self, name).fn_metadata
        if known is not None:
            meta_of.output_model, meta_of.output_schema = model, known
        elif model is not None and meta_of.output_model is model and meta_of.output_schema is not None:
            _OUTPUT_SCHEMAS[model] = meta_of.output_schema
        self._arguments = self._listed = None

    def remove_tool(self, name: str) -> None:
        super().remove_tool(name)
        self._arguments = self._listed = None

    def add_prompt(self, prompt: Prompt) -> None:
        super().add_prompt(prompt.model_copy(update={"description": inspect.cleandoc(prompt.description or "")}))

    async def list_tools(self) -> list[MCPTool]:
        # Compacted once (it costs more than the rest of a `tools/list` answer) and again only after a tool
        # was added or removed.
        if self._listed is None:
            self._listed = await self._compacted()
        return list(self._listed)

    async def _compacted(self) -> list[MCPTool]:
        # No `title`: clients fall back to the name (generate_image reads as well), and five titles are bytes
        # every conversation pays for.
        return [tool.model_copy(update={
            "title": None,
            "input_schema": compact_input(tool.input_schema),
            "output_schema": None if tool.output_schema is None else compact_output(tool.output_schema),
            "annotations": compact_annotations(tool.annotations),
        }) for tool in await super().list_tools()]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context[AppState, Any] | None = None
                        ) -> CallToolResult | InputRequiredResult:
        if self._arguments is None:
            self._arguments = {t.name: (list(t.input_schema.get("properties", {})),
                                        frozenset(t.input_schema.get("required", ())))
                               for t in await super().list_tools()}
        if name in self._arguments:
            known, required = self._arguments[name]
            for arg in [a for a in arguments if a in self.refused_here and a not in known]:
                if arguments[arg] not in (None, False, ""):
                    return error_result(self.refused_here[arg])
                arguments = {k: v for k, v in arguments.items() if k != arg}  # unset: as if not sent
            unknown = [arg for arg in arguments if arg not in known]
            if unknown:
                log.info("Tool %r refused unknown arguments %r", name, unknown)
                return error_result(unknown_arguments_text(name, unknown, known))
            arguments = {k: v for k, v in arguments.items() if v is not None or k in required}
        return await super().call_tool(name, arguments, context)

    async def read_resource(self, uri: AnyUrl | str, context: Context[AppState, Any] | None = None
                            ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        results = await super().read_resource(uri, context)
        if isinstance(results, InputRequiredResult):
            return results
        return [dataclasses.replace(item, mime_type=image_type(item.content) or item.mime_type)
                if isinstance(item.content, bytes) else item for item in results]


_OUTPUT_SCHEMAS: dict[Any, dict[str, Any]] = {}
"""Result model -> the output schema the SDK derived for it (see `_Server.add_tool`)."""


def _declared_result(fn: Callable[..., Any]) -> Any:
    """The model of a tool declared to return `Annotated[CallToolResult, Model]` (None for anything else)."""
    try:
        declared = inspect.signature(fn, eval_str=True).return_annotation
    except (NameError, TypeError):
        return None
    args = typing.get_args(declared) if typing.get_origin(declared) is Annotated else ()
    return args[1] if len(args) == 2 and args[0] is CallToolResult and isinstance(args[1], type) else None


def unknown_arguments_text(tool: str, unknown: list[str], known: list[str]) -> str:
    """What a model reads when it sent arguments `tool` does not have: each one, the closest real
    parameter where one is close, and the parameters there are."""
    named = []
    for arg in unknown:
        import difflib  # only for a call that is refused

        close = difflib.get_close_matches(arg, known, n=1, cutoff=0.6) or [
            k for k in known if len(arg) >= 3 and (k.startswith(arg) or arg.startswith(k))][:1]
        named.append(f"{arg!r} (did you mean {close[0]!r}?)" if close else repr(arg))
    plural = "s" if len(unknown) > 1 else ""
    return (f"{tool} has no parameter{plural} {', '.join(named)}. Nothing was run. "
            f"Its parameters: {', '.join(known)}.")


def provider_text(settings: Settings) -> str:
    """The `provider` parameter's description: the providers this server has keys for and the default
    (the offline placeholder only when it is the default, i.e. no key is set)."""
    default = registry.default_provider(settings)
    listed = [s.id for s in registry.SPECS if s.id == default or (s.key_env and settings.has_key(s.id))]
    return ", ".join(f"{p} (default)" if p == default else p for p in listed)


def image_type(data: bytes) -> str | None:
    """The MIME type of PNG, JPEG, WebP or GIF bytes, read from their signature; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None
