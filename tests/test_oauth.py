"""OAuth resource-server mode over real loopback sockets: an authorization server on 127.0.0.1 publishes its
metadata and keys (generated here), tokens are signed here, and flux-mcp's streamable-HTTP app checks them
as a client of the MCP SDK (or a plain HTTP client, for the refusals) sees it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import pytest

if importlib.util.find_spec("jwt") is None:  # PyJWT comes with the shared mode's extra
    why = "PyJWT not installed: pip install -e '.[test,cluster,cluster-test]'"
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)  # CI installs it: a skip there would hide these tests
    pytest.skip(why, allow_module_level=True)

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from flux_mcp.backends import open_journal
from flux_mcp.config import Settings
from flux_mcp.errors import ConfigError
from flux_mcp.httpguard import HttpLimits
from flux_mcp.oauth import MISS_REFRESH_SECONDS, JwtVerifier, OAuthConfig
from tests.conftest import ATLAS_KEY, text_of
from tests.fakes.wire import free_port, json_response, serve_on_loopback
from tests.test_hardening_http import serving as served_in_thread

pytestmark = [pytest.mark.anyio]
SCOPE = "flux:images"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
LIMITS = HttpLimits(max_connections=200)


class Issuer:
    """An authorization server's public face: RFC 8414 metadata and a JWKS, with keys made here. `publish`
    changes the published keys (rotation); `jwks_reads` counts how often the JWKS was fetched."""

    def __init__(self) -> None:
        self.url = ""
        self.private: dict[str, Any] = {}
        self.published: list[dict[str, Any]] = []
        self.jwks_reads = 0
        self.token_requests: list[dict[str, str]] = []
        self.consented = ""
        """The scope the user agreed to at the authorization endpoint."""
        self.add_key("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.publish("rsa-1")

    def add_key(self, kid: str, key: Any) -> None:
        self.private[kid] = key

    def publish(self, *kids: str) -> None:
        jwks = []
        for kid in kids:
            key = self.private[kid]
            maker = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = maker.to_jwk(key.public_key(), as_dict=True)
            jwks.append({**jwk, "kid": kid, "use": "sig"})
        self.published = jwks

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/.well-known/oauth-authorization-server":
            return json_response(200, {"issuer": self.url, "jwks_uri": f"{self.url}/jwks",
                                       "authorization_endpoint": f"{self.url}/authorize",
                                       "token_endpoint": f"{self.url}/token", "registration_endpoint":
                                       f"{self.url}/register", "response_types_supported": ["code"],
                                       "code_challenge_methods_supported": ["S256"]})
        if request.url.path == "/jwks":
            self.jwks_reads += 1
            return json_response(200, {"keys": self.published})
        # Enough of an authorization server for an MCP client's sign-in: registration, and a token endpoint
        # that issues the JWT for the resource the client names, with the scope the user consented to.
        if request.url.path == "/register" and request.method == "POST":
            return json_response(201, {**json.loads(request.content), "client_id": "registered-client"})
        if request.url.path == "/token" and request.method == "POST":
            form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
            self.token_requests.append(form)
            if form.get("grant_type") != "authorization_code" or form.get("code") != "code-for-erin":
                return json_response(400, {"error": "invalid_grant"})
            token = self.token("erin", resource=form.get("resource", ""), scope=self.consented)
            return json_response(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})
        return json_response(404, {"error": "not_found"})

    def token(self, sub: str = "alice", *, kid: str = "rsa-1", aud: str | None = None, iss: str | None = None,
              scope: str = SCOPE, lifetime: float = 300, resource: str = "") -> str:
        now = int(time.time())
        claims = {"iss": iss or self.url, "sub": sub, "aud": aud or resource, "exp": now + int(lifetime),
                  "iat": now, "nbf": now, "client_id": "test-client", "scope": scope, "jti": f"{sub}-{now}"}
        key = self.private[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    with serve_on_loopback(issuer) as url:
        issuer.url = url
        yield issuer


def serving(settings: Settings, port: int, limits: HttpLimits = LIMITS, transport: str = "streamable-http"
            ) -> contextlib.AbstractContextManager[str]:
    """flux-mcp's HTTP app served by uvicorn on 127.0.0.1:`port` in a thread (the resource URL names the port)."""
    return served_in_thread(settings, limits, transport, port=port)


