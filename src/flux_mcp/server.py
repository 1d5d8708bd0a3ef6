"""The MCP wiring: `build_server()` and the four thin tools."""

from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import anyio
import httpx2
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, EmptyResult, SetLevelRequestParams, TextContent, ToolAnnotations
from pydantic import AfterValidator, Field

from . import __version__
from .config import MAX_WAIT_SECONDS, Settings
from .errors import FluxError
from .http import LazyClient, RetryPolicy
from .journal import Journal
from .media import Downloader, DownloadLimits, flush_pending
from .models import PredictionResult, UploadResult
from .paths import PathPolicy, usable_folders
from .redact import Redactor
from .render import error_result, needs_image_work, prediction_result
from .service import FluxService, JobParams

log = logging.getLogger("flux_mcp.server")

INSTRUCTIONS = """\
Generate and edit images with FLUX models. generate_image makes new images from a prompt;
edit_image changes an existing image (URL, local path or data: URI) following a prompt.
Finished images are saved locally: use the path from the result in code (pass save_to to put
the file straight into the project, e.g. "public/hero.png"). A job still running when the call
returns is not lost: call check_prediction with its prediction_id. Never call generate_image
again for the same request just because it is pending: each call is a new paid job."""

_ROOTS_TTL = 30.0
_POLICY_TTL = 5.0
"""Seconds before the allowed folders are resolved again (a folder created or removed is seen by then)."""


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Expiring(Generic[_K, _V]):
    """A small map whose entries are forgotten after `ttl` seconds; past `size` entries the oldest goes."""

    def __init__(self, ttl: float, size: int = 256):
        self.ttl, self.size = ttl, size
        self._items: dict[_K, tuple[float, _V]] = {}

    def get(self, key: _K) -> _V | None:
        hit = self._items.get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.ttl else None

    def put(self, key: _K, value: _V) -> None:
        self._items[key] = (time.monotonic(), value)
        if len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))


@dataclass
class AppState:
    """Process-wide resources, built once by the lifespan."""

    settings: Settings
    service: FluxService
    roots_cache: _Expiring[int, list[Path]] = field(default_factory=lambda: _Expiring(_ROOTS_TTL))
    """Each session's roots, as its client listed them."""
    policies: _Expiring[tuple[Path, ...], PathPolicy] = field(default_factory=lambda: _Expiring(_POLICY_TTL))
    """The folder policy built from each set of roots (resolving folders costs syscalls on every call)."""
    paths: PathPolicy | None = None
    """A folder policy fixed by the caller of build_server, used instead of the roots and the settings."""


# --- argument types, described for the model -------------------------------------------------------

def _no_control_chars(value: str) -> str:
    bad = sorted({f"U+{ord(c):04X}" for c in value if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0})
    if bad:
        raise ValueError(f"must not contain control characters (found {', '.join(bad[:5])}); use plain text")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Prompt = Annotated[str, Field(min_length=1, max_length=4000,
                              description="What the image should show: subject, style, composition, lighting, text."),
                   AfterValidator(_no_control_chars)]
ProviderArg = Annotated[str | None, Field(
    default=None, max_length=40,
    description="Provider id (atlascloud, segmind, acedatacloud, imagepipeline, appypie, placeholder). "
                "Omit to use the server's default.")]
ModelArg = Annotated[str | None, Field(default=None, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
                                       description="Model id on that provider; omit for its default FLUX model.")]
Side = Annotated[int, Field(ge=16, le=8192, description="Pixels. Most FLUX models take 256-1536; default 1024.")]
WaitArg = Annotated[float | None, Field(
    default=None, ge=0, le=MAX_WAIT_SECONDS,
    description="Seconds to wait for the result before returning a pending prediction (default 45).")]
SaveTo = Annotated[str | None, Field(
    default=None, max_length=1024,
    description="Also write the image(s) here: a file (.png/.jpg/.webp picks the format) or a folder, relative "
                "to the project folder. E.g. 'public/images/hero.webp'.")]
Overwrite = Annotated[bool, Field(default=False, description="Replace an existing save_to file.")]
Seed = Annotated[int | None, Field(default=None, ge=0, le=2_147_483_647,
                                   description="Same seed + prompt gives the same image; omit for random.")]
Steps = Annotated[int | None, Field(default=None, ge=1, le=100,
                                    description="Inference steps, where the model has the setting; omit for default.")]
