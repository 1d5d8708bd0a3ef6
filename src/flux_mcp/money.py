"""Money: what a job will cost, the checks made before paying for it, and the ledger the budgets read.

* **Prices** are USD per image, by provider and model: the documented price of each model
  (`ModelInfo.price_usd`), replaced by the user's FLUX_MCP_PRICES file (negotiated rates). When a
  provider reports what a job cost, that figure replaces the estimate in the record and the ledger
  (`cost_estimated` false). A model with no figure anywhere is *unpriced*.
* **Before paying** (`Money.before_paying`), in this order, each refusal spending nothing:
  `max_cost_usd` -> the budgets (a reading, so that nobody is asked to confirm a call that would be
  refused) -> the user's confirmation above FLUX_MCP_CONFIRM_ABOVE_USD -> the reservation.
  `Money.plan` makes the same checks for a dry run, without asking or reserving.
* **Budgets.** FLUX_MCP_BUDGET_DAY_USD, FLUX_MCP_BUDGET_MONTH_USD and FLUX_MCP_MAX_IMAGES_PER_DAY
  hold each principal (the local user; over HTTP, each authenticated identity) to its charges since
  the start of the current UTC day or UTC calendar month, and the server as a whole (every
  principal's charges together) to the same limits, counted across every process that shares the
  journal. FLUX_MCP_USER_BUDGET_DAY_USD / _MONTH_USD set a lower limit for each principal (a team's
  server: $50 a day in all, $10 for each person); unset, each principal's limit is the server's. A call reserves its estimate atomically with both checks (`Journal.reserve`; on a
  shared journal in the transaction of the job's intent, see `Reservation`), so
  parallel calls, of one principal or of several, cannot both spend the last dollar. The reservation is released when the provider
  provably created no job, kept when the job may have started (`SubmitOutcomeUnknown`: it counts
  until proven otherwise, and nothing can prove it), and becomes the job's cost when the job ends.
  An unpriced job adds no dollars but its images count: FLUX_MCP_MAX_IMAGES_PER_DAY holds
  unpriced providers. The offline placeholder is free and stays out of the ledger.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import SpendRefused
from .journal import EVERYONE, Charge, Journal, LedgerUnavailable, Totals
from .models import DryRun, PredictionResult
from .shared import LOCAL

if TYPE_CHECKING:
    from .config import Settings
    from .journal import Record
    from .providers.base import Provider
    from .request import JobRequest

log = logging.getLogger("flux_mcp.money")

EPSILON = 1e-9
"""Sums of float prices are compared with this slack: three $0.003 jobs exactly fill a $0.009 budget."""

Answer = Literal["accept", "decline", "cancel", "timeout", "unsupported"]
"""How a confirmation ended: accepted, declined, dismissed, unanswered in time, or the client cannot ask."""


def usd(amount: float) -> str:
    """`$0.009`, `$0.01`, `$1.50`: dollars with the digits that matter (cents at least, at most 4 places)."""
    text = f"{amount:.4f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


@dataclass(frozen=True)
class Estimate:
    """What a call would cost, before anything is sent."""

    provider: str
    label: str
    model: str
    images: int
    per_image_usd: float | None
    source: str
    """`documented price`, `FLUX_MCP_PRICES`, or `unpriced`."""
    billed: bool = True
    """False for the offline placeholder: nothing is paid, nothing enters the ledger."""
    find_cheapest: Callable[[], tuple[str, float] | None] | None = field(default=None, compare=False, repr=False)
    """Finds `cheapest` when a refusal names it (looking through every model's price is for that moment only)."""

    @property
    def cheapest(self) -> tuple[str, float] | None:
        """The provider's cheapest priced model for the same kind of job, and its price per image."""
        return self.find_cheapest() if self.find_cheapest is not None else None

    @property
    def usd(self) -> float | None:
        return None if self.per_image_usd is None else self.per_image_usd * self.images

    @property
    def what(self) -> str:
        return f"{self.images} image{'s' if self.images != 1 else ''} with {self.label} ({self.model})"

    def describe(self) -> str:
        """`$0.006 (2 images x $0.003, documented price)`, or why the cost is unknown."""
        if not self.billed:
            return "free (drawn offline)"
        if self.usd is None:
            return f"unknown ({self.provider} states no price for {self.model}; FLUX_MCP_PRICES can set one)"
        each = f"{self.images} images x {usd(self.per_image_usd or 0)}, " if self.images != 1 else ""
        return f"{usd(self.usd)} ({each}{self.source})"


class PriceBook:
    """USD per image: FLUX_MCP_PRICES (a model's own entry, else the provider's `*`), else the documented price."""

    def __init__(self, overrides: Mapping[str, Mapping[str, float]]):
        self.overrides = overrides

    def per_image(self, provider: Provider, model: str) -> tuple[float | None, str]:
        own = self.overrides.get(provider.id, {})
        for key in (model, "*"):
            if key in own:
                return own[key], "FLUX_MCP_PRICES"
        listed = provider.listed_price(model)
        if listed is not None:
            return listed, "provider's price list"
        info = provider.model_info(model)
        if info is not None and info.price_usd is not None:
            return info.price_usd, "documented price"
        return None, "unpriced"

    def estimate(self, provider: Provider, req: JobRequest) -> Estimate:
        model = req.model or ""
        price, source = self.per_image(provider, model)
        kind = req.kind

        def cheapest() -> tuple[str, float] | None:
            priced = [(m.id, p) for m in provider.models if kind in m.kinds
                      for p in [self.per_image(provider, m.id)[0]] if p is not None]
            return min(priced, key=lambda mp: mp[1]) if priced else None

        return Estimate(provider.id, provider.label, model, req.num_images, price, source,
                        billed=provider.key_env is not None, find_cheapest=cheapest)


@dataclass(frozen=True)
class Limits:
    """The budgets and the confirmation threshold, from the settings."""

    day_usd: float | None = None
    month_usd: float | None = None
    images_per_day: int | None = None
    confirm_above_usd: float | None = None
    user_day_usd: float | None = None
    """Each principal's own limits where lower than the server's (None: the server's)."""
    user_month_usd: float | None = None

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.budget_day_usd, settings.budget_month_usd, settings.max_images_per_day,
                   settings.confirm_above_usd, settings.user_budget_day_usd, settings.user_budget_month_usd)

    @property
    def budgeted(self) -> bool:
        return any(v is not None for v in (self.day_usd, self.month_usd, self.images_per_day, self.user_day_usd,
                                           self.user_month_usd))

    def of_user(self) -> tuple[float | None, float | None]:
        """A principal's day and month limits: its own where set (never above the server's), else the server's."""
        def lower(own: float | None, server: float | None) -> float | None:
            return server if own is None else own if server is None else min(own, server)
        return lower(self.user_day_usd, self.day_usd), lower(self.user_month_usd, self.month_usd)


