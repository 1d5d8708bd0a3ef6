"""The provider adapters, loaded on first use.

`registry` declares every provider without importing adapter code (the settings read only that);
`PROVIDER_CLASSES` and the adapter classes are imported from their modules the first time they are
asked for. `PROVIDER_CLASSES` follows `registry.SPECS`: the order used to pick a default provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import registry

if TYPE_CHECKING:
    from ..config import Settings
    from .acedatacloud import AceDataCloud
    from .appypie import AppyPie
    from .atlascloud import AtlasCloud
    from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
    from .imagepipeline import ImagePipeline
    from .placeholder import Placeholder
    from .segmind import Segmind

    PROVIDER_CLASSES: tuple[type[Provider], ...]

_BASE_NAMES = frozenset({"ImageRequest", "JobState", "ModelInfo", "OutputRef", "Provider", "Range", "Submitted"})

__all__ = [
    "PROVIDER_CLASSES",
    "AceDataCloud",
    "AppyPie",
    "AtlasCloud",
    "ImagePipeline",
    "ImageRequest",
    "JobState",
    "ModelInfo",
    "OutputRef",
    "Placeholder",
    "Provider",
    "Range",
    "Segmind",
    "Submitted",
    "overview",
    "registry",
]


def __getattr__(name: str) -> Any:
    if name == "PROVIDER_CLASSES":
        value: Any = tuple(spec.load() for spec in registry.SPECS)
    elif name in _BASE_NAMES:
        from . import base

        value = getattr(base, name)
    else:
        spec = next((s for s in registry.SPECS if s.adapter.partition(":")[2] == name), None)
        if spec is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = spec.load()
    globals()[name] = value
    return value


def overview(settings: Settings) -> dict[str, Any]:
    """What `flux-mcp providers --json` and the flux://providers resource show: the default provider;
    for each provider in registry order, whether it is configured, what to set, its models and
    capabilities; and for each canonical FLUX model, which providers serve it under which own id (the
    configured ones first, each in registry order)."""
    from . import catalog

    rows = [spec.load()(settings.providers[spec.id], None).describe()  # type: ignore[arg-type]  # no HTTP here
            for spec in registry.SPECS]
    configured = [row["id"] for row in rows if row["configured"] and row["id"] != registry.PLACEHOLDER.id]
    models = {
        name: {"label": catalog.CANONICAL[name], "configured": [p for p in served if p in configured],
               "served_by": served}
        for name, served in catalog.table().items()
    }
    return {"default": registry.default_provider(settings), "providers": rows, "canonical_models": models}
