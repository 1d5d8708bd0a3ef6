"""Settings, read once from the environment (and a `.env` in the working directory)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr

from .errors import ConfigError
from .oauth_config import OAuthConfig
from .providers import registry
from .request import MAX_WAIT_SECONDS

DEFAULT_WAIT_SECONDS = 45.0
DEFAULT_MAX_WAIT_SECONDS = 50.0
"""The longest a call waits before answering pending: TypeScript-SDK clients give up on a call after 60 s
(progress or not) and Claude Desktop near there; FLUX_MCP_MAX_WAIT_SECONDS raises it for clients that wait longer."""
CONFIRM_SECONDS = 300.0
"""How long a confirmation asked of the user (FLUX_MCP_CONFIRM_ABOVE_USD) may go unanswered; then nothing is spent."""
DEFAULT_PREVIEW_BUDGET = 600_000
"""Bytes of preview image data per tool result, before base64 (x4/3): stays under Claude
Desktop's 1 MB tool-result limit with room for the text and structured content."""


class ProviderSettings(BaseModel):
    """One provider's key, base URL and optional extras."""

    model_config = ConfigDict(frozen=True)

    api_key: SecretStr | None = None
    base_url: str = ""
    extra: dict[str, str] = {}


class Settings(BaseModel):
    """Everything flux-mcp reads from its environment."""

    model_config = ConfigDict(frozen=True)

    providers: dict[str, ProviderSettings]
    default_provider: str | None = None
    fallback: tuple[str, ...] = ()
    """FLUX_MCP_FALLBACK: providers to move on to, in order, when one provably did not create the job."""
    home: Path
    allowed_dirs: tuple[Path, ...] | None = None
    """Set by FLUX_MCP_ALLOWED_DIRS; None means: the client's roots, else the working directory."""
    cwd: Path
    wait_seconds: float = DEFAULT_WAIT_SECONDS
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS
    sessions_per_client: int = 32
    """FLUX_MCP_SESSIONS_PER_CLIENT: open streamable-HTTP sessions one client address may hold (an IDE
    opens a few; a load test from one machine needs more)."""
    rejoin_seconds: float = 600.0
    """FLUX_MCP_REJOIN_SECONDS: how long an identical call joins an earlier one whose answer never arrived."""
    keep_days: float | None = None
    """FLUX_MCP_KEEP_DAYS: finished jobs older than this are pruned at start (None: keep everything)."""
    auth_token: SecretStr | None = None
    auth_tokens: tuple[tuple[str, SecretStr], ...] = ()
    """FLUX_MCP_AUTH_TOKENS: (user name, token) pairs; a request's token names its principal."""
    oauth: OAuthConfig | None = None
    """FLUX_MCP_OAUTH_ISSUER and its companions: the HTTP transports accept the issuer's JWT access tokens."""
    database_url: SecretStr | None = None
    """FLUX_MCP_DATABASE_URL: the journal on PostgreSQL (shared mode); None: SQLite in `home`."""
    listen_database_url: SecretStr | None = None
    """FLUX_MCP_LISTEN_DATABASE_URL (shared mode): where each replica's one LISTEN connection goes (None: the
    FLUX_MCP_DATABASE_URL). LISTEN needs a session of its own: behind PgBouncer in transaction mode, point it
    at PostgreSQL directly (or at a session-mode pool) while FLUX_MCP_DATABASE_URL goes through the pooler."""
    s3_url: str | None = None
    """FLUX_MCP_S3_URL: images in an S3-compatible bucket; None: files in `home`."""
    s3: dict[str, str] = {}
    """The object store's endpoint and credentials, from the standard AWS_* variables."""
    presign_seconds: float = 3600.0
    lease_seconds: float = 10.0
    """FLUX_MCP_LEASE_SECONDS (shared mode): how long a replica's hold on a pending job lasts without its
    heartbeat, i.e. how soon another replica takes over the jobs of one that died."""
    preview: Literal["auto", "off", "full"] = "auto"
    preview_budget: int = DEFAULT_PREVIEW_BUDGET
    log_level: str = "INFO"
    tool_icons: bool = False
    """FLUX_MCP_TOOL_ICONS: each tool is listed with its icon (~150 bytes each in every `tools/list`: with all
    tools, more than the listing's 6,000-byte bound leaves room for); the server's own icon is always sent."""
    tracing: bool = False
    """OpenTelemetry is configured (an `OTEL_*` variable is set): every message gets a span."""
    prices: dict[str, dict[str, float]] = {}
    """FLUX_MCP_PRICES: USD per image by provider id and model id (`*`: the provider's other models)."""
    budget_day_usd: float | None = None
    budget_month_usd: float | None = None
    user_budget_day_usd: float | None = None
    """FLUX_MCP_USER_BUDGET_DAY_USD: each principal's own day limit, below the server's (None: the server's)."""
    user_budget_month_usd: float | None = None
    max_images_per_day: int | None = None
    confirm_above_usd: float | None = None
    confirm_seconds: float = CONFIRM_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> Settings:
        """Builds settings from `env` (default: os.environ over the working directory's `.env`)."""
        cwd = (cwd or Path.cwd()).resolve()
        if env is None:
            env = {**_dotenv(cwd / ".env"), **os.environ}
        providers: dict[str, ProviderSettings] = {}
        for spec in registry.SPECS:
            key = env.get(spec.key_env, "").strip() if spec.key_env else ""
            base = env.get(spec.base_url_env, "").strip() if spec.base_url_env else ""
            base = base or (spec.default_base_url or "")
            if base and not base.startswith(("http://", "https://")):
                raise ConfigError(f"{spec.base_url_env} must start with http:// or https:// (got {base!r}).")
            extra = {v.name: env[v.env].strip() for v in spec.extras if env.get(v.env, "").strip()}
            providers[spec.id] = ProviderSettings(api_key=SecretStr(key) if key else None, base_url=base, extra=extra)

        default = env.get("FLUX_MCP_PROVIDER", "").strip().lower() or None
        if default is not None and default not in providers and default != "auto":
            raise ConfigError(f"FLUX_MCP_PROVIDER={default!r} is not a provider; choose one of {', '.join(providers)} "
                              "or auto.")
        fallback = tuple(p.strip().lower() for p in env.get("FLUX_MCP_FALLBACK", "").split(",") if p.strip())
        unknown = [p for p in fallback if p not in providers]
        if unknown:
            raise ConfigError(f"FLUX_MCP_FALLBACK names {', '.join(unknown)}, not a provider; choose from "
                              f"{', '.join(providers)}.")

        home_raw = env.get("FLUX_MCP_HOME", "").strip()
        if home_raw:
            home = Path(home_raw).expanduser()
            home = home if home.is_absolute() else cwd / home
        else:
            import platformdirs

            home = Path(platformdirs.user_data_dir("flux-mcp", appauthor=False))

        allowed_raw = env.get("FLUX_MCP_ALLOWED_DIRS", "").strip()
        allowed = None
        if allowed_raw:
            allowed = tuple(
                (p if p.is_absolute() else cwd / p)
                for p in (Path(part).expanduser() for part in allowed_raw.split(os.pathsep) if part.strip())
            )

        max_wait = _number(env, "FLUX_MCP_MAX_WAIT_SECONDS", DEFAULT_MAX_WAIT_SECONDS, 1, MAX_WAIT_SECONDS)
        wait = min(_number(env, "FLUX_MCP_WAIT_SECONDS", DEFAULT_WAIT_SECONDS, 0, MAX_WAIT_SECONDS), max_wait)
        token = env.get("FLUX_MCP_AUTH_TOKEN", "").strip()
        preview = env.get("FLUX_MCP_PREVIEW", "auto").strip().lower() or "auto"
        if preview not in ("auto", "off", "full"):
            raise ConfigError(f"FLUX_MCP_PREVIEW must be auto, off or full (got {preview!r}).")
        budget = int(_number(env, "FLUX_MCP_PREVIEW_BYTES", DEFAULT_PREVIEW_BUDGET, 10_000, 50_000_000))
        icons_raw = env.get("FLUX_MCP_TOOL_ICONS", "").strip().lower()
        if icons_raw not in ("", "on", "off", "1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"FLUX_MCP_TOOL_ICONS must be on or off (got {icons_raw!r}).")
        from . import shared

        database_url = env.get("FLUX_MCP_DATABASE_URL", "").strip()
        if database_url:
            shared.check_database_url(database_url)
            shared.shared_defaults(env, providers)
        listen_url = env.get("FLUX_MCP_LISTEN_DATABASE_URL", "").strip() if database_url else ""
        if listen_url and not listen_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("FLUX_MCP_LISTEN_DATABASE_URL must start with postgresql:// (e.g. "
                              "postgresql://user:password@db-host:5432/flux, the database itself, not a pooler "
                              "in transaction mode).")
        s3_url = env.get("FLUX_MCP_S3_URL", "").strip()
        if s3_url:
            from .store_s3 import S3Location, s3_config

            S3Location.parse(s3_url)
        presign = _number(env, "FLUX_MCP_PRESIGN_SECONDS", 3600, 1, 604_800)
        prices_raw = env.get("FLUX_MCP_PRICES", "").strip()
        prices_file = Path(prices_raw).expanduser() if prices_raw else None
        images_cap = _optional(env, "FLUX_MCP_MAX_IMAGES_PER_DAY", 0, 10_000_000)
        return cls(
            providers=providers,
            default_provider=default,
            fallback=fallback,
            home=home.resolve(),
            allowed_dirs=allowed,
            cwd=cwd,
            wait_seconds=wait,
            max_wait_seconds=max_wait,
            rejoin_seconds=_number(env, "FLUX_MCP_REJOIN_SECONDS", 600.0, 0, 30 * 86_400),
            sessions_per_client=int(_number(env, "FLUX_MCP_SESSIONS_PER_CLIENT", 32, 1, 10_000)),
            keep_days=_number(env, "FLUX_MCP_KEEP_DAYS", -1, 0, 100_000) if env.get("FLUX_MCP_KEEP_DAYS", "").strip()
            else None,
            auth_token=SecretStr(token) if token else None,
            auth_tokens=shared.parse_tokens(env.get("FLUX_MCP_AUTH_TOKENS", "")),
            oauth=OAuthConfig.from_env(env),
            database_url=SecretStr(database_url) if database_url else None,
            listen_database_url=SecretStr(listen_url) if listen_url else None,
            s3_url=s3_url or None,
            s3=s3_config(env) if s3_url else {},
            presign_seconds=presign,
            lease_seconds=_number(env, "FLUX_MCP_LEASE_SECONDS", 10.0, 1, 3600),
            preview=preview,  # type: ignore[arg-type]
            preview_budget=budget,
            tool_icons=icons_raw in ("on", "1", "true", "yes"),
            log_level=env.get("FLUX_MCP_LOG_LEVEL", "INFO").strip().upper() or "INFO",
            tracing=any(k.startswith("OTEL_") for k in env)
            and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true",
            prices=read_prices(cwd / prices_file) if prices_file else {},
            budget_day_usd=_optional(env, "FLUX_MCP_BUDGET_DAY_USD", 0, 1_000_000),
            budget_month_usd=_optional(env, "FLUX_MCP_BUDGET_MONTH_USD", 0, 1_000_000),
            user_budget_day_usd=_optional(env, "FLUX_MCP_USER_BUDGET_DAY_USD", 0, 1_000_000),
            user_budget_month_usd=_optional(env, "FLUX_MCP_USER_BUDGET_MONTH_USD", 0, 1_000_000),
            max_images_per_day=None if images_cap is None else int(images_cap),
            confirm_above_usd=_optional(env, "FLUX_MCP_CONFIRM_ABOVE_USD", 0, 1_000_000),
        )

    def has_key(self, provider_id: str) -> bool:
        """Whether that provider's API key is set."""
        provider = self.providers.get(provider_id)
        return provider is not None and provider.api_key is not None

    def secrets(self) -> list[str]:
        """Every secret value, for the redactor: the API keys, the optional variables each provider
        declares secret, and the HTTP bearer token."""
        values = [p.api_key.get_secret_value() for p in self.providers.values() if p.api_key]
        for pid, p in self.providers.items():
            spec = registry.BY_ID.get(pid)  # a provider the registry does not know: every extra is kept secret
            values += [v for name, v in p.extra.items() if spec is None or name in spec.secret_extras]
        if self.auth_token:
            values.append(self.auth_token.get_secret_value())
        values += [token.get_secret_value() for _, token in self.auth_tokens]
        if self.database_url:
            from .shared import url_password

            values += filter(None, [url_password(self.database_url.get_secret_value())])
        if self.listen_database_url:
            from .shared import url_password

            values += filter(None, [url_password(self.listen_database_url.get_secret_value())])
        values += [v for k, v in self.s3.items() if k in ("secret_access_key", "session_token")]
        return values

    @property
    def shared(self) -> bool:
        """Shared (team) mode: the journal is on PostgreSQL, so the callers are remote and many."""
        return self.database_url is not None

    @property
    def http_auth(self) -> bool:
        """Whether the HTTP transports require a bearer token (one shared token, named ones, or OAuth's)."""
        return self.auth_token is not None or bool(self.auth_tokens) or self.oauth is not None


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {raw!r}).") from None
    if not (low <= value <= high):
        raise ConfigError(f"{name} must be between {low:g} and {high:g} (got {raw}).")
    return value