@dataclass(frozen=True)
class Question:
    """What the user is asked before a call above FLUX_MCP_CONFIRM_ABOVE_USD is paid for."""

    message: str
    estimate: Estimate
    timeout: float
    """Seconds the question may go unanswered; then nothing is spent."""

    @property
    def digest(self) -> str:
        """Identifies the question: an answer counts only for the question it answered."""
        return hashlib.sha256(self.message.encode()).hexdigest()[:24]


Ask = Callable[[Question], Awaitable[Answer]]
"""Asks the user (through the client) and says how it ended."""


@dataclass(frozen=True)
class Reservation:
    """A charge a shared journal writes in the transaction of the job's intent (one commit for both), with the
    budgets' check made there under the ledger's lock."""

    charge: Charge
    since: Mapping[str, float]
    check: Callable[[Mapping[str, Totals]], str | None] | None
    """None: no limit to keep (the charge is simply recorded); else the refusal, if any, given the totals."""


@dataclass(frozen=True)
class Bill:
    """A charge becoming `billed` in the write that journals the job's id (one commit for both)."""

    charge_id: str
    prediction_id: str
    usd: float | None
    """The provider's own figure for a job that had already ended (None: the estimate stays)."""
    charge: Charge | None = None
    """The charge itself when it was never written (no limit to keep on SQLite: see `Money._reserve`): that
    write inserts it, billed."""