class Site:
    """A running flux-mcp in OAuth mode: its URL, its resource URL, and tokens for it."""

    def __init__(self, url: str, issuer: Issuer, settings: Settings):
        self.url = url
        self.resource = f"{url}/mcp"
        self.metadata = f"{url}/.well-known/oauth-protected-resource/mcp"
        self.issuer = issuer
        self.settings = settings

    def token(self, sub: str = "alice", **kw: Any) -> str:
        return self.issuer.token(sub, resource=self.resource, **kw)

    async def post(self, token: str | None, body: dict[str, Any] = INIT) -> httpx2.Response:
        headers = dict(ACCEPT) | ({"Authorization": f"Bearer {token}"} if token else {})
        async with httpx2.AsyncClient(timeout=10) as http:
            return await http.post(self.resource, json=body, headers=headers)

    @contextlib.asynccontextmanager
    async def user(self, token: str) -> AsyncIterator[Client]:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http, \
                Client(streamable_http_client(self.resource, http_client=http)) as client:
            yield client


@pytest.fixture
def site(issuer: Issuer, make_settings: Callable[..., Settings]) -> Iterator[Site]:
    port = free_port()
    settings = make_settings(FLUX_MCP_PROVIDER="placeholder", FLUX_MCP_OAUTH_ISSUER=issuer.url,
                             FLUX_MCP_RESOURCE_URL=f"http://127.0.0.1:{port}/mcp", FLUX_MCP_REQUIRED_SCOPES=SCOPE)
    with serving(settings, port) as url:
        yield Site(url, issuer, settings)


def handmade(header: dict[str, Any], claims: dict[str, Any], hmac_secret: bytes | None) -> str:
    """A JWT put together by hand (PyJWT refuses to make these on purpose)."""
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{part(json.dumps(header).encode())}.{part(json.dumps(claims).encode())}"
    signature = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest() if hmac_secret else b""
    return f"{signing_input}.{part(signature)}"


def challenge(response: httpx2.Response) -> str:
    return response.headers.get("www-authenticate", "")


# --- refusals --------------------------------------------------------------------------------------

async def test_no_token_is_answered_401_with_the_resource_metadata_which_names_the_issuer(site: Site):
    refused = await site.post(None)
    async with httpx2.AsyncClient(timeout=10) as http:
        metadata = await http.get(site.metadata)
        health = await http.get(f"{site.url}/healthz")
    assert refused.status_code == 401
    assert challenge(refused).startswith("Bearer ")
    assert f'resource_metadata="{site.metadata}"' in challenge(refused)
    assert f'scope="{SCOPE}"' in challenge(refused)
    assert metadata.status_code == 200
    assert metadata.json()["resource"] == site.resource
    assert metadata.json()["authorization_servers"] == [site.issuer.url]  # exactly: clients compare it so
    assert metadata.json()["scopes_supported"] == [SCOPE]
    assert health.status_code == 200  # a load balancer has no token


async def test_a_token_for_another_audience_is_refused_401(site: Site):
    token = site.token(aud="https://other.example.com/mcp")
    refused = await site.post(token)
    assert refused.status_code == 401 and 'error="invalid_token"' in challenge(refused)
    assert (await site.post(site.token())).status_code == 200  # the same token for this server is accepted


async def test_a_token_from_another_issuer_is_refused_401_even_signed_by_a_known_key(site: Site):
    refused = await site.post(site.token(iss="https://evil.example.com"))
    assert refused.status_code == 401 and f'resource_metadata="{site.metadata}"' in challenge(refused)


async def test_an_expired_token_is_refused_401(site: Site):
    refused = await site.post(site.token(lifetime=-120))  # past exp by more than the clock leeway
    assert refused.status_code == 401 and 'error="invalid_token"' in challenge(refused)


