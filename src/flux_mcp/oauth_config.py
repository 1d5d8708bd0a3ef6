"""The OAuth resource-server settings (FLUX_MCP_OAUTH_ISSUER and its companions), apart from the verifier in
`oauth`: every server start reads them, and only a server with OAuth turned on needs the rest."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError


class OAuthConfig(BaseModel):
    """FLUX_MCP_OAUTH_ISSUER, FLUX_MCP_RESOURCE_URL, FLUX_MCP_OAUTH_AUDIENCE, FLUX_MCP_REQUIRED_SCOPES."""

    model_config = ConfigDict(frozen=True)

    issuer: str
    """The authorization server, exactly as its tokens' `iss` spell it (a trailing `/` aside)."""
    resource_url: str
    """This server's MCP endpoint as clients reach it: the resource its tokens are issued for."""
    audience: str | None = None
    """The `aud` tokens must carry; None: the resource URL."""
    required_scopes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OAuthConfig | None:
        """The OAuth settings, None when FLUX_MCP_OAUTH_ISSUER is unset; ConfigError for anything unusable."""
        issuer = env.get("FLUX_MCP_OAUTH_ISSUER", "").strip()
        others = [n for n in ("FLUX_MCP_RESOURCE_URL", "FLUX_MCP_OAUTH_AUDIENCE", "FLUX_MCP_REQUIRED_SCOPES")
                  if env.get(n, "").strip()]
        if not issuer:
            if others:
                raise ConfigError(f"{others[0]} is set but FLUX_MCP_OAUTH_ISSUER is not: set the issuer (the "
                                  "authorization server's URL) to turn on OAuth, or unset it.")
            return None
        if env.get("FLUX_MCP_AUTH_TOKEN", "").strip() or env.get("FLUX_MCP_AUTH_TOKENS", "").strip():
            raise ConfigError("FLUX_MCP_OAUTH_ISSUER cannot be combined with FLUX_MCP_AUTH_TOKEN or "
                              "FLUX_MCP_AUTH_TOKENS: with OAuth every user signs in at the issuer; unset the "
                              "static tokens (or the issuer, to keep them).")
        _check_url("FLUX_MCP_OAUTH_ISSUER", issuer)
        import importlib.util

        if importlib.util.find_spec("jwt") is None:
            raise ConfigError("FLUX_MCP_OAUTH_ISSUER needs PyJWT, part of the shared mode's extra: "
                              "pip install 'flux-image-mcp[cluster]'.")
        resource = env.get("FLUX_MCP_RESOURCE_URL", "").strip()
        if not resource:
            raise ConfigError("FLUX_MCP_OAUTH_ISSUER needs FLUX_MCP_RESOURCE_URL: the URL clients connect to, "
                              "e.g. https://flux.example.com/mcp.")
        _check_url("FLUX_MCP_RESOURCE_URL", resource)
        audience = env.get("FLUX_MCP_OAUTH_AUDIENCE", "").strip() or None
        scopes = tuple(dict.fromkeys(s for s in env.get("FLUX_MCP_REQUIRED_SCOPES", "").replace(",", " ").split()))
        return cls(issuer=issuer, resource_url=resource, audience=audience, required_scopes=scopes)

    @property
    def audiences(self) -> list[str]:
        """The `aud` values accepted: the configured audience, or the resource URL with or without its `/`."""
        if self.audience:
            return [self.audience]
        bare = self.resource_url.rstrip("/")
        return [bare, bare + "/"]

    @property
    def issuers(self) -> list[str]:
        bare = self.issuer.rstrip("/")
        return [bare, bare + "/"]


def _check_url(variable: str, url: str) -> None:
    """https, or http on this machine's loopback (for trying it out); no query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError(f"{variable} is not a URL (got {url!r}).") from None
    loopback = host in ("localhost", "127.0.0.1", "::1")
    if not host or parts.scheme not in ("https", "http") or (parts.scheme == "http" and not loopback):
        raise ConfigError(f"{variable} must be an https:// URL (http:// only on 127.0.0.1 or localhost); "
                          f"got {url!r}.")
    if parts.query or parts.fragment:
        raise ConfigError(f"{variable} must not have a query or fragment (got {url!r}).")