@dataclass
class Hold:
    """A call's place in the ledger, from before its submit until its job ends."""

    money: Money
    estimate: Estimate
    charge: Charge | None = None
    """None: nothing is kept (a free provider, or the ledger cannot be written and no budget is set)."""
    notes: list[str] = field(default_factory=list)
    """Said with the result (e.g. that an unpriced job's dollars are not counted)."""
    deferred: Reservation | None = None
    """The reservation not written yet: a shared journal writes it with the job's intent (then `written`)."""

    def written(self, landed: bool) -> None:
        """The intent's write ended: with the charge (`landed`), or with neither (the key's job exists)."""
        if self.deferred is not None:
            self.deferred = None
            if not landed:
                self.charge = None

    def bill(self, prediction_id: str, ended: Record | None = None) -> Bill | None:
        """`billed` as part of the write of the job's id (a shared journal's `submitted`): marks the charge and
        returns what that write adds; None when there is no charge (then `billed` does what is left)."""
        charge = self.charge
        if charge is None:
            return None
        unwritten, self.deferred = self.deferred is not None, None
        charge.state, charge.prediction_id = "billed", prediction_id
        usd = ended.cost_usd if ended is not None and not ended.cost_estimated else None
        if unwritten and usd is not None:
            charge.usd, charge.estimated = usd, False
        return Bill(charge.id, prediction_id, usd, charge if unwritten else None)

    async def billed(self, prediction_id: str, ended: Record | None = None) -> None:
        """The provider created the job: the reservation is its charge until it ends. `ended`: the job had
        already ended in the submit's answer; its cost is written with the same write."""
        await self.money.mark(self, "billed", prediction_id, ended)

    async def unknown(self) -> None:
        """The submit may have created a job: the reservation keeps counting."""
        await self.money.mark(self, "unknown", None)

    async def release(self) -> None:
        """No job was created (the submit was refused or never sent): the reservation goes, unless the
        job was created or may have been."""
        charge = self.charge
        if charge is None or charge.state != "reserved":
            return
        self.charge = None
        if self.deferred is not None:  # never written: nothing to take back
            self.deferred = None
            return
        try:
            await self.money.journal.release_charge(charge.id)
        except LedgerUnavailable as exc:
            log.warning("reservation %s not released (it keeps counting): %s", charge.id, exc)


@dataclass
class Planned:
    """A dry run's answer: the checked plan and its estimate; nothing was submitted."""

    estimate: Estimate
    dry_run: DryRun
    message: str

    def result(self) -> PredictionResult:
        est = self.estimate
        return PredictionResult(prediction_id=None, provider=est.provider, model=est.model, status=None,
                                message=self.message, placeholder=not est.billed, cost_usd=est.usd,
                                cost_estimated=est.usd is not None, dry_run=self.dry_run)


def day_start(now: float) -> float:
    """00:00 UTC of the day `now` falls in (Unix time counts every UTC day as 86,400 seconds)."""
    return float(math.floor(now / 86400) * 86400)