async def test_a_token_without_the_required_scope_is_refused_403_naming_the_scope(site: Site):
    refused = await site.post(site.token(scope="openid profile"))
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in challenge(refused)
    assert f'scope="{SCOPE}"' in challenge(refused) and f'resource_metadata="{site.metadata}"' in challenge(refused)


async def test_a_token_signed_with_an_unpublished_key_or_hmac_is_refused(site: Site, issuer: Issuer):
    issuer.add_key("stray", ec.generate_private_key(ec.SECP256R1()))
    stray = site.token(kid="stray")
    # An HMAC token "signed" with the published public key as the secret (the classic algorithm confusion),
    # and an unsigned one.
    public_pem = issuer.private["rsa-1"].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": issuer.url, "sub": "mallory", "aud": site.resource, "exp": int(time.time()) + 300,
              "scope": SCOPE}
    forged = handmade({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, claims, public_pem)
    unsigned = handmade({"alg": "none", "kid": "rsa-1"}, claims, None)
    for token in (stray, forged, unsigned):
        assert (await site.post(token)).status_code == 401


async def test_refused_tokens_not_missing_ones_are_throttled_per_address_and_logged_without_the_token(
        issuer: Issuer, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture):
    port = free_port()
    settings = make_settings(FLUX_MCP_PROVIDER="placeholder", FLUX_MCP_OAUTH_ISSUER=issuer.url,
                             FLUX_MCP_RESOURCE_URL=f"http://127.0.0.1:{port}/mcp")
    limits = HttpLimits(max_connections=200, auth_burst=3, auth_per_second=0.001)
    caplog.set_level(logging.INFO, logger="flux_mcp")
    with serving(settings, port, limits) as url:
        site = Site(url, issuer, settings)
        starting = [(await site.post(None)).status_code for _ in range(5)]  # clients finding the issuer
        expired = site.token(lifetime=-120)
        answers = [await site.post(expired) for _ in range(3)]
        good = site.token()
        throttled = await site.post(good)
    assert starting == [401] * 5 and [a.status_code for a in answers] == [401, 401, 401]
    # Once the allowance is spent, even a good token waits: guessing cannot go on at full speed.
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "flux_mcp.http"]
    assert any("refused an HTTP request from 127.0.0.1" in line and "expired" in line for line in lines), lines
    assert all(expired not in line and good not in line for line in caplog.messages)
    assert all(expired.split(".")[2] not in line for line in caplog.messages)


async def test_an_unreachable_issuer_refuses_tokens_without_holding_it_against_the_client(
        issuer: Issuer, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture):
    port, nobody = free_port(), f"http://127.0.0.1:{free_port()}"  # nothing listens there
    resource = f"http://127.0.0.1:{port}/mcp"
    settings = make_settings(FLUX_MCP_PROVIDER="placeholder", FLUX_MCP_OAUTH_ISSUER=nobody,
                             FLUX_MCP_RESOURCE_URL=resource)
    limits = HttpLimits(max_connections=200, auth_burst=2, auth_per_second=0.001)
    caplog.set_level(logging.INFO, logger="flux_mcp")
    with serving(settings, port, limits) as url:
        site = Site(url, issuer, settings)
        token = issuer.token(iss=nobody, resource=resource)
        answers = [(await site.post(token)).status_code for _ in range(4)]
    # The first attempt finds the issuer down; the next ones within the minute do not ask it again. None
    # is answered 429: the client did nothing wrong.
    assert answers == [401, 401, 401, 401]
    assert any("issuer's keys cannot be read" in m for m in caplog.messages), caplog.messages


async def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(site: Site):
    host, port = site.url.removeprefix("http://").split(":")

    def send_headers_only() -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Accept: application/json, text/event-stream\r\nAuthorization: Bearer not.a.token\r\n"
                         b"Content-Length: 1000000\r\n\r\n{")
            return sock.recv(4096)

    with anyio.fail_after(10):
        answer = await anyio.to_thread.run_sync(send_headers_only)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


# --- accepted tokens ---------------------------------------------------------------------------------

