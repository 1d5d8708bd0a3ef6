"""OAuth 2.1 resource-server mode for the HTTP transports: JWT access tokens checked against the issuer's keys.

Set FLUX_MCP_OAUTH_ISSUER (the authorization server) and FLUX_MCP_RESOURCE_URL (the URL clients connect to,
e.g. `https://flux.example.com/mcp`). The SDK's auth support then does the protocol part: it serves the
protected resource metadata (RFC 9728, at `/.well-known/oauth-protected-resource/<path>`), answers a request
without a valid token 401 and one without a required scope 403, both with a `WWW-Authenticate: Bearer`
challenge naming that metadata, and leaves the token in the request context (`get_access_token`). This
module adds what the SDK does not have:

* `JwtVerifier`, the SDK's `TokenVerifier` for JWT access tokens (RFC 9068): signature by one of the
  issuer's published keys (asymmetric algorithms only), `iss` the issuer, `aud` the audience
  (FLUX_MCP_OAUTH_AUDIENCE, default the resource URL), `exp`/`nbf` within a small leeway, `sub` present.
  The keys come from the issuer's JWKS, found through its metadata and cached by key id; a token signed
  by a key the cache does not know makes it re-read the JWKS (key rotation), at most once a minute.
* The principal: `<issuer without scheme>|<sub>`. A `sub` is unique only within its issuer, and the
  `|` keeps OAuth principals apart from FLUX_MCP_AUTH_TOKENS' user names and from `local`, which cannot
  contain one: a journal that saw other modes never hands their jobs to a token's user.
* `scope="..."` in the challenges (the MCP authorization spec's SHOULD, which the SDK leaves out), and
  the gate in front of the server: refused tokens are throttled per address and logged without the
  token, like the static bearer tokens, and the body of a request without a valid token is never read.

Static bearer tokens (FLUX_MCP_AUTH_TOKEN, FLUX_MCP_AUTH_TOKENS) cannot be combined with the issuer: the
MCP spec has a resource server accept only tokens its authorization server issued for it, and its
protected resource metadata sends every client to that issuer. Configuring both is refused at start.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .oauth_config import OAuthConfig, _check_url

if TYPE_CHECKING:
    from mcp.server.auth.provider import AccessToken
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .httpguard import HttpLimits
    from .middleware import FailureThrottle

log = logging.getLogger("flux_mcp.http")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""Signature algorithms accepted: asymmetric only. `none` and the HMAC family are never accepted (with a
public key as the HMAC secret, anyone could sign)."""
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
"""The JWK key type each algorithm family needs."""
LEEWAY_SECONDS = 30
"""Clock difference tolerated between the issuer and this server for `exp`, `nbf` and `iat`."""
MISS_REFRESH_SECONDS = 60.0
"""A token signed by an unknown key re-reads the JWKS at most this often (a forged `kid` costs nothing)."""
JWKS_MAX_AGE_SECONDS = 3600.0
"""Keys are re-read this long after they were read, so a key the issuer withdrew stops being accepted."""
FETCH_SECONDS = 10.0
"""The longest one read of the issuer's metadata or keys may take."""
MAX_DOCUMENT_BYTES = 256 * 1024
"""The largest metadata or JWKS document read (real ones are a few kilobytes)."""
MAX_SUBJECT_LENGTH = 255


# --- configuration ------------------------------------------------------------------------------

# OAuthConfig and the URL check live in `oauth_config`: settings read them at every start, and the rest of
# this module is needed only when OAuth is on.


def principal_for(issuer: str, subject: str) -> str:
    """The principal of an OAuth user: `<issuer without scheme and trailing />|<sub>`."""
    return f"{issuer.split('://', 1)[-1].rstrip('/')}|{subject}"


# --- the token check ------------------------------------------------------------------------------

@dataclass
class Attempt:
    """What the gate learns of one request's token check (kept in a context variable the verifier fills).
    The verifier never records the token itself, only why it was refused, and memoizes its one answer so
    the SDK's own check of the same request does not repeat the signature verification."""

    token: str | None = None
    result: AccessToken | None = None
    checked: bool = False
    reason: str | None = None
    issuer_down: bool = False


_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("flux_oauth_attempt", default=None)