Guidance = Annotated[float | None, Field(default=None, ge=0, le=50,
                                         description="Prompt adherence, where the model has it; omit for default.")]

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
                live.append(_open_state(settings, http_client, retry, downloads, paths))
            users += 1
        try:
            yield live[0]
        finally:
            async with lock:
                users -= 1
                if users == 0:
                    await _close_state(live.pop(), own_client=http_client is None)

    server: MCPServer[AppState] = MCPServer(
        "flux-mcp", title="FLUX image generation", version=__version__, instructions=INSTRUCTIONS,
        lifespan=lifespan, log_level=settings.log_level if settings.log_level in
        ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO",  # type: ignore[arg-type]
    )

    # Handshake-era clients send logging/setLevel, which MCPServer has no handler for (-32601). This server
    # sends no log notifications, so the level is simply accepted; 2026-07-28 requests still get -32601.
    # add_request_handler on the low-level server is the SDK's documented route for re-providing this method.
    server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, _accept_log_level)
    if not settings.tracing:
        # The SDK wraps every message in an OpenTelemetry span, a no-op without an exporter that still
        # costs each call; dropping it is the SDK's documented opt-out. Set any OTEL_* variable (as
        # `opentelemetry-instrument` does) to keep the spans.
        server._lowlevel_server.middleware = [m for m in server._lowlevel_server.middleware
                                              if type(m).__name__ != "OpenTelemetryMiddleware"]

    job_annotations = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                      open_world_hint=True)

    @server.tool(title="Generate image", annotations=job_annotations.model_copy(update={"title": "Generate image"}))
    async def generate_image(
        prompt: Prompt,
        ctx: Context[AppState, Any],
        provider: ProviderArg = None,
        model: ModelArg = None,
        width: Side = 1024,
        height: Side = 1024,
        num_images: Annotated[int, Field(ge=1, le=8, description="How many images (most providers: 1-4).")] = 1,
        seed: Seed = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        wait_seconds: WaitArg = None,
        save_to: SaveTo = None,
        overwrite: Overwrite = False,
    ) -> PredictionOut:
        """Generate new images from a text prompt with a FLUX model.

        Waits for the result up to wait_seconds, then returns the images: a preview you can look at,
        the local file path (use it in code) and the provider URL. If the job is still running it
        returns status "processing" and a prediction_id: call check_prediction with it later instead
        of calling generate_image again (every call is a new paid job).
        """
        params = JobParams(prompt=prompt, provider=provider, model=model, width=width, height=height,
                           num_images=num_images, seed=seed, steps=steps, guidance_scale=guidance_scale,
                           wait_seconds=wait_seconds, save_to=save_to, overwrite=overwrite)
        return await _run_job(ctx, "generate", params, action="Generated")

    @server.tool(title="Edit image", annotations=job_annotations.model_copy(update={"title": "Edit image"}))
    async def edit_image(
        prompt: Annotated[str, Field(min_length=1, max_length=4000,
                                     description="The change to make, e.g. 'make the sky a sunset'."),
                          AfterValidator(_no_control_chars)],
        image: Annotated[str, Field(min_length=1, max_length=20_000_000,
                                    description="The image to edit: an http(s) URL, a local file path, or a "
                                                "data: URI.")],
        ctx: Context[AppState, Any],
        provider: ProviderArg = None,
        model: ModelArg = None,
        width: Side = 1024,
        height: Side = 1024,
        seed: Seed = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        wait_seconds: WaitArg = None,
        save_to: SaveTo = None,
        overwrite: Overwrite = False,
    ) -> PredictionOut:
        """Edit an existing image following a text instruction (FLUX Kontext or image-to-image).

        Local files are uploaded to the provider (or sent inline) for you. Returns like
        generate_image: preview, local path, URL; or a pending prediction_id for check_prediction.
        """
        params = JobParams(prompt=prompt, provider=provider, model=model, width=width, height=height,
                           seed=seed, steps=steps, guidance_scale=guidance_scale, wait_seconds=wait_seconds,
                           save_to=save_to, overwrite=overwrite, image=image)
        return await _run_job(ctx, "edit", params, action="Edited")

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
            return error_result(str(exc))
        text = (f"Uploaded {paths.display(result.path)} to {result.provider}"
                f"{' (reused the earlier upload)' if result.reused else ''}.\nURL: {result.url}\n"
                "Pass this URL as `image` to edit_image. Provider storage is temporary.")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=result.model_dump(mode="json"))

    @server.tool(title="Check prediction", annotations=ToolAnnotations(
        title="Check prediction", read_only_hint=False, destructive_hint=False, idempotent_hint=True,
        open_world_hint=True))
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
            outcome = await state.service.check(prediction_id, wait_seconds, paths, _progress(ctx))
        except FluxError as exc:
            return error_result(str(exc))
        return await _render(outcome, paths, state.settings, "Finished")

    @server.resource("flux://providers", name="providers", mime_type="application/json",
                     description="Each provider: configured or not (and the variable to set), models, capabilities.")
    async def providers_resource() -> str:
        service = live[0].service
        return json.dumps({"default": service.default_provider_id(),
                           "providers": [p.describe() for p in service.providers.values()]}, indent=2)

    @server.resource("flux://predictions/{prediction_id}", name="prediction", mime_type="application/json",
                     description="A prediction made by this server, as JSON (status, images, error).")
    async def prediction_resource(prediction_id: str) -> str:
        record = live[0].service.journal.get(prediction_id)
        if record is None:
            raise ValueError(f"No prediction {prediction_id!r}.")
        return record.result().model_dump_json(indent=2)

    @server.resource("flux://images/{prediction_id}/{index}", name="image", mime_type="image/png",
                     description="A finished image of a prediction, full resolution.")
    async def image_resource(prediction_id: str, index: str) -> bytes:
        record = live[0].service.journal.get(prediction_id)
        if record is None or not index.isdigit() or int(index) >= len(record.images):
            raise ValueError(f"No image {index} for prediction {prediction_id!r}.")
        path = record.images[int(index)].path
        if not path or not Path(path).is_file():
            raise ValueError("That image is not on disk; call check_prediction to fetch it again.")
        return Path(path).read_bytes()

    return server


