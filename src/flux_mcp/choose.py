"""Which provider runs a job: the one asked for, the next ones when a provider refuses, or the best one.

A call names a provider (or the server's default), or `provider: "auto"` (also `FLUX_MCP_PROVIDER=auto`).
With `FLUX_MCP_FALLBACK=segmind,atlascloud,...` (or with "auto"), a call whose provider *provably did
not create the job* moves on to the next configured provider that serves the same canonical FLUX model
(`providers.catalog`) at the requested size. "Provably" is the provider contract's: the submit raised a
`ProviderError` (refused outright — bad key, no credit, rate limit, a validation refusal — or never sent,
a connection refused). A `SubmitOutcomeUnknown` (a timeout, a reset after sending, an ambiguous 5xx)
stops the chain: that job may exist, and paying again is what this module exists to prevent.

"auto" orders the capable providers (edit, local input images, size, the canonical model) by recent
health (a provider that refused a call in the last minutes for its key, credit or rate, or could not be
reached, goes last, the more refusals the later), then
by documented price, then by typical duration (from the journal, else the documentation), and says why in
one line. Health is the journal's: every attempt that created nothing is a row there (`Journal.add_attempt`),
so a refusal counts after a restart and on every server sharing the journal. The rows are read at most
every HEALTH_CACHE seconds; this process's own refusals count at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import (
    AuthFailed,
    FluxError,
    InsufficientCredits,
    InvalidInput,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from .journal import HEALTH_KINDS, Attempt, AttemptKind, Journal, Refusals
from .providers import Provider
from .request import JobRequest

AUTO = "auto"
REFUSAL_MEMORY = 600.0
"""Seconds a provider's refusal counts against it when "auto" orders the providers."""
HEALTH_CACHE = 2.0
"""Seconds the journal's recent refusals are reused before they are read again."""
_AUTO_EDIT_MODELS = ("flux-kontext-pro", "flux-kontext-dev", "flux-dev", "flux-schnell")
"""For an automatic edit with no model named: the canonical models to look for, best first."""
_AUTO_GENERATE_MODELS = ("flux-schnell", "flux-dev")


@dataclass
class Plan:
    """The providers to try, in order, each with the model id to ask it for."""

    steps: list[tuple[Provider, str]]
    canonical: str | None = None
    reason: str | None = None
    """Why this order, in one line (None: the call simply named its provider)."""
    skipped: list[str] = field(default_factory=list)
    """Configured providers left out, and why."""


