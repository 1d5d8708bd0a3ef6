"""The MCP wiring: `build_server()` and the four thin tools."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import httpx2
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp_types import (
    CallToolResult,
    EmptyResult,
    InputRequiredResult,
    SetLevelRequestParams,
    TextContent,
    ToolAnnotations,
)
from pydantic import AnyUrl, Field

from . import __version__
from .compat import add_request_handler, drop_middleware
from .config import Settings
from .errors import FluxError
from .folders import Folders
from .http import LazyClient, RetryPolicy
from .backends import open_journal, open_store
from .journal import Record
from .media import Downloader, DownloadLimits, flush_pending
from .models import PredictionResult, UploadResult
from .paths import PathPolicy
from .providers import overview, registry
from .redact import Redactor, protect_logs
from .render import error_result, needs_image_work, prediction_result, structured
from .request import MAX_WAIT_SECONDS, JobRequest, Kind, tool_parameters
from .jobs import Outcome
from .service import FluxService, ProgressFn
from .shared import add_health_routes, present, principal_of

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
    service: FluxService
    folders: Folders
    """The folder policy of each client session (FLUX_MCP_ALLOWED_DIRS, the client's roots, the working
    directory) and its caches."""
    paths: PathPolicy | None = None
    """A folder policy fixed by the caller of build_server (the terminal's `generate -o`), used instead of
    the roots and the settings."""


PROVIDER_TEXT = f"Provider id ({', '.join(registry.ids())}). Omit to use the server's default."
ProviderArg = Annotated[str | None, Field(max_length=40, description=PROVIDER_TEXT)]

PredictionOut = Annotated[CallToolResult, PredictionResult]
UploadOut = Annotated[CallToolResult, UploadResult]


def build_server(settings: Settings, *, http_client: httpx2.AsyncClient | None = None,
                 retry: RetryPolicy | None = None, downloads: DownloadLimits | None = None,
                 paths: PathPolicy | None = None) -> MCPServer[AppState]:
    """Builds a server; nothing is opened until its lifespan starts. `http_client` lets tests inject a
    client over `httpx2.MockTransport`; `retry` and `downloads` tune the network limits. `paths` fixes
    the folders every call may use (the terminal's `generate -o`: the person chose the path), instead
    of FLUX_MCP_ALLOWED_DIRS and the client's roots."""

    # One state per server, shared by every lifespan entry (SSE enters it once per connection).
    live: list[AppState] = []
    users = 0
    lock = anyio.Lock()

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        nonlocal users
        async with lock:
            if not live:
                live.append(await _open_state(settings, http_client, retry, downloads, paths))
            users += 1
        try:
            yield live[0]
        finally:
            async with lock:
                users -= 1
                if users == 0:
                    await _close_state(live.pop(), own_client=http_client is None)

    server: MCPServer[AppState] = _Server(
        "flux-mcp", title="FLUX image generation", version=__version__, instructions=INSTRUCTIONS,
        lifespan=lifespan, log_level=settings.log_level if settings.log_level in
        ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO",  # type: ignore[arg-type]
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

    described = {"provider": PROVIDER_TEXT, "wait_seconds": (
        f"Seconds to wait for the result before returning a pending prediction (default "
        f"{settings.wait_seconds:g}, at most {settings.max_wait_seconds:g}).")}
    server.tool(title="Generate image", annotations=job_annotations.model_copy(update={"title": "Generate image"}))(
        _job_tool("generate_image", "generate", "Generated", GENERATE_DOC, {**described}))
    server.tool(title="Edit image", annotations=job_annotations.model_copy(update={"title": "Edit image"}))(
        _job_tool("edit_image", "edit", "Edited", EDIT_DOC, {
            **described, "prompt": "The change to make, e.g. 'make the sky a sunset'."}))

    @server.tool(title="Upload image", annotations=ToolAnnotations(
        title="Upload image", read_only_hint=False, destructive_hint=False, idempotent_hint=True,
        open_world_hint=True))
    async def upload_media(
        path: Annotated[str, Field(min_length=1, max_length=4096,
                                   description="Local image file (PNG, JPEG, WebP, GIF) inside the project.")],
        ctx: Context[AppState, Any],
        provider: ProviderArg = None,
    ) -> UploadOut:
        """Upload a local image to the provider's storage and return its URL (for edit_image's `image`).

        edit_image already accepts local paths, so this is only needed to reuse one URL many times.
        """
        state = _state(ctx)
        try:
            paths = await _path_policy(ctx, state)
            result = await state.service.upload(path, provider, paths)
        except FluxError as exc:
            return error_result(state.service.redactor.scrub(str(exc)))
        text = (f"Uploaded {paths.display(result.path)} to {result.provider}"
                f"{' (reused the earlier upload)' if result.reused else ''}.\nURL: {result.url}\n"
                "Pass this URL as `image` to edit_image. Provider storage is temporary.")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=result.model_dump(mode="json"))

    async def check_prediction(
        prediction_id: Annotated[str, Field(min_length=3, max_length=230,
                                            description="The prediction_id from generate_image or edit_image.")],
        ctx: Context[AppState, Any],
        wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS,
                                             description="Seconds to wait if still running (0 = just look).")]
        = 0,
    ) -> PredictionOut:
        """Get the status and images of an earlier generate_image or edit_image call.

        Works for any prediction_id this server returned, also after a restart. Set wait_seconds to
        wait for a running job instead of polling in a loop.
        """
        state = _state(ctx)
        try:
            paths = await _path_policy(ctx, state)
            outcome = await state.service.check(prediction_id, wait_seconds, paths, _progress(ctx, state),
                                                principal=principal_of(ctx))
        except FluxError as exc:
            return error_result(state.service.redactor.scrub(str(exc)))
        return await _render(outcome, paths, state, "Finished")

    server.tool(title="Check prediction", annotations=ToolAnnotations(
        title="Check prediction", read_only_hint=False, destructive_hint=False, idempotent_hint=True,
        open_world_hint=True))(_redescribe(check_prediction, wait_seconds=(
            f"Seconds to wait if still running (0 = just look; at most {settings.max_wait_seconds:g}).")))

    _add_resources(server, settings)
    add_health_routes(server, lambda: live[0].service if live else None)
    return server