async def test_a_valid_token_uses_the_tools_and_its_journal_row_carries_the_token_principal(site: Site):
    async with site.user(site.token("alice")) as alice:
        made = await alice.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    assert not made.is_error, text_of(made)
    pid = made.structured_content["prediction_id"]
    journal = await open_journal(site.settings)
    try:
        record = await journal.get(pid)
    finally:
        await journal.close()
    host = site.issuer.url.removeprefix("http://")
    assert record is not None and record.principal == f"{host}|alice"


async def test_an_mcp_client_signs_in_from_the_challenge_and_the_metadata_alone(site: Site, issuer: Issuer):
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import (
        AuthorizationCodeResult,
        OAuthClientInformationFull,
        OAuthClientMetadata,
        OAuthToken,
    )

    class Memory:
        tokens: OAuthToken | None = None
        client: OAuthClientInformationFull | None = None

        async def get_tokens(self) -> OAuthToken | None:
            return self.tokens

        async def set_tokens(self, tokens: OAuthToken) -> None:
            self.tokens = tokens

        async def get_client_info(self) -> OAuthClientInformationFull | None:
            return self.client

        async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
            self.client = client_info

    visited: list[str] = []

    async def browser(url: str) -> None:  # the user signs in and consents; the issuer redirects back
        visited.append(url)
        issuer.consented = parse_qs(urlsplit(url).query).get("scope", [""])[0]

    async def callback() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(code="code-for-erin", state=parse_qs(urlsplit(visited[-1]).query)["state"][0])

    provider = OAuthClientProvider(site.resource, OAuthClientMetadata(
        redirect_uris=["http://127.0.0.1:9/callback"], client_name="test", token_endpoint_auth_method="none"),
        Memory(), browser, callback)
    async with httpx2.AsyncClient(auth=provider, timeout=30) as http, \
            Client(streamable_http_client(site.resource, http_client=http)) as erin:
        made = await erin.call_tool("generate_image", {"prompt": "a sailing boat"})
    asked = parse_qs(urlsplit(visited[0]).query)
    # The client learned the issuer, this resource and the scope from the 401 and the metadata it names.
    assert visited[0].startswith(f"{issuer.url}/authorize?")
    assert asked["resource"] == [site.resource] and asked["scope"] == [SCOPE]
    assert issuer.token_requests[0]["resource"] == site.resource
    assert not made.is_error, text_of(made)


async def test_one_user_cannot_see_another_users_prediction(site: Site):
    async with site.user(site.token("alice")) as alice:
        made = await alice.call_tool("generate_image", {"prompt": "a red bicycle"})
        pid = made.structured_content["prediction_id"]
        own = await alice.call_tool("check_prediction", {"prediction_id": pid})
    async with site.user(site.token("bob")) as bob:
        stranger = await bob.call_tool("check_prediction", {"prediction_id": pid})
        unknown = await bob.call_tool("check_prediction", {"prediction_id": "placeholder:nosuchjob"})
        listed = await bob.call_tool("list_predictions", {})
    assert not own.is_error, text_of(own)
    assert stranger.is_error and unknown.is_error
    assert text_of(stranger).replace(pid, "ID") == text_of(unknown).replace("placeholder:nosuchjob", "ID")
    assert pid not in text_of(listed)


async def test_each_oauth_user_is_held_to_their_own_budget(
        issuer: Issuer, make_settings: Callable[..., Settings], loopback_fake: Any):
    """Two users of one client (one client_id) are two principals: each has their own per-user limit (one
    $0.003 flux-schnell image a day each), within the server's."""
    port = free_port()
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=loopback_fake.url,
                             FLUX_MCP_USER_BUDGET_DAY_USD="0.003", FLUX_MCP_BUDGET_DAY_USD="1",
                             FLUX_MCP_OAUTH_ISSUER=issuer.url, FLUX_MCP_RESOURCE_URL=f"http://127.0.0.1:{port}/mcp")
    with serving(settings, port) as url:
        site = Site(url, issuer, settings)
        async with site.user(site.token("alice")) as alice:
            first = await alice.call_tool("generate_image", {"prompt": "a lighthouse"})
            over = await alice.call_tool("generate_image", {"prompt": "a harbour"})
        async with site.user(site.token("bob")) as bob:
            own = await bob.call_tool("generate_image", {"prompt": "a harbour"})
    assert not first.is_error and not own.is_error, (text_of(first), text_of(own))
    assert over.is_error and "$0.003 of the FLUX_MCP_USER_BUDGET_DAY_USD limit of $0.003" in text_of(over), \
        text_of(over)
    assert len(loopback_fake.ledger) == 2


