"""One name per FLUX model, whichever provider serves it.

Each provider names the same model its own way (`black-forest-labs/flux-dev` on Atlas Cloud,
`flux-dev` on Segmind and AceDataCloud, `flux-1-schnell` on AppyPie). The canonical names below are
the ones users and models may pass as `model` on any provider; each adapter's `ModelInfo.canonical`
says which of its models is which, next to that model's own limits, so this module holds no second
table — it only reads the adapters' (imported on first use, like everything in this package).

`Provider.prepare` turns a canonical name into the provider's own id, so the journal keeps, and the
result reports, the id the provider actually ran. What serves a model, for a failover or an automatic
choice: `serving(canonical, kind, width, height)`, or per provider `Provider.model_for(canonical, kind)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..request import Kind
from . import registry

if TYPE_CHECKING:
    from .base import Provider

CANONICAL: Mapping[str, str] = {
    "flux-schnell": "FLUX.1 [schnell]",
    "flux-dev": "FLUX.1 [dev]",
    "flux-pro": "FLUX.1 [pro]",
    "flux-kontext-dev": "FLUX.1 Kontext [dev]",
    "flux-kontext-pro": "FLUX.1 Kontext [pro]",
    "flux-kontext-max": "FLUX.1 Kontext [max]",
    "flux-2-klein": "FLUX.2 [klein]",
    "flux-2-flex": "FLUX.2 [flex]",
    "flux-2-pro": "FLUX.2 [pro]",
    "flux-2-max": "FLUX.2 [max]",
}
"""Every canonical name, with Black Forest Labs' own name for the model."""

KINDS: tuple[Kind, ...] = ("generate", "edit")


def adapters(among: Iterable[str] | None = None) -> list[type[Provider]]:
    """The adapter classes of `among` (provider ids, in that order; default: every provider in registry order)."""
    ids = registry.ids() if among is None else tuple(among)
    return [registry.BY_ID[pid].load() for pid in ids if pid in registry.BY_ID]


def serving(canonical: str, kind: Kind = "generate", width: int | None = None, height: int | None = None,
            among: Iterable[str] | None = None) -> list[str]:
    """The providers (ids, in the order of `among`, default registry order) with a model that is
    `canonical` for `kind` and, when given, takes `width` x `height`."""
    found = []
    for cls in adapters(among):
        info = cls.model_for(canonical, kind)
        if info is None:
            continue
        if width is not None and height is not None and not info.takes_size(width, height):
            continue
        found.append(cls.id)
    return found


def table(among: Iterable[str] | None = None) -> dict[str, dict[str, dict[str, str]]]:
    """canonical name -> provider id -> kind -> that provider's own model id, for every canonical name
    some provider serves (what `flux-mcp providers` and the flux://providers resource show)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    classes = adapters(among)
    for name in CANONICAL:
        row: dict[str, dict[str, str]] = {}
        for cls in classes:
            kinds: dict[str, str] = {kind: info.id for kind in KINDS
                                     if (info := cls.model_for(name, kind)) is not None}
            if kinds:
                row[cls.id] = kinds
        if row:
            out[name] = row
    return out