async def _open_state(settings: Settings, http_client: httpx2.AsyncClient | None, retry: RetryPolicy | None,
                      downloads: DownloadLimits | None, paths: PathPolicy | None = None) -> AppState:
    protect_logs(settings.secrets())
    journal = await open_journal(settings)
    client: httpx2.AsyncClient | LazyClient = http_client or LazyClient()
    limits = downloads or DownloadLimits()
    downloader = Downloader(client, max_bytes=limits.max_bytes, deadline=limits.deadline, attempts=limits.attempts)
    service = FluxService(settings, client, journal, store=open_store(settings), redactor=Redactor(settings.secrets()),
                          retry=retry, downloader=downloader)
    return AppState(settings, service, Folders(settings), paths=paths)


async def _close_state(state: AppState, *, own_client: bool) -> None:
    if own_client:
        await state.service.client.aclose()
    await state.service.journal.close()
    await anyio.to_thread.run_sync(flush_pending)  # every image written is on stable storage before exit


async def _accept_log_level(_ctx: Any, _params: SetLevelRequestParams) -> EmptyResult:
    return EmptyResult()


GENERATE_DOC = """Generate new images from a text prompt with a FLUX model.

Waits for the result up to wait_seconds, then returns the images: a preview you can look at,
the local file path (use it in code) and the provider URL. If the job is still running it
returns status "processing" and a prediction_id: call check_prediction with it later instead
of calling generate_image again (every call is a new paid job).
"""
EDIT_DOC = """Edit an existing image following a text instruction (FLUX Kontext or image-to-image).

Local files are uploaded to the provider (or sent inline) for you. Returns like
generate_image: preview, local path, URL; or a pending prediction_id for check_prediction.
"""


def _job_tool(name: str, kind: Kind, action: str, doc: str, descriptions: dict[str, str]) -> Any:
    """A generate/edit tool whose parameters are `JobRequest`'s fields (see request.tool_parameters)."""

    async def tool(ctx: Context[AppState, Any], **args: Any) -> CallToolResult:
        return await _run_job(ctx, JobRequest(kind=kind, **args), action=action)

    params = tool_parameters(kind, descriptions)
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


async def _run_job(ctx: Context[AppState, Any], req: JobRequest, *, action: str) -> CallToolResult:
    state = _state(ctx)
    try:
        paths = await _path_policy(ctx, state)
        outcome = await state.service.run(req, paths, _progress(ctx, state), principal=principal_of(ctx))
    except FluxError as exc:
        return error_result(state.service.redactor.scrub(str(exc)))
    return await _render(outcome, paths, state, action)


async def _render(outcome: Any, paths: PathPolicy, state: AppState, action: str) -> CallToolResult:
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


# --- resources ---------------------------------------------------------------------------------------

def _add_resources(server: MCPServer[AppState], settings: Settings) -> None:
    """The three resources. The templated ones read the journal of the server answering the request
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


async def _record(ctx: Context[AppState, Any], prediction_id: str) -> Record | None:
    record = await _state(ctx).service.journal.get(prediction_id)
    # Another principal's prediction is answered as one that does not exist.
    return record if record is not None and record.principal == principal_of(ctx) else None


class _Server(MCPServer[AppState]):
    """An MCPServer that labels each binary resource with the type of its bytes.

    A resource template declares one MIME type when it is registered, but the images of one
    prediction are PNG and of another JPEG or WebP: the label is read from the bytes served.
    """

    async def read_resource(self, uri: AnyUrl | str, context: Context[AppState, Any] | None = None
                            ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        results = await super().read_resource(uri, context)
        if isinstance(results, InputRequiredResult):
            return results
        return [dataclasses.replace(item, mime_type=image_type(item.content) or item.mime_type)
                if isinstance(item.content, bytes) else item for item in results]


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