class Chooser:
    """Plans the provider chain of each call; journals the attempts that created nothing (for "auto")."""

    def __init__(self, providers: Mapping[str, Provider], journal: Journal, fallback: tuple[str, ...]):
        self.providers = providers
        self.journal = journal
        self.fallback = fallback
        self._health: tuple[float, dict[str, Refusals]] | None = None
        """The journal's recent refusals per provider, and when they were read (monotonic): a cache."""

    async def refused(self, attempt: Attempt) -> None:
        """Journals an attempt that created nothing; a refusal counts against its provider at once here."""
        await self.journal.add_attempt(attempt)
        if attempt.kind in HEALTH_KINDS and self._health is not None:
            seen = self._health[1].get(attempt.provider)
            self._health[1][attempt.provider] = Refusals((seen.count if seen else 0) + 1, attempt.at, attempt.kind,
                                                         attempt.reason)

    async def recent_refusals(self) -> dict[str, Refusals]:
        """Each provider's refusals of the last REFUSAL_MEMORY seconds, from the journal (read at most every
        HEALTH_CACHE seconds)."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] >= HEALTH_CACHE:
            self._health = (now, await self.journal.refusals_since(time.time() - REFUSAL_MEMORY))
        cutoff = time.time() - REFUSAL_MEMORY
        return {pid: r for pid, r in self._health[1].items() if r.last_at >= cutoff}

    async def plan(self, req: JobRequest, first: Provider | None) -> Plan:
        """`first` is the provider the call named (or the default), already checked; None means "auto"."""
        if first is None:
            return await self._auto(req)
        model = req.model or (first.default_edit_model if req.kind == "edit" else first.default_model) or ""
        info = first.resolve(model, req.kind)
        canonical = info.canonical if info is not None else None
        steps: list[tuple[Provider, str]] = [(first, model)]
        if not self.fallback or canonical is None:
            return Plan(steps, canonical)
        for pid in self.fallback:
            provider = self.providers.get(pid)
            if provider is None or provider is first or not provider.configured:
                continue
            own = provider.model_for(canonical, req.kind)
            if own is not None and own.takes_size(req.width, req.height) and self._can(provider, req):
                steps.append((provider, own.id))
        return Plan(steps, canonical)

    def _can(self, provider: Provider, req: JobRequest) -> bool:
        if req.kind != "edit":
            return True
        if not provider.can_edit:
            return False
        local = not (req.image or "").strip().startswith(("http://", "https://"))
        return not local or provider.can_upload or provider.accepts_data_uri

    async def _auto(self, req: JobRequest) -> Plan:
        configured = [p for p in self.providers.values() if p.configured and p.key_env is not None]
        if not configured:
            placeholder = self.providers["placeholder"]
            model = placeholder.default_edit_model if req.kind == "edit" else placeholder.default_model
            return Plan([(placeholder, model or "")], None, "auto: no provider has a key; the offline placeholder")
        names = [req.model] if req.model else list(_AUTO_EDIT_MODELS if req.kind == "edit" else _AUTO_GENERATE_MODELS)
        health = await self.recent_refusals()
        for canonical in names:
            ranked, skipped = await self._rank(configured, canonical, req, health)
            if ranked:
                best, model, why = ranked[0]
                others = "; ".join(skipped)
                last = [f"{p.id} last (refused recently: {_refusal_text(health[p.id])})" for p, _, _ in ranked[1:]
                        if p.id in health]
                reason = (f"auto: {best.id} ({model}) {why}" + (f"; not {others}" if others else "")
                          + "".join(f"; {x}" for x in last))
                return Plan([(p, m) for p, m, _ in ranked], canonical, reason, skipped)
        raise InvalidInput(
            f"No configured provider ({', '.join(p.id for p in configured)}) can run this "
            f"{req.kind} job{f' with model {req.model!r}' if req.model else ''} at {req.width}x{req.height}. "
            "Name a provider and model (see the flux://providers resource), or change the size.")

    async def _rank(self, providers: list[Provider], canonical: str, req: JobRequest,
                    health: Mapping[str, Refusals]) -> tuple[list[tuple[Provider, str, str]], list[str]]:
        scored: list[tuple[tuple[int, int, float, float], Provider, str, str]] = []
        skipped: list[str] = []
        for provider in providers:
            info = provider.model_for(canonical, req.kind)
            if info is None:
                continue
            if not self._can(provider, req):
                skipped.append(f"{provider.id} (cannot take this input image)")
                continue
            if not info.takes_size(req.width, req.height):
                skipped.append(f"{provider.id} (no {req.width}x{req.height})")
                continue
            refusal = health.get(provider.id)
            price = info.price_usd * req.num_images if info.price_usd is not None else None
            typical = await self.journal.typical_duration(provider.id, info.id) or provider.typical_seconds(info.id)
            why = (f"serves {canonical}"
                   + (f", ${price:.3f} documented" if price is not None else ", unpriced")
                   + (f", ~{typical:.0f} s" if typical else "")
                   + (f", but refused recently ({_refusal_text(refusal)})" if refusal else ""))
            key = (1 if refusal else 0, refusal.count if refusal else 0, price if price is not None else float("inf"),
                   typical or float("inf"))
            scored.append((key, provider, info.id, why))
        scored.sort(key=lambda s: s[0])
        return [(p, m, w) for _, p, m, w in scored], skipped


def short(exc: FluxError | str) -> str:
    """A refusal in a few words, for the chain's one-line summary."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def attempt_kind(exc: FluxError) -> AttemptKind:
    """What kind of attempt a failover step that created nothing was, from its error."""
    if isinstance(exc, AuthFailed):
        return "bad_key"
    if isinstance(exc, InsufficientCredits):
        return "no_credit"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, ProviderUnavailable):
        return "unreachable"
    if isinstance(exc, ProviderError):
        return "refused"
    return "unsuitable"


def _refusal_text(refusal: Refusals) -> str:
    return refusal.last_kind.replace("_", " ") + ("" if refusal.count == 1 else f", {refusal.count} times")
