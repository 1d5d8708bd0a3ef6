"""The shared (team) mode's rules: who is asking, what a remote caller may pass, health routes.

Shared mode is on when FLUX_MCP_DATABASE_URL is set: several replicas serve many remote users from
one PostgreSQL database and (with FLUX_MCP_S3_URL) one bucket. There:

* **Each caller is a principal.** Over HTTP, FLUX_MCP_AUTH_TOKENS (`name:token,...`) names the user
  of each token; the one shared FLUX_MCP_AUTH_TOKEN, loopback without a token, stdio and the terminal
  are all `local`. Every journal row carries its principal, and a prediction of another principal
  answers exactly as an id that does not exist.
* **Nothing refers to the server's disk.** A remote caller can neither see the server's files nor
  have it write into their project: `save_to`, local-path `image` inputs and `upload_media` paths are
  refused with what to do instead (an upload link's `upload:` reference, a data: URI or a URL in, the
  presigned `images[].url` out); the parameters refused here (REFUSED_HERE) are not even listed.
* **No held submits by default.** Atlas Cloud's sync mode holds the submit open for the whole job, so
  a replica that dies meanwhile leaves a paid job with no id to recover: it is off unless
  ATLASCLOUD_SYNC_MODE asks for it.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from .errors import ConfigError, InvalidInput

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from .config import ProviderSettings
    from .jobs import Outcome

log = logging.getLogger("flux_mcp.shared")

LOCAL = "local"
"""The principal of the local user: stdio, the terminal, loopback HTTP, the one shared token."""
PRINCIPAL_KEY = "flux_principal"
"""Where the HTTP layer leaves the request's principal (in the ASGI scope's `state`)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")

SHARED_DEFAULTS: dict[str, dict[str, str]] = {"atlascloud": {"sync_mode": "off"}}
"""Provider settings that change in shared mode unless their variable is set (see the module text)."""


# --- configuration ------------------------------------------------------------------------------