async def test_a_rotated_key_is_fetched_once_and_unknown_keys_do_not_refetch_every_time(site: Site, issuer: Issuer):
    assert (await site.post(site.token())).status_code == 200
    assert issuer.jwks_reads == 1
    issuer.add_key("ec-2", ec.generate_private_key(ec.SECP256R1()))
    issuer.publish("rsa-1", "ec-2")  # the issuer rotates: a new key signs from now on
    async with site.user(site.token("alice", kid="ec-2")) as alice:
        listed = await alice.call_tool("list_predictions", {})
    assert not listed.is_error and issuer.jwks_reads == 2
    issuer.add_key("forged", ec.generate_private_key(ec.SECP256R1()))
    for _ in range(3):  # a kid nobody publishes: refused without asking the issuer again each time
        assert (await site.post(site.token(kid="forged"))).status_code == 401
    assert issuer.jwks_reads == 2


async def test_the_verifier_rereads_keys_after_the_miss_interval_and_drops_withdrawn_keys(issuer: Issuer):
    now = [1000.0]
    resource = "http://127.0.0.1:9/mcp"
    verifier = JwtVerifier(OAuthConfig(issuer=issuer.url, resource_url=resource), clock=lambda: now[0])
    assert await verifier.verify_token(issuer.token(resource=resource)) is not None
    issuer.add_key("ec-3", ec.generate_private_key(ec.SECP256R1()))
    assert await verifier.verify_token(issuer.token(kid="ec-3", resource=resource)) is None  # not published yet
    issuer.publish("rsa-1", "ec-3")
    assert await verifier.verify_token(issuer.token(kid="ec-3", resource=resource)) is None  # within the interval
    assert issuer.jwks_reads == 2
    now[0] += MISS_REFRESH_SECONDS
    accepted = await verifier.verify_token(issuer.token("carol", kid="ec-3", resource=resource))
    assert accepted is not None and accepted.subject == f"{issuer.url.removeprefix('http://')}|carol"
    assert accepted.scopes == [SCOPE] and accepted.client_id == "test-client"
    issuer.publish("ec-3")  # rsa-1 withdrawn
    assert await verifier.verify_token(issuer.token(resource=resource)) is not None  # still cached
    now[0] += 3600
    assert await verifier.verify_token(issuer.token(resource=resource)) is None


async def test_the_sse_transport_takes_the_same_tokens_and_challenges(
        issuer: Issuer, make_settings: Callable[..., Settings]):
    port = free_port()
    resource = f"http://127.0.0.1:{port}/sse"
    settings = make_settings(FLUX_MCP_PROVIDER="placeholder", FLUX_MCP_OAUTH_ISSUER=issuer.url,
                             FLUX_MCP_RESOURCE_URL=resource, FLUX_MCP_REQUIRED_SCOPES=SCOPE)
    with serving(settings, port, transport="sse") as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            refused = await http.get(resource)
            lacking = await http.get(resource, headers={
                "Authorization": f"Bearer {issuer.token(resource=resource, scope='openid')}"})
        headers = {"Authorization": f"Bearer {issuer.token('dora', resource=resource)}"}
        async with Client(sse_client(resource, headers=headers)) as dora:
            made = await dora.call_tool("generate_image", {"prompt": "a kite"})
    assert refused.status_code == 401
    assert f'resource_metadata="{url}/.well-known/oauth-protected-resource/sse"' in challenge(refused)
    assert lacking.status_code == 403 and f'scope="{SCOPE}"' in challenge(lacking)
    assert not made.is_error, text_of(made)
    journal = await open_journal(settings)
    try:
        record = await journal.get(made.structured_content["prediction_id"])
    finally:
        await journal.close()
    assert record is not None and record.principal == f"{issuer.url.removeprefix('http://')}|dora"