def month_start(now: float) -> float:
    """00:00 UTC on the first of the calendar month `now` falls in."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


class Money:
    """Prices, the pre-payment checks and the ledger of one server (or one `flux-mcp spend`)."""

    def __init__(self, settings: Settings, journal: Journal, *, clock: Callable[[], float] = time.time):
        self.prices = PriceBook(settings.prices)
        self.limits = Limits.of(settings)
        self.journal = journal
        self.clock = clock
        self.confirm_seconds = settings.confirm_seconds
        self._month: tuple[float, float] | None = None
        """(the day, the start of its month) last asked about."""

    def estimate(self, provider: Provider, req: JobRequest) -> Estimate:
        return self.prices.estimate(provider, req)

    def decides(self) -> bool:
        """Whether the server's estimates decide anything (a budget, a confirmation threshold): only then is
        the provider's own price list worth a (free) request. A call's own `max_cost_usd` or `dry_run` uses
        the prices known, and so refuses before any request."""
        return self.limits.budgeted or self.limits.confirm_above_usd is not None

    def windows(self, now: float) -> dict[str, float]:
        day = day_start(now)
        if self._month is None or self._month[0] != day:  # the calendar is consulted once a day
            self._month = (day, month_start(now))
        return {"day": day, "month": self._month[1]}

    # --- before paying ------------------------------------------------------------------------

    async def before_paying(self, est: Estimate, req: JobRequest, principal: str, ask: Ask | None) -> Hold:
        """Every check, then the reservation. Raises SpendRefused (nothing spent) when a check refuses."""
        refusal = self._max_cost(est, req) or await self._over_budget(est, principal)
        if refusal:
            raise SpendRefused(refusal)
        if self.asks(est):
            answer: Answer = await ask(self.question(est, req)) if ask is not None else "unsupported"
            if answer != "accept":
                raise SpendRefused(self._unconfirmed(answer, est))
        return await self._reserve(est, principal)

    async def plan(self, est: Estimate, req: JobRequest, save_to: list[str], principal: str) -> Planned:
        """A dry run: the same checks as `before_paying`, without asking anyone or reserving anything."""
        refusal = self._max_cost(est, req) or await self._over_budget(est, principal)
        confirm = self.asks(est)
        size = f"{req.width}x{req.height}"
        text = (f"Dry run, nothing was submitted. The call would make {est.what}, {size}, estimated "
                f"{est.describe()}.")
        if refusal:
            text += f" It would be refused now. {refusal.replace(' Nothing was submitted.', '')}"
        elif confirm:
            text += (f" It would first ask the user to confirm the cost (above FLUX_MCP_CONFIRM_ABOVE_USD="
                     f"{usd(self.limits.confirm_above_usd or 0)}). Call again without dry_run to run it.")
        else:
            text += " Call again without dry_run to run it."
        plan = DryRun(width=req.width, height=req.height, num_images=est.images, save_to=save_to,
                      allowed=refusal is None, confirm=confirm and refusal is None)
        return Planned(est, plan, text)

    def asks(self, est: Estimate) -> bool:
        """Whether the user must confirm this call: above FLUX_MCP_CONFIRM_ABOVE_USD, or of unknown cost."""
        limit = self.limits.confirm_above_usd
        return limit is not None and est.billed and (est.usd is None or est.usd > limit + EPSILON)

    def question(self, est: Estimate, req: JobRequest) -> Question:
        prompt = req.prompt if len(req.prompt) <= 120 else req.prompt[:117] + "..."
        cost = f"about {usd(est.usd)}" if est.usd is not None else "an unknown amount (no price is known)"
        verb = "Edit an image" if req.kind == "edit" else f"Generate {est.images} image{'s' * (est.images != 1)}"
        message = (f"{verb} with {est.label} ({est.model}) for {cost}? Prompt: \"{prompt}\". Calls above "
                   f"{usd(self.limits.confirm_above_usd or 0)} need your confirmation (FLUX_MCP_CONFIRM_ABOVE_USD).")
        return Question(message, est, self.confirm_seconds)

    def _max_cost(self, est: Estimate, req: JobRequest) -> str | None:
        most = req.max_cost_usd
        if most is None or not est.billed:
            return None
        if est.usd is None:
            return (f"max_cost_usd={most:g} was given, but {est.label} states no price for {est.model}, so the "
                    "cost cannot be bounded. Nothing was submitted. Choose a priced model (the flux://providers "
                    "resource lists prices) or leave out max_cost_usd.")
        if est.usd <= most + EPSILON:
            return None
        fewer = ["ask for fewer images"] if est.images > 1 else []
        ways = fewer + self._cheaper(est, most) + ["raise max_cost_usd"]
        return (f"This call is estimated at {est.describe()} for {est.what}, above max_cost_usd={most:g}. Nothing "
                f"was submitted. To go on, {', '.join(ways[:-1])}{' or ' if len(ways) > 1 else ''}{ways[-1]}.")

    @staticmethod
    def _cheaper(est: Estimate, most: float) -> list[str]:
        if est.cheapest is None:
            return []
        model, price = est.cheapest
        if model == est.model or price * est.images > most + EPSILON:
            return []
        return [f"choose a cheaper model (e.g. {model} at {usd(price)} per image)"]

    async def _over_budget(self, est: Estimate, principal: str) -> str | None:
        if not est.billed or not self.limits.budgeted:
            return None
        windows = self.windows(self.clock())
        try:
            totals = await self.journal.totals(principal, windows)
            everyone = await self.journal.totals(None, windows)
        except LedgerUnavailable as exc:
            return self._no_ledger(exc)
        return self._refusal({**totals, **{EVERYONE + k: v for k, v in everyone.items()}}, est, principal)

    def _refusal(self, totals: Mapping[str, Totals], est: Estimate, principal: str) -> str | None:
        """Why `est` does not fit the budgets given what was charged so far (None: it fits): the principal's
        own totals first, then the server's (every principal's, under EVERYONE-prefixed names, when given)."""
        who = "" if principal == LOCAL else f" for {principal}"
        limits = self.limits
        day, month = limits.of_user()
        variables = ("FLUX_MCP_USER_BUDGET_DAY_USD" if day != limits.day_usd else "FLUX_MCP_BUDGET_DAY_USD",
                     "FLUX_MCP_USER_BUDGET_MONTH_USD" if month != limits.month_usd else "FLUX_MCP_BUDGET_MONTH_USD")
        mine = self._refusal_of(totals, est, who, "", (day, month), variables)
        if mine is not None or f"{EVERYONE}day" not in totals:
            return mine
        return self._refusal_of({k[len(EVERYONE):]: v for k, v in totals.items() if k.startswith(EVERYONE)}, est,
                                " on this server by all its users together", " (every user's calls count)",
                                (limits.day_usd, limits.month_usd),
                                ("FLUX_MCP_BUDGET_DAY_USD", "FLUX_MCP_BUDGET_MONTH_USD"))

    def _refusal_of(self, totals: Mapping[str, Totals], est: Estimate, who: str, counted: str,
                    usd_limits: tuple[float | None, float | None], variables: tuple[str, str]) -> str | None:
        limits = self.limits
        for window, limit, variable, spent_when, resets in (
                ("day", usd_limits[0], variables[0], "today (UTC)", "at 00:00 UTC"),
                ("month", usd_limits[1], variables[1], "this calendar month (UTC)",
                 "on the 1st at 00:00 UTC")):
            spent = totals[window].usd
            if limit is None or est.usd is None or spent + est.usd <= limit + EPSILON:
                continue
            return (f"Spent {spent_when}{who}: {usd(spent)} of the {variable} limit of {usd(limit)}{counted}; this "
                    f"call's estimate of {usd(est.usd)} ({est.what}) would go over it. Nothing was submitted. The limit "
                    f"resets {resets}; to allow more now, the user can raise {variable} in the server's "
                    "environment and restart it.")
        cap = limits.images_per_day
        made = totals["day"].images
        if cap is not None and made + est.images > cap:
            return (f"Images made today (UTC){who}: {made} of the FLUX_MCP_MAX_IMAGES_PER_DAY limit of {cap}"
                    f"{counted}; this call asks for {est.images} more ({est.what}). Nothing was submitted. The limit resets at "
                    "00:00 UTC; to allow more now, the user can raise FLUX_MCP_MAX_IMAGES_PER_DAY in the server's "
                    "environment and restart it.")
        return None

    def _no_ledger(self, exc: LedgerUnavailable) -> str:
        return (f"{exc} The budgets (FLUX_MCP_BUDGET_DAY_USD, FLUX_MCP_BUDGET_MONTH_USD, "
                "FLUX_MCP_MAX_IMAGES_PER_DAY) cannot be kept without it, so nothing was submitted. Try again "
                "shortly; if it persists, the data folder (FLUX_MCP_HOME) needs attention.")

    def _unconfirmed(self, answer: Answer, est: Estimate) -> str:
        cost = usd(est.usd) if est.usd is not None else "an unknown cost"
        if answer == "decline":
            return (f"The user declined to pay {cost} for {est.what}. Nothing was submitted; do not call again "
                    "unless the user asks for it.")
        if answer == "cancel":
            return (f"The user dismissed the confirmation of {cost} for {est.what}. Nothing was submitted; call "
                    "again only if the user asks for it.")
        if answer == "timeout":
            minutes = self.confirm_seconds / 60
            return (f"The confirmation of {cost} for {est.what} went unanswered for {minutes:g} minute"
                    f"{'s' * (minutes != 1)}. Nothing was submitted; call again when the user can confirm.")
        limit = self.limits.confirm_above_usd or 0
        if est.usd is None:
            allow = (f"set a price for {est.provider} {est.model} in a FLUX_MCP_PRICES file at or below "
                     f"{usd(limit)} (or remove FLUX_MCP_CONFIRM_ABOVE_USD)")
        else:
            allow = f"set FLUX_MCP_CONFIRM_ABOVE_USD to {_at_least(est.usd)} or more (or remove it)"
        return (f"This call costs {cost} ({est.what}), above FLUX_MCP_CONFIRM_ABOVE_USD={usd(limit)}, and this "
                "client cannot ask the user to confirm it (it offers no form elicitation). Nothing was submitted. "
                f"To allow such calls without asking, the user can {allow} in the server's environment and "
                "restart it.")

    # --- the ledger -----------------------------------------------------------------------------

    async def _reserve(self, est: Estimate, principal: str) -> Hold:
        hold = Hold(self, est)
        if not est.billed:
            return hold
        if est.usd is None and any(limit is not None for limit in self.limits.of_user()):
            hold.notes.append(f"{est.label} states no price for {est.model}: this job's dollars are not counted "
                              "in the budgets (its images are, for FLUX_MCP_MAX_IMAGES_PER_DAY).")
        now = self.clock()
        charge = Charge(id=uuid.uuid4().hex, principal=principal, provider=est.provider, model=est.model,
                        images=est.images, usd=est.usd, created_at=now, updated_at=now)
        # No limit: the charge is simply recorded (no sums to take, nothing to hold the others back).
        check = (lambda totals: self._refusal(totals, est, principal)) if self.limits.budgeted else None
        if getattr(self.journal, "reserves_with_intent", False):
            # A shared journal writes the reservation (and makes its check, under the ledger's lock) in the
            # transaction of the job's intent, before the paid request: one commit instead of two.
            hold.charge, hold.deferred = charge, Reservation(charge, self.windows(now), check)
            return hold
        if check is None and getattr(self.journal, "bills_with_record", False):
            # No limit to keep, so nothing to hold other calls back before the submit: the charge is written
            # with the job's id, billed (one commit instead of two), or as `unknown` when the submit's outcome
            # is. A process killed mid-submit leaves no charge then — nor a record of the job: the same gap.
            hold.charge, hold.deferred = charge, Reservation(charge, self.windows(now), None)
            return hold
        try:
            refusal = await self.journal.reserve(charge, self.windows(now), check)
        except LedgerUnavailable as exc:
            if self.limits.budgeted:
                raise SpendRefused(self._no_ledger(exc)) from None
            log.warning("spend not recorded (no budget is set, so the call goes ahead): %s", exc)
            return hold
        if refusal is not None:
            raise SpendRefused(refusal)
        hold.charge = charge
        return hold

    async def mark(self, hold: Hold, state: Literal["billed", "unknown"], prediction_id: str | None,
                   ended: Record | None = None) -> None:
        """Records what became of a held job: created (with its id, and its cost when `ended` already carries
        the provider's own figure), or perhaps created."""
        charge = hold.charge
        if charge is None:
            if ended is not None:
                await self.settle(ended)
            return
        charge.state, charge.prediction_id = state, prediction_id or charge.prediction_id
        usd = ended.cost_usd if ended is not None and not ended.cost_estimated else None
        try:
            if hold.deferred is not None:  # never written (see `_reserve`): written now, in its state
                hold.deferred = None
                if usd is not None:
                    charge.usd, charge.estimated = usd, False
                await self.journal.reserve(charge, {}, None)
                return
            await self.journal.update_charge(charge.id, state, prediction_id, usd=usd)
        except LedgerUnavailable as exc:  # the reservation keeps counting at its estimate: the safe side
            log.warning("charge %s not marked %s: %s", charge.id, state, exc)

    async def settle(self, record: Record) -> None:
        """A job ended with the provider's own figure for its cost: its charge becomes that figure."""
        if record.cost_estimated or record.cost_usd is None:
            return  # the ledger already holds the estimate
        try:
            await self.journal.settle_charge(record.id, record.cost_usd, estimated=False)
        except LedgerUnavailable as exc:
            log.warning("the cost of %s was not written to the ledger (its estimate stays): %s", record.id, exc)

    # --- reports ------------------------------------------------------------------------------

    async def report(self) -> dict[str, Any]:
        """Today's and this month's charges per principal and provider, against the limits (`flux-mcp spend`)."""
        now = self.clock()
        windows = self.windows(now)
        charges = await self.journal.charges_since(windows["month"])
        people: dict[str, dict[str, Any]] = {}
        server = {"today": _sums(), "month": _sums()}
        for c in charges:
            person = people.setdefault(c.principal, {"principal": c.principal, "today": _sums(), "month": _sums(),
                                                     "providers": {}})
            provider = person["providers"].setdefault(c.provider, {"provider": c.provider, "today": _sums(),
                                                                   "month": _sums()})
            spans = ("today", "month") if c.created_at >= windows["day"] else ("month",)
            for span in spans:
                for bucket in (person[span], provider[span], server[span]):
                    _add(bucket, c)
        for person in people.values():
            person["providers"] = sorted(person["providers"].values(), key=lambda p: p["provider"])
            for bucket in [person["today"], person["month"]] + [p[s] for p in person["providers"]
                                                                  for s in ("today", "month")]:
                bucket["usd"] = round(bucket["usd"], 6)
        for bucket in server.values():
            bucket["usd"] = round(bucket["usd"], 6)
        limits = self.limits
        return {
            "now": _iso(now), "day_start": _iso(windows["day"]), "month_start": _iso(windows["month"]),
            "limits": {"FLUX_MCP_BUDGET_DAY_USD": limits.day_usd, "FLUX_MCP_BUDGET_MONTH_USD": limits.month_usd,
                       "FLUX_MCP_MAX_IMAGES_PER_DAY": limits.images_per_day,
                       "FLUX_MCP_CONFIRM_ABOVE_USD": limits.confirm_above_usd,
                       "FLUX_MCP_USER_BUDGET_DAY_USD": limits.user_day_usd,
                       "FLUX_MCP_USER_BUDGET_MONTH_USD": limits.user_month_usd},
            "principals": sorted(people.values(), key=lambda p: (p["principal"] != LOCAL, p["principal"])),
            "server": server,
        }


def _at_least(amount: float) -> str:
    """`amount` rounded up to a tidy figure (a threshold the user can type)."""
    cents = math.ceil(amount * 100 - EPSILON) / 100
    return f"{cents:.2f}" if cents >= amount - EPSILON else f"{amount:g}"


def _sums() -> dict[str, Any]:
    return {"usd": 0.0, "images": 0, "jobs": 0, "unpriced_jobs": 0, "uncertain_jobs": 0}


def _add(bucket: dict[str, Any], charge: Charge) -> None:
    bucket["usd"] += charge.usd or 0.0
    bucket["images"] += charge.images
    bucket["jobs"] += 1
    bucket["unpriced_jobs"] += charge.usd is None
    bucket["uncertain_jobs"] += charge.state == "unknown"


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_report(report: Mapping[str, Any]) -> str:
    """`flux-mcp spend` as text: per principal, today and this month per provider, against the limits."""
    limits = report["limits"]
    day_limit, month_limit, cap = (limits["FLUX_MCP_BUDGET_DAY_USD"], limits["FLUX_MCP_BUDGET_MONTH_USD"],
                                   limits["FLUX_MCP_MAX_IMAGES_PER_DAY"])
    user_day, user_month = Limits(day_limit, month_limit, user_day_usd=limits.get("FLUX_MCP_USER_BUDGET_DAY_USD"),
                                  user_month_usd=limits.get("FLUX_MCP_USER_BUDGET_MONTH_USD")).of_user()
    lines = [f"Spend today ({report['day_start'][:10]}) and this month ({report['month_start'][:7]}), UTC:"]

    def cell(bucket: Mapping[str, Any], limit: float | None = None, images: int | None = None) -> str:
        text = usd(bucket["usd"]) + (f" of {usd(limit)}" if limit is not None else "")
        count = f"{bucket['images']} image{'s' * (bucket['images'] != 1)}"
        text += f", {count}" + (f" of {images}" if images is not None else "")
        extra = [f"{bucket['unpriced_jobs']} unpriced"] if bucket["unpriced_jobs"] else []
        extra += [f"{bucket['uncertain_jobs']} may have started"] if bucket["uncertain_jobs"] else []
        return text + (f" ({', '.join(extra)})" if extra else "")

    if not report["principals"]:
        lines.append("  nothing spent this month")
    for person in report["principals"]:
        if len(report["principals"]) > 1 or person["principal"] != LOCAL:
            lines.append(f"{person['principal']}:")
        lines.append(f"  {'provider':<16} {'today':<34} this month")
        for row in person["providers"]:
            lines.append(f"  {row['provider']:<16} {cell(row['today']):<34} {cell(row['month'])}")
        lines.append(f"  {'total':<16} {cell(person['today'], user_day, cap):<34} "
                     f"{cell(person['month'], user_month)}")
    if len(report["principals"]) > 1:  # the limits hold the server as a whole too
        server = report["server"]
        lines.append("all users together:")
        lines.append(f"  {'total':<16} {cell(server['today'], day_limit, cap):<34} {cell(server['month'], month_limit)}")
    unset = [name for name, value in limits.items() if value is None and "_USER_" not in name]
    set_ = [f"{name}={value:g}" for name, value in limits.items() if value is not None]
    lines.append("Limits: " + ("; ".join(set_) if set_ else "none") + (f" (not set: {', '.join(unset)})"
                                                                       if unset else ""))
    return "\n".join(lines)
