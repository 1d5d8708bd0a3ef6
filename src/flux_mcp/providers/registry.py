"""Every provider this server knows: who it is and what it reads from the environment.

This module imports no adapter code, so the settings can be read (and `flux-mcp --help` answered)
without loading any provider's wire format. Everything a user or a model reads as a list of
providers or of their variables is generated from `SPECS`: the settings, the redactor's secrets,
the tool descriptions' provider ids, the placeholder's "set one of ..." note and
`flux-mcp providers`; tests/test_registry.py holds the README's tables to it.

Adding a provider is one `ProviderSpec` in `SPECS` plus its adapter module, whose class sets
`spec = <its ProviderSpec>` (the adapter's id, label and variables come from there).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .base import Provider


@dataclass(frozen=True)
class Variable:
    """An optional environment variable of one provider, read into `ProviderSettings.extra[name]`."""

    name: str
    env: str
    secret: bool = False
    """Its value is a credential: the redactor keeps it out of every output, log and file."""


@dataclass(frozen=True)
class ProviderSpec:
    """One provider's identity and environment variables. The API key is always secret."""

    id: str
    label: str
    key_env: str | None
    """The API key variable; None for a provider that needs no key (the offline placeholder)."""
    base_url_env: str | None
    default_base_url: str | None
    adapter: str
    """Where the adapter class lives: `module:Class`, the module inside this package."""
    extras: tuple[Variable, ...] = ()

    @property
    def extra_env(self) -> dict[str, str]:
        """Setting name -> environment variable, for every optional variable."""
        return {v.name: v.env for v in self.extras}

    @property
    def secret_extras(self) -> frozenset[str]:
        """The setting names of the optional variables that hold credentials."""
        return frozenset(v.name for v in self.extras if v.secret)

    @property
    def variables(self) -> tuple[str, ...]:
        """Every environment variable this provider reads."""
        return tuple(v for v in (self.key_env, self.base_url_env) if v) + tuple(v.env for v in self.extras)

    def load(self) -> type[Provider]:
        """The adapter class (importing its module on first use): `module:Class` names a module of this
        package, `package.module:Class` any importable module (an adapter kept outside flux-mcp)."""
        module, _, name = self.adapter.partition(":")
        path = module if "." in module else f"{__package__}.{module}"
        cls: type[Provider] = getattr(importlib.import_module(path), name)
        return cls


ATLASCLOUD = ProviderSpec(
    "atlascloud", "Atlas Cloud", "ATLASCLOUD_API_KEY", "ATLASCLOUD_BASE_URL", "https://api.atlascloud.ai",
    "atlascloud:AtlasCloud",
    # `off`: every job is polled; default `auto`: a short job is held open until its image is in the answer.
    (Variable("sync_mode", "ATLASCLOUD_SYNC_MODE"),))
SEGMIND = ProviderSpec(
    "segmind", "Segmind", "SEGMIND_API_KEY", "SEGMIND_BASE_URL", "https://api.segmind.com",
    "segmind:Segmind", (Variable("upload_base_url", "SEGMIND_UPLOAD_BASE_URL"),))
ACEDATACLOUD = ProviderSpec(
    "acedatacloud", "AceDataCloud", "ACEDATACLOUD_API_TOKEN", "ACEDATACLOUD_BASE_URL", "https://api.acedata.cloud",
    "acedatacloud:AceDataCloud", (Variable("platform_token", "ACEDATACLOUD_PLATFORM_TOKEN", secret=True),
                                  Variable("platform_base_url", "ACEDATACLOUD_PLATFORM_BASE_URL")))
IMAGEPIPELINE = ProviderSpec(
    "imagepipeline", "ImagePipeline", "IMAGEPIPELINE_API_KEY", "IMAGEPIPELINE_BASE_URL",
    "https://api.imagepipeline.io", "imagepipeline:ImagePipeline", (Variable("server_id", "IMAGEPIPELINE_SERVER_ID"),))
APPYPIE = ProviderSpec(
    "appypie", "AppyPie", "APPYPIE_SUBSCRIPTION_KEY", "APPYPIE_BASE_URL", "https://gateway.appypie.com",
    "appypie:AppyPie")
PLACEHOLDER = ProviderSpec(
    "placeholder", "Offline placeholder (no key needed)", None, None, None, "placeholder:Placeholder")

SPECS: tuple[ProviderSpec, ...] = (ATLASCLOUD, SEGMIND, ACEDATACLOUD, IMAGEPIPELINE, APPYPIE, PLACEHOLDER)
"""Every provider, the ones with a key first, in the order a default is picked; the placeholder last."""

BY_ID: Mapping[str, ProviderSpec] = {s.id: s for s in SPECS}


def ids() -> tuple[str, ...]:
    """Every provider id, in `SPECS` order."""
    return tuple(s.id for s in SPECS)


def keyed() -> tuple[ProviderSpec, ...]:
    """The providers that need an API key (all but the offline placeholder), in `SPECS` order."""
    return tuple(s for s in SPECS if s.key_env)


def key_variables() -> str:
    """'A, B, C or D': the key variables, any one of which gives real FLUX images."""
    names = [s.key_env for s in keyed() if s.key_env]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class _HasKeys(Protocol):
    @property
    def default_provider(self) -> str | None: ...

    def has_key(self, provider_id: str) -> bool: ...


def default_provider(settings: _HasKeys) -> str:
    """FLUX_MCP_PROVIDER, else the first provider with a key, else the offline placeholder."""
    if settings.default_provider:
        return settings.default_provider
    return next((s.id for s in keyed() if settings.has_key(s.id)), PLACEHOLDER.id)


class Adapters(Mapping[str, "Provider"]):
    """Every provider by id, each adapter made (and its module imported) the first time it is asked for.

    A server configures one or two of the providers; importing all five adapters (their wire models,
    their error rules) at start is most of what flux-mcp adds to the SDK's own start-up, and the
    unconfigured ones are usually never asked for. `configured()` answers from the settings alone.
    Iterating `values()` makes every adapter: kept for the listings and the error messages that name
    every provider's capabilities."""

    def __init__(self, settings: _HasKeys, make: Callable[[ProviderSpec], Provider]):
        self._settings = settings
        self._make = make
        self._made: dict[str, Provider] = {}

    def __getitem__(self, provider_id: str) -> Provider:
        made = self._made.get(provider_id)
        if made is None:
            made = self._made[provider_id] = self._make(BY_ID[provider_id])  # KeyError: no such provider
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(BY_ID)

    def __len__(self) -> int:
        return len(BY_ID)

    def __contains__(self, provider_id: object) -> bool:
        return provider_id in BY_ID

    def configured_ids(self) -> list[str]:
        """The providers that can run a job (a key is set, or none is needed), in `SPECS` order."""
        return [s.id for s in SPECS if s.key_env is None or self._settings.has_key(s.id)]

    def configured(self) -> list[Provider]:
        return [self[pid] for pid in self.configured_ids()]