def _open_state(settings: Settings, http_client: httpx2.AsyncClient | None, retry: RetryPolicy | None,
                downloads: DownloadLimits | None, paths: PathPolicy | None = None) -> AppState:
    settings.home.mkdir(parents=True, exist_ok=True)
    journal = Journal(settings.home / "journal.sqlite3")
    client: httpx2.AsyncClient | LazyClient = http_client or LazyClient()
    limits = downloads or DownloadLimits()
    downloader = Downloader(client, max_bytes=limits.max_bytes, deadline=limits.deadline, attempts=limits.attempts)
    service = FluxService(settings, client, journal, redactor=Redactor(settings.secrets()), retry=retry,
                          downloader=downloader)
    return AppState(settings, service, paths=paths)


async def _close_state(state: AppState, *, own_client: bool) -> None:
    if own_client:
        await state.service.client.aclose()
    state.service.journal.close()
    await anyio.to_thread.run_sync(flush_pending)  # every image written is on stable storage before exit


async def _accept_log_level(_ctx: Any, _params: SetLevelRequestParams) -> EmptyResult:
    return EmptyResult()


async def _run_job(ctx: Context[AppState, Any], kind: str, params: JobParams, *, action: str) -> CallToolResult:
    state = _state(ctx)
    try:
        paths = await _path_policy(ctx, state)
        outcome = await state.service.run(kind, params, paths, _progress(ctx))
    except FluxError as exc:
        return error_result(str(exc))
    return await _render(outcome, paths, state.settings, action)


async def _render(outcome: Any, paths: PathPolicy, settings: Settings, action: str) -> CallToolResult:
    render = functools.partial(prediction_result, outcome, paths, settings, action=action)
    if needs_image_work(outcome, settings):
        # Shrinking previews decodes and encodes images: CPU work that must not stall the other calls.
        return await anyio.to_thread.run_sync(render)
    return render()


def _state(ctx: Context[AppState, Any]) -> AppState:
    return ctx.request_context.lifespan_context


def _progress(ctx: Context[AppState, Any]):
    async def report(progress: float, total: float | None, message: str) -> None:
        try:
            await ctx.report_progress(progress, total, message)
        except Exception as exc:  # a client that went away must not break the wait
            log.debug("progress not sent: %s", exc)

    return report


async def _path_policy(ctx: Context[AppState, Any], state: AppState) -> PathPolicy:
    """Allowed folders: FLUX_MCP_ALLOWED_DIRS when set, else the client's roots, else the working directory."""
    if state.paths is not None:
        return state.paths
    settings = state.settings
    roots = await _client_roots(ctx, state)
    policy = state.policies.get(tuple(roots))
    if policy is None:
        policy = _build_policy(settings, roots)
        state.policies.put(tuple(roots), policy)
    return policy


def _build_policy(settings: Settings, roots: list[Path]) -> PathPolicy:
    if settings.allowed_dirs:
        allowed = usable_folders(settings.allowed_dirs, settings.home)
        # Relative paths land in the client's workspace when that is inside an allowed folder.
        inside = [r for r in roots if any(r == a or r.is_relative_to(a) for a in allowed)]
        return PathPolicy(inside[:1] + [a for a in allowed if a not in inside[:1]], settings.home)
    return PathPolicy(usable_folders(roots or [settings.cwd], settings.home), settings.home)


async def _client_roots(ctx: Context[AppState, Any], state: AppState) -> list[Path]:
    caps = ctx.client_capabilities
    if caps is None or caps.roots is None:
        return []
    version = ctx.protocol_version or ""
    if version >= "2026-07-28":
        return []  # roots are a handshake-era feature; modern clients send none
    session = ctx.session
    key = id(session)
    cached = state.roots_cache.get(key)
    if cached is not None:
        return cached
    try:
        with anyio.fail_after(5), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            listed = await session.list_roots()
    except Exception as exc:
        log.info("client offered roots but roots/list failed: %s", exc)
        return []
    from .paths import to_local_path

    roots = []
    for root in listed.roots:
        uri = str(root.uri)
        if uri.startswith("file://"):
            roots.append(to_local_path(uri))
    state.roots_cache.put(key, roots)
    return roots