def parse_tokens(raw: str) -> tuple[tuple[str, SecretStr], ...]:
    """FLUX_MCP_AUTH_TOKENS: `name1:token1,name2:token2` -> ((name, token), ...). Messages never show a token."""
    pairs: list[tuple[str, SecretStr]] = []
    seen: set[str] = set()
    for n, part in enumerate(p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, token = part.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ConfigError(f"FLUX_MCP_AUTH_TOKENS entry {n + 1} must be name:token.")
        if not _NAME.match(name) or name == LOCAL:
            raise ConfigError(f"FLUX_MCP_AUTH_TOKENS entry {n + 1}: the name must be 1-64 letters, digits or ._@+- "
                              f"and not {LOCAL!r}.")
        if len(token) < 16:
            raise ConfigError(f"FLUX_MCP_AUTH_TOKENS entry {n + 1} ({name}): the token must be at least 16 "
                              "characters.")
        if token in seen:
            raise ConfigError(f"FLUX_MCP_AUTH_TOKENS entry {n + 1} ({name}) repeats another entry's token.")
        seen.add(token)
        pairs.append((name, SecretStr(token)))
    return tuple(pairs)


def check_database_url(url: str) -> None:
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("FLUX_MCP_DATABASE_URL must start with postgresql:// (e.g. "
                          "postgresql://user:password@db-host:5432/flux).")


def url_password(url: str) -> str | None:
    """The password in a database URL, for the redactor (None when it has none)."""
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def shared_defaults(env: Mapping[str, str], providers: dict[str, ProviderSettings]) -> None:
    """Applies SHARED_DEFAULTS to the providers whose own variable does not say otherwise."""
    from .providers import registry

    for pid, defaults in SHARED_DEFAULTS.items():
        spec, current = registry.BY_ID.get(pid), providers.get(pid)
        if spec is None or current is None:
            continue
        variables = {v.name: v.env for v in spec.extras}
        extra = dict(current.extra)
        for name, value in defaults.items():
            if not env.get(variables.get(name, ""), "").strip():
                extra[name] = value
        providers[pid] = current.model_copy(update={"extra": extra})


# --- who is asking ------------------------------------------------------------------------------

def token_principals(auth_token: SecretStr | None, named: tuple[tuple[str, SecretStr], ...]) -> list[tuple[bytes, str]]:
    """(token, principal) for every token the HTTP transports accept."""
    out = [(token.get_secret_value().encode(), name) for name, token in named]
    if auth_token is not None:
        out.append((auth_token.get_secret_value().encode(), LOCAL))
    return out


def match_token(supplied: bytes, tokens: list[tuple[bytes, str]]) -> str | None:
    """The principal of `supplied` (None: no token matches). Every token is compared, in constant time."""
    found = None
    for token, name in tokens:
        if hmac.compare_digest(supplied, token) and found is None:
            found = name
    return found


# --- what a remote caller may pass ---------------------------------------------------------------

SAVE_TO_REFUSED = ("save_to writes on the server's disk, which a shared server's users cannot reach. Omit "
                   "save_to: the result's images[].url is a download link for each image (valid for a while; call "
                   "check_prediction for a fresh one), then save the file in your project yourself.")
LOCAL_IMAGE_REFUSED = ("`image` must be an http(s) URL, a data: URI or an upload on a shared server: it cannot read "
                       "files on your machine (nor should it read its own). Call create_upload_link and PUT the file "
                       "to its URL, then pass its `upload:...` reference; or pass the file as a data: URI (base64 of "
                       "the bytes, e.g. data:image/png;base64,...) or a public URL.")
UPLOAD_REFUSED = ("upload_media reads a file on the server's disk, which a shared server's users cannot reach. "
                  "Call create_upload_link, PUT the file to its URL and pass its `upload:...` reference as `path`; "
                  "or pass the image to edit_image directly as a data: URI (base64 of the file) or an http(s) URL.")


VARIATION_REFUSED = ("variation_of reads an image file on the server's disk, which a shared server's users cannot "
                     "reach. Call generate_image with the earlier job's prompt, model and size instead (its "
                     "check_prediction result lists them).")


PRESET_REFUSED = ("preset writes its files under save_to on the server's disk, which a shared server's users cannot "
                  "reach. Generate the image (width/height give its exact size) and make the other sizes from its "
                  "images[].url yourself.")
REFUSED_HERE = {"save_to": SAVE_TO_REFUSED, "overwrite": SAVE_TO_REFUSED, "preset": PRESET_REFUSED,
                "variation_of": VARIATION_REFUSED}
"""The job parameters a shared server does not list (each names the server's disk) and their refusals."""


def check_job_inputs(save_to: str | None, image: str | None, variation_of: str | None = None) -> None:
    """Refuses, before anything is paid for, the inputs that name the server's disk."""
    if variation_of:
        raise InvalidInput(VARIATION_REFUSED)
    if save_to:
        raise InvalidInput(SAVE_TO_REFUSED)
    from .uploads import is_reference

    if image is not None and not image.strip().startswith(("http://", "https://", "data:")) \
            and not is_reference(image):
        raise InvalidInput(LOCAL_IMAGE_REFUSED)


# --- health -----------------------------------------------------------------------------------------

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
"""Routes a load balancer calls without a token (they tell nothing but up or ready)."""


def add_health_routes(server: Any, service: Callable[[], Any]) -> None:
    """`/healthz` (the process answers) and `/readyz` (its database and bucket answer too: 503 otherwise).
    `service` returns the running FluxService, or None before the server started."""
    from starlette.responses import JSONResponse

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @server.custom_route("/readyz", methods=["GET"])
    async def readyz(_: Request) -> Response:
        import anyio

        running = service()
        if running is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        checks: dict[str, str] = {}
        for name, part in (("database", running.journal), ("bucket", running.store)):
            ping = getattr(part, "ping", None)
            if ping is None:
                checks[name] = "local"
                continue
            try:
                with anyio.fail_after(3):
                    await ping()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which part
                checks[name] = f"unreachable ({type(exc).__name__})"
        ready = all(v in ("ok", "local") for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "unready", **checks}, status_code=200 if ready else 503)


# --- what a remote caller gets back ------------------------------------------------------------------

async def present(outcome: Outcome, store: Any, *, previews: bool = True) -> Outcome:
    """The outcome as a caller sees it from a store in a bucket: each kept image's `url` is a fresh
    presigned download link (signed now, never stored), and the bytes for the inline previews are read
    from the bucket when this call did not just write them. Other stores: the outcome unchanged."""
    presign = getattr(store, "presign", None)
    if presign is None:
        return outcome
    record = outcome.record.copy()
    kept = dict(outcome.kept)
    images = []
    for image in record.images:
        path = image.path
        if path:
            url = await presign(path)
            if url is not None:
                image = image.model_copy(update={"url": url})
            if previews and path not in kept:
                try:
                    kept[path] = await store.read(path)
                except Exception as exc:  # noqa: BLE001 - a preview is a convenience; the link still works
                    log.info("no preview bytes for %s: %s", path, type(exc).__name__)
        images.append(image)
    record.images = images
    return dataclasses.replace(outcome, record=record, kept=kept)