def _optional(env: Mapping[str, str], name: str, low: float, high: float) -> float | None:
    """A number that is unset (None) unless the variable is."""
    return _number(env, name, -1, low, high) if env.get(name, "").strip() else None


def read_prices(path: Path) -> dict[str, dict[str, float]]:
    """A FLUX_MCP_PRICES file: JSON (`{"atlascloud": {"black-forest-labs/flux-dev": 0.01}}`) or TOML (a table
    per provider id, `"model id" = usd`), USD per image; the model `*` prices every other model of that
    provider. Anything else is one ConfigError naming the variable, at start."""
    import json
    import tomllib

    where = f"FLUX_MCP_PRICES ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}.") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON (name it .toml for TOML)"
        raise ConfigError(f"{where} is not valid {kind}: {exc}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must map provider ids to tables of model id -> USD per image.")
    prices: dict[str, dict[str, float]] = {}
    for provider, models in data.items():
        if provider not in registry.BY_ID:
            raise ConfigError(f"{where}: {provider!r} is not a provider; use one of {', '.join(registry.ids())}.")
        if not isinstance(models, dict):
            raise ConfigError(f"{where}: {provider} must be a table of model id -> USD per image.")
        for model, usd in models.items():
            if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd <= 1000:
                raise ConfigError(f"{where}: {provider} {model} must be a price in USD per image, 0 to 1000 "
                                  f"(got {usd!r}).")
        prices[provider] = {str(m): float(u) for m, u in models.items()}
    return prices


def _dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}