# --- configuration ----------------------------------------------------------------------------------

def test_oauth_without_a_resource_url_is_refused_at_start_in_one_line(make_settings: Callable[..., Settings]):
    with pytest.raises(ConfigError, match="FLUX_MCP_RESOURCE_URL") as refused:
        make_settings(FLUX_MCP_OAUTH_ISSUER="https://login.example.com")
    assert "\n" not in str(refused.value)


def test_oauth_and_static_tokens_together_are_refused_at_start(make_settings: Callable[..., Settings]):
    token = "tok-canary-8c1f3e7a5b9d2f4e6a0c8e1b3d5f7a9c"
    for variable, value in (("FLUX_MCP_AUTH_TOKEN", token), ("FLUX_MCP_AUTH_TOKENS", f"alice:{token}")):
        with pytest.raises(ConfigError, match="cannot be combined") as refused:
            make_settings(FLUX_MCP_OAUTH_ISSUER="https://login.example.com",
                          FLUX_MCP_RESOURCE_URL="https://flux.example.com/mcp", **{variable: value})
        assert token not in str(refused.value)


def test_oauth_settings_are_checked_at_start(make_settings: Callable[..., Settings]):
    with pytest.raises(ConfigError, match="FLUX_MCP_OAUTH_ISSUER is not"):
        make_settings(FLUX_MCP_RESOURCE_URL="https://flux.example.com/mcp")
    with pytest.raises(ConfigError, match="https://"):
        make_settings(FLUX_MCP_OAUTH_ISSUER="http://login.example.com",
                      FLUX_MCP_RESOURCE_URL="https://flux.example.com/mcp")
    settings = make_settings(FLUX_MCP_OAUTH_ISSUER="https://login.example.com/realms/team",
                             FLUX_MCP_RESOURCE_URL="https://flux.example.com/mcp",
                             FLUX_MCP_REQUIRED_SCOPES="flux:images, flux:admin")
    assert settings.oauth is not None and settings.http_auth
    assert settings.oauth.required_scopes == ("flux:images", "flux:admin")
    assert settings.oauth.audiences == ["https://flux.example.com/mcp", "https://flux.example.com/mcp/"]


def test_the_cli_refuses_to_start_without_a_resource_url(monkeypatch: pytest.MonkeyPatch, home: Path,
                                                         capsys: pytest.CaptureFixture[str]):
    from flux_mcp.cli import main

    monkeypatch.chdir(home.parent)  # no .env there
    monkeypatch.setenv("FLUX_MCP_HOME", str(home))
    monkeypatch.setenv("FLUX_MCP_OAUTH_ISSUER", "https://login.example.com")
    for variable in ("FLUX_MCP_RESOURCE_URL", "FLUX_MCP_AUTH_TOKEN", "FLUX_MCP_AUTH_TOKENS"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["serve", "--transport", "streamable-http"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FLUX_MCP_RESOURCE_URL" in err


def test_doctor_reports_the_issuer_and_its_keys(issuer: Issuer, monkeypatch: pytest.MonkeyPatch, home: Path,
                                               capsys: pytest.CaptureFixture[str]):
    from flux_mcp import cli
    from flux_mcp.providers import registry

    for spec in registry.SPECS:
        for variable in spec.variables:
            monkeypatch.delenv(variable, raising=False)
    for variable in ("FLUX_MCP_AUTH_TOKEN", "FLUX_MCP_AUTH_TOKENS", "FLUX_MCP_PROVIDER"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(home.parent)
    monkeypatch.setenv("FLUX_MCP_HOME", str(home))
    monkeypatch.setenv("FLUX_MCP_OAUTH_ISSUER", issuer.url)
    monkeypatch.setenv("FLUX_MCP_RESOURCE_URL", "https://flux.example.com/mcp")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "oauth issuer" in out and "1 signing key (RSA)" in out and f"{issuer.url}/jwks" in out
    monkeypatch.setenv("FLUX_MCP_OAUTH_ISSUER", f"http://127.0.0.1:{free_port()}")
    assert cli.main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["oauth"]["ok"] is False