class Unreachable(Exception):
    """The issuer's metadata or keys could not be read (said in the log; the request is refused).
    `status` is the HTTP status that said so, if one did."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class _Keys:
    jwks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """kid -> JWK ('' for a key without kid)."""
    read_at: float | None = None
    miss_at: float | None = None
    failed_at: float | None = None
    parsed: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(kid, alg) -> PyJWK, built on first use."""


class JwtVerifier:
    """The SDK's `TokenVerifier` for JWT access tokens (RFC 9068) from one issuer; see the module text.

    `verify_token` answers an `AccessToken` whose `subject` is the flux-mcp principal (`principal_for`),
    `client_id` the token's `client_id` (else `azp`, else `sub`), `scopes` its `scope` (or `scp`) claim,
    `expires_at` when this server stops accepting it (its `exp` plus the leeway), `claims` all its claims;
    or None, with the reason left for the gate. `clock` is the time keys are cached by (tests move it).
    """

    def __init__(self, config: OAuthConfig, *, clock: Callable[[], float] = time.monotonic,
                 fetch_seconds: float = FETCH_SECONDS):
        import anyio

        self.config = config
        self.clock = clock
        self.fetch_seconds = fetch_seconds
        self.jwks_uri: str | None = None
        self._keys = _Keys()
        self._lock = anyio.Lock()
        self.reads = 0
        """How many times the JWKS was read."""

    async def verify_token(self, token: str) -> AccessToken | None:
        attempt = _attempt.get()
        if attempt is not None and attempt.checked and attempt.token == token:
            return attempt.result
        reason, issuer_down, result = None, False, None
        try:
            result = await self._verify(token)
        except Refused as exc:
            reason = str(exc)
        except Unreachable as exc:
            reason, issuer_down = f"the issuer's keys cannot be read ({exc})", True
        if attempt is not None:
            attempt.token, attempt.result, attempt.checked = token, result, True
            attempt.reason, attempt.issuer_down = reason, issuer_down
        return result

    async def _verify(self, token: str) -> AccessToken:
        import jwt
        from mcp.server.auth.provider import AccessToken

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Refused("not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Refused(f"signature algorithm {str(alg)[:20]!r} is not accepted")
        typ = str(header.get("typ", "")).lower()
        if typ not in ("", "jwt", "at+jwt", "application/at+jwt"):
            raise Refused(f"token type {typ[:30]!r} is not an access token")
        kid = header.get("kid")
        key = await self._key(kid if isinstance(kid, str) else "", alg)
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.config.audiences,
                                issuer=self.config.issuers, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud", "sub"],
                                         "enforce_minimum_key_length": True})
        except jwt.ExpiredSignatureError:
            raise Refused("expired") from None
        except jwt.InvalidAudienceError:
            raise Refused("issued for another audience") from None
        except jwt.InvalidIssuerError:
            raise Refused("from another issuer") from None
        except jwt.ImmatureSignatureError:
            raise Refused("not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Refused(f"no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Refused("bad signature") from None
        except jwt.PyJWTError as exc:
            raise Refused(f"invalid ({type(exc).__name__})") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LENGTH \
                or not subject.isprintable():
            raise Refused("unusable sub claim")
        client_id = next((c for c in (claims.get("client_id"), claims.get("azp")) if isinstance(c, str) and c),
                         subject)
        exp = claims["exp"]
        return AccessToken(token=token, client_id=client_id, scopes=_scopes(claims),
                           expires_at=int(exp) + LEEWAY_SECONDS if isinstance(exp, (int, float)) else None,
                           resource=self.config.resource_url, subject=principal_for(claims["iss"], subject),
                           claims=claims)

    async def _key(self, kid: str, alg: str) -> Any:
        """The issuer's key `kid` for `alg`, reading the JWKS when the cache is empty, old, or (at most once
        per MISS_REFRESH_SECONDS) does not know `kid`."""
        read_now = False
        if self._stale():
            async with self._lock:
                if self._stale():
                    if self._failed_recently():
                        if self._keys.read_at is None:
                            raise Unreachable("reading them failed less than a minute ago")
                    else:
                        try:
                            await self._refresh()
                            read_now = True
                        except Unreachable:
                            if self._keys.read_at is None:
                                raise
                            log.warning("keeping the OAuth issuer's keys read earlier until they can be read again")
        jwk = self._find(kid)
        if jwk is None and not read_now:
            async with self._lock:
                keys = self._keys
                jwk = self._find(kid)  # another request may have just read them
                if jwk is None and (keys.miss_at is None or self.clock() - keys.miss_at >= MISS_REFRESH_SECONDS):
                    keys.miss_at = self.clock()
                    await self._refresh()
                    jwk = self._find(kid)
        if jwk is None:
            raise Refused("signed by a key the issuer does not publish")
        return self._parsed(kid, jwk, alg)

    def _stale(self) -> bool:
        read_at = self._keys.read_at
        return read_at is None or self.clock() - read_at >= JWKS_MAX_AGE_SECONDS

    def _failed_recently(self) -> bool:
        failed = self._keys.failed_at
        return failed is not None and self.clock() - failed < MISS_REFRESH_SECONDS

    def _find(self, kid: str) -> dict[str, Any] | None:
        jwks = self._keys.jwks
        if kid:
            return jwks.get(kid)
        return next(iter(jwks.values())) if len(jwks) == 1 else None  # no kid: only an unambiguous key

    def _parsed(self, kid: str, jwk: dict[str, Any], alg: str) -> Any:
        import jwt

        cached = self._keys.parsed.get((kid, alg))
        if cached is not None:
            return cached
        if jwk.get("alg") not in (None, alg) or jwk.get("kty") != _FAMILY.get(alg[:2]):
            raise Refused(f"key {kid[:40]!r} is not for {alg}")
        try:
            parsed = jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWKError:
            raise Refused(f"key {kid[:40]!r} cannot be used") from None
        self._keys.parsed[(kid, alg)] = parsed
        return parsed

    async def read_keys(self) -> dict[str, dict[str, Any]]:
        """Reads the issuer's signing keys now (kid -> JWK); raises Unreachable when they cannot be read."""
        async with self._lock:
            await self._refresh()
            return dict(self._keys.jwks)

    async def _refresh(self) -> None:
        """Reads the JWKS (finding its URL in the issuer's metadata first); keeps only signing keys of the
        accepted types. Raises Unreachable when it cannot be read."""
        import anyio
        import httpx2

        try:
            with anyio.fail_after(self.fetch_seconds):
                async with httpx2.AsyncClient(timeout=httpx2.Timeout(self.fetch_seconds), follow_redirects=False,
                                              trust_env=False) as http:
                    if self.jwks_uri is None:
                        self.jwks_uri = await self._discover(http)
                    listed = (await _read_json(http, self.jwks_uri)).get("keys")
            if not isinstance(listed, list):
                raise Unreachable(f"{self.jwks_uri} has no `keys` list")
        except (Unreachable, TimeoutError, httpx2.HTTPError) as exc:
            self._keys.failed_at = self.clock()
            self.jwks_uri = None  # found again next time: the issuer may have moved its keys
            what = str(exc) if isinstance(exc, Unreachable) else f"{type(exc).__name__} reading them"
            log.warning("cannot read the OAuth issuer's keys: %s", what)
            raise Unreachable(what) from None
        found: dict[str, dict[str, Any]] = {}
        for jwk in listed:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") not in _FAMILY.values():
                continue
            if jwk.get("alg") is not None and jwk.get("alg") not in ALGORITHMS:
                continue  # an encryption key, or one for an algorithm never accepted
            kid = jwk.get("kid")
            found.setdefault(kid if isinstance(kid, str) else "", jwk)
        self._keys = _Keys(jwks=found, read_at=self.clock(), miss_at=self._keys.miss_at)
        self.reads += 1

    async def _discover(self, http: Any) -> str:
        """`jwks_uri` from the issuer's metadata: RFC 8414's, then OpenID Connect's (the order the MCP
        authorization spec gives; for an issuer with a path, the well-known part goes before the path first)."""
        parts = urlsplit(self.config.issuer.rstrip("/"))
        origin, path = f"{parts.scheme}://{parts.netloc}", parts.path
        candidates = [f"{origin}/.well-known/oauth-authorization-server{path}",
                      f"{origin}/.well-known/openid-configuration{path}"]
        if path:
            candidates.append(f"{origin}{path}/.well-known/openid-configuration")
        for url in candidates:
            try:
                metadata = await _read_json(http, url)
            except Unreachable as exc:
                if exc.status in (400, 404, 405):  # not there: the next place
                    continue
                raise
            if str(metadata.get("issuer", "")).rstrip("/") != self.config.issuer.rstrip("/"):
                raise Unreachable(f"the metadata at {url} names another issuer")
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise Unreachable(f"the metadata at {url} has no jwks_uri")
            try:
                _check_url("jwks_uri", jwks_uri)
            except ConfigError as exc:
                raise Unreachable(str(exc)) from None
            return jwks_uri
        raise Unreachable(f"no authorization server metadata under {origin}")


async def check_issuer(config: OAuthConfig) -> tuple[bool, str]:
    """For `flux-mcp doctor`: whether the issuer's metadata and keys can be read now, and what was found."""
    verifier = JwtVerifier(config)
    try:
        keys = await verifier.read_keys()
    except Unreachable as exc:
        return False, f"{config.issuer}: {exc}"
    algs = sorted({str(k.get("alg") or k.get("kty")) for k in keys.values()})
    if not keys:
        return False, f"{config.issuer}: {verifier.jwks_uri} publishes no signing key flux-mcp accepts"
    return True, (f"{config.issuer}: {len(keys)} signing key{'s' if len(keys) != 1 else ''} ({', '.join(algs)}) "
                  f"at {verifier.jwks_uri}; tokens for {', '.join(config.audiences[:1])}"
                  + (f" with scope {' '.join(config.required_scopes)}" if config.required_scopes else ""))


class Refused(Exception):
    """Why a token is refused (never containing the token)."""


def _scopes(claims: dict[str, Any]) -> list[str]:
    """RFC 9068's space-separated `scope`, or the `scp` some issuers send (a list or a string)."""
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return raw.split()
    if isinstance(raw, list):
        return [s for s in raw if isinstance(s, str)]
    return []


async def _read_json(http: Any, url: str) -> dict[str, Any]:
    import json

    from .http import BodyTooLarge, read_capped

    async with http.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.status_code != 200:
            raise Unreachable(f"HTTP {response.status_code} from {url}", response.status_code)
        try:
            body = await read_capped(response, MAX_DOCUMENT_BYTES)
        except BodyTooLarge:
            raise Unreachable(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise Unreachable(f"{url} did not answer JSON") from None
    if not isinstance(document, dict):
        raise Unreachable(f"{url} did not answer a JSON object")
    return document


# --- the wiring ------------------------------------------------------------------------------------

class ResourceServer:
    """The OAuth mode of one HTTP app: the verifier, the SDK's settings for it, and the layers in front."""

    def __init__(self, config: OAuthConfig, verifier: JwtVerifier | None = None, *, endpoint: str = "/mcp"):
        self.config = config
        self.verifier = verifier or JwtVerifier(config)
        if not urlsplit(config.resource_url).path.rstrip("/").endswith(endpoint):
            log.warning("FLUX_MCP_RESOURCE_URL (%s) does not end with this transport's endpoint %s: clients "
                        "connecting to %s will be told about another resource", config.resource_url, endpoint,
                        endpoint)

    def server_kwargs(self) -> dict[str, Any]:
        """What MCPServer takes to serve as this resource server (`auth`, `token_verifier`)."""
        from mcp.server.auth.settings import AuthSettings

        # As strings: AuthSettings keeps them as written, while AnyHttpUrl(...) would add a `/` to a bare
        # host, and clients compare the metadata's issuer with the issuer's own spelling exactly.
        auth = AuthSettings(issuer_url=self.config.issuer,  # type: ignore[arg-type]
                            resource_server_url=self.config.resource_url,  # type: ignore[arg-type]
                            required_scopes=list(self.config.required_scopes) or None,
                            validate_token_resource=False)  # JwtVerifier checks the audience itself
        return {"auth": auth, "token_verifier": self.verifier}

    @property
    def metadata_path(self) -> str:
        from mcp.server.auth.routes import build_resource_metadata_url
        from pydantic import AnyHttpUrl

        return urlsplit(str(build_resource_metadata_url(AnyHttpUrl(self.config.resource_url)))).path

    def guard(self, app: ASGIApp, sdk_app: ASGIApp, limits: HttpLimits) -> ASGIApp:
        """`app` (the server with its limits in front) behind the OAuth gate; `sdk_app` is the SDK's own app
        (from `wrap_sdk_app`), which answers the challenges for requests the gate found without a valid token."""
        from .middleware import FailureThrottle

        return OAuthGate(app, sdk_app, self.verifier, FailureThrottle(limits.auth_burst, limits.auth_per_second),
                         open_paths=frozenset({self.metadata_path}))

    def wrap_sdk_app(self, sdk_app: ASGIApp) -> ASGIApp:
        """The SDK's app with `scope` in its challenges (the layer between it and the limits)."""
        return ScopeChallenge(sdk_app, self.config.required_scopes)


class ScopeChallenge:
    """Adds `scope="<required scopes>"` to the SDK's `WWW-Authenticate: Bearer` challenges (401 and 403),
    so a client knows which scopes to ask the issuer for."""

    def __init__(self, app: ASGIApp, scopes: tuple[str, ...]):
        self.app = app
        self.scope_param = f', scope="{" ".join(scopes)}"'.encode() if scopes else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.scope_param:
            await self.app(scope, receive, send)
            return

        async def adding_scope(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") in (401, 403):
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() == b"www-authenticate" and value.startswith(b"Bearer ") \
                            and b" scope=" not in value:
                        value += self.scope_param
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, adding_scope)


class OAuthGate:
    """In front of everything: checks the bearer token once (the verifier memoizes its answer for the SDK's
    own check of the same request). Without a valid token the request goes straight to the SDK's app with
    an empty body (its 401 challenge never needs one), so the client's body is never read and holds no
    session. A refused token spends the address's allowance (`FailureThrottle`) and is logged with the
    address and the reason, never the token; an address whose allowance is spent is answered 429 with
    Retry-After. Spending nothing: a request with no token at all (every client's first, which the
    challenge answers with where to sign in; a team behind one address starts many), and a refusal because
    the issuer cannot be reached (not the client's fault). Health routes and the protected resource
    metadata pass untouched."""

    def __init__(self, app: ASGIApp, sdk_app: ASGIApp, verifier: JwtVerifier, throttle: FailureThrottle, *,
                 open_paths: frozenset[str] = frozenset()):
        from .httpguard import Occasional
        from .shared import HEALTH_PATHS

        self.app = app
        self.sdk_app = sdk_app
        self.verifier = verifier
        self.throttle = throttle
        self.open_paths = open_paths | HEALTH_PATHS
        self._occasional = Occasional()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .middleware import client_key, refuse_throttled

        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        wait = self.throttle.retry_after(client)
        if wait:
            await refuse_throttled(send, client, wait, self._occasional, log, "refused OAuth tokens")
            return
        token = _bearer(scope)
        attempt = Attempt()
        reset = _attempt.set(attempt)
        try:
            accepted = token is not None and await self.verifier.verify_token(token) is not None
            if accepted:
                await self.app(scope, receive, _noting_scope_refusal(send, client, attempt))
                return
            status = await _status_of(self.sdk_app, scope, send)
        finally:
            _attempt.reset(reset)
        if status != 401:  # a route without auth (or none at all) answered
            return
        if token is None:  # how every client starts: the challenge tells it where to sign in
            log.info("answered a request from %s without a token with the sign-in challenge", client)
            return
        if attempt.issuer_down:
            log.warning("refused an HTTP request from %s: %s", client, attempt.reason)
            return
        failures = self.throttle.failed(client)
        log.warning("refused an HTTP request from %s: an OAuth token refused: %s (%d recent failed attempt%s)",
                    client, attempt.reason or "invalid", failures, "" if failures == 1 else "s")


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                return str(credential.strip().decode("latin-1"))
            return None
    return None


async def _status_of(app: ASGIApp, scope: Scope, send: Send) -> int | None:
    """Runs `app` on the request with an empty body; returns the status it answered."""
    status: int | None = None
    sent = False

    async def empty() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def noting(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, empty, noting)
    return status


def _noting_scope_refusal(send: Send, client: str, attempt: Attempt) -> Send:
    """`send`, logging (once per minute per address) the SDK's 403 for a token without a required scope."""

    async def noting(message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 403:
            token = attempt.result
            log.info("refused an HTTP request from %s: the OAuth token of %s lacks a required scope", client,
                     token.subject if token is not None else "?")
        await send(message)

    return noting
