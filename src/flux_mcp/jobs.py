"""The job lifecycle, in one place: submit once -> journal -> wait -> settle (journal) -> keep (journal).

`JobRunner.run` is the whole life of a new job, written as one sequence whose every step is always
taken; `JobRunner.check` resumes a journaled job at the step it reached. The guarantees live here:

* **Paid once.** The submit is sent once (never retried) and shielded from cancellation: once it is
  out, its answer is awaited and journaled even if the call is cancelled meanwhile.
* **The id is never lost.** Right after the submit the id is logged and the record journaled; a
  journal write that cannot land is kept by the journal and retried, and the result says so. Any
  failure after the submit becomes a note on the result, which still carries the id.
* **Nothing finished is dropped.** A final state is journaled before its images are fetched (so a
  crash leaves what is needed to fetch them again); images that came inline are kept even if the
  call is cancelled; a kept image that went missing is fetched again on the next check.
* **No secret leaks.** Provider text is scrubbed where it enters a record (`scrub_record`, before
  every journal write and before the record is returned) and a progress message.

On a shared journal (one that has `replica.Leases`: PostgreSQL) a new job's intent is journaled before
the paid request (with its reservation in the spend ledger, one commit), the provider's answer replaces it
(with the charge billed, one commit; images that came inline are stored meanwhile, and only the write after
that says they are kept), and every write of a pending job belongs to this replica's lease; a call about a job
another replica drives waits for its row instead of polling the provider (`_follow`). On SQLite none of
this runs: no other process takes a job over there, so an intent row would only cost a statement per
call (a crash between submit and answer loses the id from the journal there, as before; the provider's
dashboard has the job), and one process's `_key_lock` in the service keeps one idempotency key to one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from .assets import provenance_fields
from .errors import FluxError, ProviderError, ProviderUnavailable, SubmitOutcomeUnknown, UnsupportedOperation
from .http import HELD_REQUESTS
from .images import pixel_bound
from .journal import Journal, Record
from .keep import Keeper, Kept, SavePlan
from .lifecycle import inflight
from .models import FINAL
from .money import Bill, Hold, Money
from .paths import PathPolicy
from .providers.base import JobState, Provider, Submitted
from .redact import Redactor
from .replica import REREAD, KeyTaken, LeaseLost, Leases
from .request import JobRequest
from .store import ImageStore
from .waiting import Pacer

log = logging.getLogger("flux_mcp.jobs")

ProgressFn = Callable[[float, float | None, str], Coroutine[Any, Any, None]]
Alive = Callable[[], Coroutine[Any, Any, bool]]


async def _always() -> bool:
    return True
PROGRESS_EVERY = 5.0
"""Seconds between progress notifications while waiting (they keep client timeouts alive)."""
INLINE_LONGEST = 10.0
"""Submits are held open (sync mode) only for models whose jobs typically end within this many seconds."""
INLINE_MIN_WAIT = 15.0
"""...and only when the call may wait at least this long (a short wait wants the id back at once)."""
DRIVE_SECONDS = 3600.0
"""The longest a replica's reconciler drives a job it took over before letting its lease go."""


@dataclass
class Outcome:
    """A prediction as the tools present it."""

    record: Record
    notes: list[str] = field(default_factory=list)
    waited: float = 0.0
    seen_at: float | None = None
    """When the status request that found the job final was sent."""
    timed: bool = True
    """Whether `seen_at` measures the job's duration (`Record.timed`): the checks bracketed its end, or looked
    early on purpose."""
    kept: dict[str, bytes] = field(default_factory=dict)
    """The bytes just written at each image's path (previews are made from them, not read back)."""
    joined: bool = False
    """The call joined an earlier identical call's job instead of paying for a new one."""
    source_image: bytes | None = None
    """An edit's input image, when the service has its bytes (the preview shows before and after)."""
    unsaved: bool | None = None
    """A held job's success a status request found, not journaled yet (shared journal): it is written with its kept
    images (True: with its charge settled to the provider's cost). None: nothing waits to be written."""


def scrub_record(record: Record, redactor: Redactor) -> Record:
    """Scrubs every field that holds provider text (the boundary where it enters state)."""
    scrub = redactor.scrub
    record.error = scrub(record.error) if record.error else record.error
    record.outputs = [scrub(u) if u else u for u in record.outputs]
    record.images = [i.model_copy(update={"url": scrub(i.url)}) if i.url else i for i in record.images]
    note = record.request.get("provider_note")
    if isinstance(note, str):
        record.request["provider_note"] = scrub(note)
    return record


class JobRunner:
    """Runs jobs against providers, recording every step in the journal and keeping every image."""

    def __init__(self, journal: Journal, store: ImageStore, keeper: Keeper, redactor: Redactor, *,
                 money: Money | None = None):
        self.journal = journal
        self.money = money
        """Where a job's charge learns its cost when the job ends (None: no ledger)."""
        self.store = store
        self.keeper = keeper
        self.redactor = redactor
        self._held = 0
        """Submits held open right now (sync mode)."""
        self.in_flight: dict[str, Alive] = {}
        """Jobs whose call is still running here, with a check of whether its caller is still there: a call
        whose caller is there is not abandoned, so not for an identical call to join."""
        self.leases: Leases | None = journal if isinstance(journal, Leases) else None
        """The shared journal's leases (None on SQLite: a single server drives every job it is asked about)."""
        self.pacer = Pacer()
        """Each wait's status checks, from what the journal learned of the model (and which of its jobs probe)."""

    # --- a new job ----------------------------------------------------------------------------

    async def run(self, provider: Provider, req: JobRequest, plan: SavePlan, wait: float, paths: PathPolicy,
                  progress: ProgressFn | None = None, *, image_source: str | None = None,
                  owner: tuple[str, str | None] = ("local", None), alive: Alive | None = None,
                  selection: str | None = None, hold: Hold | None = None) -> Outcome:
        """The whole life of a new job. `req` is prepared (validated, model and image resolved),
        `plan` says where its save_to copies go (checked), `image_source` is the edit input as given,
        `owner` the caller's principal and the request's key (a re-issued identical call finds the job by them),
        `alive` tells whether the caller is still there to receive the answer (None: it is, as long as the call runs),
        `selection` why this provider serves the call (kept with the job, shown in its results), `hold` its
        reservation in the spend ledger. Raises FluxError only when no job was created (or its
        creation is unknowable: SubmitOutcomeUnknown); after the submit it always returns the job."""
        inline = await self._inline(provider, req.model, wait)
        intent = await self._intend(provider, req, plan, image_source, owner, selection, hold)
        if intent is not None:  # its caller is here: an identical call meanwhile is not a re-issue of a cut one
            self.in_flight[intent.id] = alive or _always
        sent = time.time()
        # Shielded from cancellation, and awaited by a stopping server (within its deadline), from the moment
        # the paid request leaves until its answer (the job's id) is journaled.
        with inflight.submitting(f"the {provider.id} {req.model} job"), self._intent_out(intent):
            try:
                submitted = await self._submit(provider, req, inline, progress, wait)
            except SubmitOutcomeUnknown as exc:
                if hold is not None:
                    await hold.unknown()  # it may have started: it keeps counting
                await self._intent_failed(intent, str(exc) or type(exc).__name__)
                raise
            except ProviderError:
                await self._intent_failed(intent, None)  # provably not created: the key is free again
                raise
            except Exception as exc:
                await self._intent_failed(intent, f"The submit failed unexpectedly ({type(exc).__name__}); the "
                                                  "job may exist and is never resubmitted.")
                raise
            record = self._record(provider, req, plan, submitted, sent, image_source, hold)
            record.principal, record.request_key = owner
            record.idempotency_key = req.idempotency_key
            if selection:
                record.request["selection_reason"] = selection
            self.in_flight[record.id] = alive or _always
            log.info("submitted %s (%s, %s%s)", record.id, provider.id, record.model, ", held" if inline else "")
            outcome = Outcome(record)
            state = submitted.state
            if state is not None and state.status in FINAL:
                state = self._settle(record, state, time.time())
            ended = record if record.status in FINAL else None
            # The ledger learns the job exists (and maybe its cost) in the write of its id.
            bill = hold.bill(record.id, ended) if hold is not None else None
            early: Kept | Exception | None = None
            if intent is not None and state is not None and _all_inline(state):
                # The images came with the answer: they are stored while the id is journaled (that write does not
                # say they are kept); the write that says so waits for both (`_finish`).
                early = await self._save_while_storing(outcome, provider, state, paths, intent.id, bill)
            else:
                # The id first (replacing the intent); then the ledger learns the job exists (and maybe its cost)
                await self._save(outcome, intent=intent.id if intent else None, bill=bill)
            if hold is not None and bill is None:
                await hold.billed(record.id, ended)  # one write: billed, with the cost of a job already over
            elif hold is None and ended is not None:
                await self._charge(record)
        deadline = time.monotonic() + wait
        try:
            if state is None or state.status not in FINAL:
                state = await self._observe(outcome, await self._wait(record, provider, wait, progress, outcome,
                                                                      poll_now=False))
            await self._finish(outcome, provider, state, paths, early)
        except LeaseLost:  # stalled past the lease: the new owner's row is the answer (waited on for the rest)
            try:
                await self._follow(outcome, provider, deadline - time.monotonic(), paths, progress)
            except FluxError as exc:
                outcome.notes.append(f"{exc} The job is kept: call check_prediction with "
                                     f"prediction_id=\"{outcome.record.id}\".")
        except FluxError as exc:
            outcome.notes.append(f"{exc} The job is kept: call check_prediction with prediction_id=\"{record.id}\".")
        except Exception as exc:  # an unexpected failure after paying must not lose the job
            log.exception("after submitting %s", record.id)
            outcome.notes.append(f"An internal error ({type(exc).__name__}) interrupted the server after the job "
                                 f"was accepted; the job is kept: call check_prediction with "
                                 f"prediction_id=\"{record.id}\".")
        except anyio.get_cancelled_exc_class():
            log.info("the call for %s ended before its answer (cancelled or disconnected); the job is kept and an "
                     "identical call joins it", record.id)
            raise
        finally:
            self.in_flight.pop(record.id, None)
            await self._let_go(record)
        return self._scrubbed(outcome)

    @contextlib.contextmanager
    def _intent_out(self, intent: Record | None) -> Iterator[None]:
        """While the submit of `intent` is out, the intent counts as this replica's call in flight."""
        try:
            yield
        finally:
            if intent is not None:
                self.in_flight.pop(intent.id, None)

    async def _intend(self, provider: Provider, req: JobRequest, plan: SavePlan, image_source: str | None,
                      owner: tuple[str, str | None], selection: str | None, hold: Hold | None) -> Record | None:
        """On a shared journal: journals the job's intent before anything is sent (None on SQLite). Raises
        KeyTaken when another job (on any replica) holds the call's idempotency key."""
        if self.leases is None:
            return None
        import secrets

        intent = self._record(provider, req, plan, Submitted(native_id=""), time.time(), image_source, hold)
        intent.id = f"{provider.id}:intent-{secrets.token_hex(8)}"
        intent.principal, intent.request_key = owner
        intent.idempotency_key = req.idempotency_key
        if selection:
            intent.request["selection_reason"] = selection
        if hold is not None and hold.charge is not None:  # a reconciler that finds the job bills this charge
            intent.request["charge_id"] = hold.charge.id
        try:  # the reservation Money deferred is written with the intent (its budget check made there)
            taken = await self.leases.intent(scrub_record(intent, self.redactor), hold.deferred if hold else None)
        except BaseException:
            if hold is not None:
                hold.written(False)
            raise
        if hold is not None:
            hold.written(taken is None)
        if taken is not None:
            raise KeyTaken(taken)
        return intent

    async def _intent_failed(self, intent: Record | None, error: str | None) -> None:
        if intent is not None and self.leases is not None:
            with anyio.CancelScope(shield=True):
                await self.leases.intent_failed(intent.id, self.redactor.scrub(error) if error else None)

    async def _let_go(self, record: Record) -> None:
        """A call ends: a pending job's lease goes (whoever checks on it next drives it); a final one's needs
        no statement."""
        if self.leases is None or not self.leases.holds(record.id):
            return
        if record.status in FINAL:
            self.leases.forget(record.id)
            return
        with anyio.CancelScope(shield=True):  # a stopping server hands its jobs over rather than leaving them
            await self.leases.release(record.id, hand_over=inflight.stopping)

    async def _inline(self, provider: Provider, model: str | None, wait: float) -> bool:
        """Whether to hold the submit open until the images come back in its answer (one request, and
        the job is noticed the moment it ends): for models documented to allow it whose jobs are short
        next to the call's wait, while the pool has room for another held request."""
        if self._held >= HELD_REQUESTS or wait < INLINE_MIN_WAIT or not provider.answers_inline(model):
            return False
        expected = await self.journal.typical_duration(provider.id, model or "")
        return expected is None or (expected <= INLINE_LONGEST and 3 * expected <= wait)

    async def _submit(self, provider: Provider, req: JobRequest, inline: bool, progress: ProgressFn | None,
                      wait: float) -> Submitted:
        """Sends the paid request (the caller shields it from cancellation)."""
        if not inline:
            return await provider.submit(req)
        self._held += 1
        ticking = _HeldProgress(provider.id, progress, wait) if progress else None
        try:
            return await provider.submit(req, inline=True)
        finally:
            self._held -= 1
            if ticking:
                ticking.stop()

    @staticmethod
    def _record(provider: Provider, req: JobRequest, plan: SavePlan, submitted: Submitted,
                sent: float, image_source: str | None, hold: Hold | None) -> Record:
        request = {**req.journaled(), **plan.journaled()}
        if image_source is not None:
            request["image"] = req.model_copy(update={"image": image_source}).journaled()["image"]
        return Record(
            id=f"{provider.id}:{submitted.native_id}", provider=provider.id, native_id=submitted.native_id,
            model=req.model or "", kind=req.kind, status="starting", request=request,
            # The job's clock starts when the request leaves: a held submit's answer comes only at its end.
            cost_usd=hold.estimate.usd if hold else provider.price(req), cost_estimated=True,
            created_at=min(sent, submitted.submitted_at), updated_at=time.time(),
        )

    # --- an earlier job -----------------------------------------------------------------------

    async def check(self, record: Record, provider: Provider, wait: float, paths: PathPolicy,
                    progress: ProgressFn | None = None) -> Outcome:
        """Resumes a journaled job: looks (and waits up to `wait`) if it is pending, fetches its images
        again if they went missing; a finished job with its files is returned as it is."""
        outcome = Outcome(record)
        if record.status == "unknown":  # nothing to look at: it may exist, and is never resubmitted
            return self._scrubbed(outcome)
        if record.status in FINAL:
            if await self.missing_files(record):
                await self._keep_again(outcome, provider, paths)
            return self._scrubbed(outcome)
        if self.leases is not None:
            await self._follow(outcome, provider, wait, paths, progress)
            return self._scrubbed(outcome)
        state = await self._observe(outcome, await self._wait(record, provider, wait, progress, outcome,
                                                              poll_now=True))
        await self._finish(outcome, provider, state, paths)
        return self._scrubbed(outcome)

    async def drive(self, record: Record, provider: Provider, paths: PathPolicy) -> None:
        """Drives a job whose lease this replica just took over (the reconciler): poll, settle, keep, with the
        steps of any call, until it is final (or DRIVE_SECONDS pass: then its lease goes)."""
        outcome = Outcome(record)
        try:
            state = await self._observe(outcome, await self._wait(record, provider, DRIVE_SECONDS, None, outcome,
                                                                  poll_now=True))
            await self._finish(outcome, provider, state, paths)
        except LeaseLost:
            log.info("%s: taken over by another replica meanwhile", record.id)
        except Exception:
            log.exception("driving %s", record.id)
        finally:
            await self._let_go(outcome.record)

    async def _follow(self, outcome: Outcome, provider: Provider, wait: float, paths: PathPolicy,
                      progress: ProgressFn | None) -> None:
        """A shared journal's check: drives the job when nobody does (taking its lease), else waits up to `wait`
        for its row as the replica that drives it writes it (woken by a notification, re-read at least every
        second; no connection is held while waiting). `outcome.record` is the row as last read."""
        assert self.leases is not None
        start = time.monotonic()
        deadline = start + max(wait, 0.0)
        last_progress = start
        while True:
            seen = await self.leases.watch(outcome.record.id)
            if seen is None:
                return
            record, live = seen
            outcome.record = record
            if record.status == "unknown" or (record.status in FINAL and (not live or not await self.missing_files(
                    record))):
                break  # done (a success whose images nobody is keeping any more is fetched again below)
            if record.status not in FINAL and not live and record.native_id:
                claimed = await self.leases.claim(record.id)
                if claimed is not None:  # nobody drives it: this call does, for the rest of its wait
                    outcome.record = claimed
                    try:
                        state = await self._observe(outcome, await self._wait(
                            claimed, provider, max(deadline - time.monotonic(), 0.0), progress, outcome,
                            poll_now=True))
                        await self._finish(outcome, provider, state, paths)
                        return
                    except LeaseLost:
                        continue  # taken over meanwhile: follow the new owner's row
                    finally:
                        await self._let_go(outcome.record)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if progress is not None and time.monotonic() - last_progress >= PROGRESS_EVERY - 0.01:
                last_progress = time.monotonic()
                await progress(round(last_progress - start, 1), wait, self.redactor.scrub(
                    f"{record.provider}: {record.status} ({last_progress - start:.0f}s)"))
            await self.leases.changed(record.id, min(remaining, REREAD, PROGRESS_EVERY))
        outcome.waited = time.monotonic() - start
        if outcome.record.status == "succeeded" and await self.missing_files(outcome.record):
            await self._keep_again(outcome, provider, paths)

    async def _keep_again(self, outcome: Outcome, provider: Provider, paths: PathPolicy) -> None:
        """Fetches a finished job's missing images again: from the kept copies, the provider URLs, or —
        for images that came inline and have no URL — the provider's status answer."""
        record = outcome.record
        state: JobState | None = None
        if None in record.outputs:
            try:
                state = await provider.poll(record.native_id, record.created_at)
            except UnsupportedOperation:
                state = None  # a synchronous provider's images cannot be asked for again
            if state is not None and state.status != "succeeded":
                state = None
        await self._keep(outcome, provider, state, paths)

    async def missing_files(self, record: Record, into: dict[str, bytes] | None = None) -> bool:
        """A success whose images are not all present (or were never kept: the process stopped first). With
        `into`, each image is read instead of only looked at, its bytes put there: on a bucket one GET both
        proves the object is there and gives the preview its bytes (a look and then a read are two requests)."""
        if record.status != "succeeded":
            return False
        if len(record.images) < max(len(record.outputs), 1):
            return True
        for image in record.images:
            if into is not None and image.path:
                try:
                    into[image.path] = await self.store.read(image.path)
                    continue
                except FileNotFoundError:
                    return True
            if not await self.store.present(image.path):
                return True
        return False

    # --- the steps ----------------------------------------------------------------------------

    async def _observe(self, outcome: Outcome, state: JobState | None) -> JobState | None:
        """Journals what a wait found: a changed pending status, or the final state (settled into the
        record and journaled before any image is fetched, so a crash leaves what is needed to fetch them).
        Returns the state as settled."""
        record = outcome.record
        if state is None or (state.status not in FINAL and state.status == record.status):
            return state
        if state.status in FINAL:
            state = self._settle(record, state, outcome.seen_at, timed=outcome.timed)
        else:
            record.status = state.status
        # A final job with the provider's own figure for its cost: the ledger learns it in the same write.
        settle = (self.money is not None and record.status in FINAL and not record.cost_estimated
                  and record.cost_usd is not None)
        if state.status == "succeeded" and self.leases is not None and self.leases.holds(record.id):
            # Shared journal: the success is written with its kept images (`_finish`), one write; until then the
            # row stays pending under this replica's lease, so a crash leaves it to the next owner to poll again.
            outcome.unsaved = settle
            return state
        await self._save(outcome, settle=settle)
        return state

    async def _save_while_storing(self, outcome: Outcome, provider: Provider, state: JobState, paths: PathPolicy,
                                  intent: str, bill: Bill | None) -> Kept | Exception:
        """Journals the record in place of its intent while its inline images are stored (the store's write
        overlaps the database's): what storing gave, or how it failed (raised by `_finish`, inside the steps
        whose failures become notes). The images are stored whatever happens to the call (shielded)."""
        async def store() -> Kept:
            with anyio.CancelScope(shield=True):
                kept = await self._store(outcome, provider, state, paths)
            return kept

        task = asyncio.get_running_loop().create_task(store())
        try:
            await self._save(outcome, intent=intent, bill=bill)
        except BaseException:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # stored; the next check records it
            raise
        try:
            return await task
        except Exception as exc:  # noqa: BLE001 - raised by `_finish`, as a failure of keeping would be
            return exc

    async def _finish(self, outcome: Outcome, provider: Provider, state: JobState | None,
                      paths: PathPolicy, early: Kept | Exception | None = None) -> None:
        """Keeps the images of a success (`early`: they were stored already, or storing them failed); a
        pending or failed job has nothing to keep."""
        if state is None or state.status != "succeeded":
            return
        try:
            if isinstance(early, Exception):
                raise early
            if early is not None:
                with anyio.CancelScope(shield=True):
                    await self._record_kept(outcome, provider, early)
                return
            # Images that came inline exist only in memory until written: a cancelled call still writes them.
            with anyio.CancelScope(shield=any(o.data is not None for o in state.outputs)):
                await self._keep(outcome, provider, state, paths)
        finally:
            if outcome.unsaved is not None:  # keeping failed or was cancelled: the success is journaled without them
                with anyio.CancelScope(shield=True):
                    await self._save(outcome)

    @staticmethod
    def _settle(record: Record, state: JobState, seen_at: float | None, *, timed: bool = True) -> JobState:
        """Writes a final state into the record (`timed`: whether `seen_at` measures the job's duration); returns
        it with no more outputs than were asked for (a provider that answers 200 images for one would get 200
        downloads and a result too big to send)."""
        asked = int(record.request.get("num_images") or 1)
        extra = len(state.outputs) - asked
        if extra > 0:
            note = f"{record.provider} returned {len(state.outputs)} images for {asked} asked; kept the first {asked}"
            state = dataclasses.replace(state, outputs=state.outputs[:asked],
                                        error="; ".join(filter(None, [state.error, note])))
        record.status = state.status
        if not record.completed_at:
            record.completed_at, record.timed = seen_at or time.time(), timed
        record.error = state.error
        if state.cost_usd is not None:
            record.cost_usd, record.cost_estimated = state.cost_usd, state.cost_estimated
        if state.remaining_credits is not None:
            record.remaining_credits = state.remaining_credits
        if state.status == "succeeded":
            record.outputs = [o.url for o in state.outputs]
            # A success can carry a note (e.g. 2 of 3 images made); it must survive re-downloads.
            record.request["provider_note"] = state.error
        return state

    async def _keep(self, outcome: Outcome, provider: Provider, state: JobState | None, paths: PathPolicy) -> None:
        """Keeps the images (from `state`, or again from what the record holds) and journals the result."""
        await self._record_kept(outcome, provider, await self._store(outcome, provider, state, paths))

    async def _store(self, outcome: Outcome, provider: Provider, state: JobState | None, paths: PathPolicy) -> Kept:
        """Stores the images (from `state`, or again from what the record holds); the record is not touched."""
        record = outcome.record
        req = record.request
        provenance = {"prompt": str(req.get("prompt", "")), "model": record.model, "provider": record.provider,
                      "prediction_id": record.id, "seed": str(req.get("seed")), "software": "flux-mcp",
                      **provenance_fields(req, record.kind)}
        return await self.keeper.keep(
            prediction_id=record.id, provenance=provenance, base_url=provider.settings.base_url,
            outputs=state.outputs if state else None, urls=record.outputs,
            plan=SavePlan.from_journal(req), overwrite=bool(req.get("overwrite")),
            paths=paths, max_pixels=pixel_bound(int(req.get("width") or 1024), int(req.get("height") or 1024)))

    async def _record_kept(self, outcome: Outcome, provider: Provider, kept: Kept) -> None:
        """Writes what storing the images gave into the record, and journals it (the write that says they are
        kept: only after they are stored)."""
        record = outcome.record
        req = record.request
        outcome.kept.update(kept.written)
        record.images = kept.images
        req.update(kept.delivery)  # a planned delivery's files and notes (assets.result_fields)
        note = "; ".join(n for n in [req.get("provider_note"), *kept.notes] if n) or None
        if kept.problems:
            record.error = "; ".join(([note] if note else []) + kept.problems) + (
                ". The job succeeded; call check_prediction "
                + ("again to retry the download while the provider URL is valid."
                   if any(i.url for i in kept.images) else "again to fetch the images anew."))
        elif record.status == "succeeded":
            record.error = note
        if record.status == "succeeded" and not kept.images:
            record.status = "failed"
            record.error = record.error or f"{provider.label} reported success but returned no image."
        await self._save(outcome)

    async def _charge(self, record: Record) -> None:
        """A final job's charge in the ledger becomes its cost."""
        if self.money is not None and record.status in FINAL:
            await self.money.settle(record)

    async def _save(self, outcome: Outcome, *, intent: str | None = None, bill: Bill | None = None,
                    settle: bool = False) -> None:
        """Journals the record (scrubbed; in place of the intent `intent`, on a shared journal, billing `bill`
        with it). A write that cannot land yet is kept by the journal; the result says so, once, with the id
        to keep."""
        record = scrub_record(outcome.record, self.redactor)
        record.updated_at = time.time()
        if outcome.unsaved is not None:  # this write carries the success `_observe` left to it
            settle, outcome.unsaved = settle or outcome.unsaved, None
        if not await (self.leases.submitted(intent, record, bill) if intent and self.leases
                      else self.journal.put(record, bill, settle=settle)):
            note = (f"The server's journal could not be written just now; it keeps retrying. Keep the "
                    f"prediction_id \"{record.id}\" to check on this job.")
            if note not in outcome.notes:
                outcome.notes.append(note)
                log.warning("prediction %s is not yet journaled", record.id)

    def _scrubbed(self, outcome: Outcome) -> Outcome:
        scrub_record(outcome.record, self.redactor)
        outcome.notes = [self.redactor.scrub(n) for n in outcome.notes]
        return outcome

    async def _wait(self, record: Record, provider: Provider, wait: float, progress: ProgressFn | None,
                    outcome: Outcome, *, poll_now: bool) -> JobState | None:
        """Polls until the job is final or `wait` seconds pass; returns the last state seen (None: none).
        `poll_now`: the first status request goes at once (a check on an earlier job), not when the schedule says."""
        schedule = self.pacer.schedule((record.provider, record.model),
                                       await self.journal.recent_durations(record.provider, record.model),
                                       provider.typical_seconds(record.model))
        start = time.monotonic()
        deadline = start + wait
        state: JobState | None = None
        poll_error: str | None = None
        last_progress = 0.0
        first = poll_now
        running_seen = False

        async def report() -> None:
            nonlocal last_progress
            if progress is None:
                return
            last_progress = time.monotonic()
            elapsed = last_progress - start
            said = f" - {state.message}" if state is not None and state.message else ""
            await progress(round(elapsed, 1), wait, self.redactor.scrub(
                f"{record.provider}: {state.status if state else record.status}{said} ({elapsed:.0f}s)"))

        while True:
            now = time.monotonic()
            delay = 0.0 if first else schedule.next_delay(time.time() - record.created_at)
            if not first and now + delay > deadline:
                break
            first = False
            # Sleep in slices so progress notifications keep flowing (and keep client timeouts alive).
            wake = now + delay
            while (remaining := wake - time.monotonic()) > 0:
                await anyio.sleep(min(remaining, PROGRESS_EVERY))
                if time.monotonic() - last_progress >= PROGRESS_EVERY - 0.01:
                    await report()
            try:
                asked = time.time()
                state = await provider.poll(record.native_id, record.created_at)
                poll_error = None
            except ProviderUnavailable as exc:
                poll_error = f"The last status check failed: {exc}"
                log.warning("poll %s: %s", record.id, self.redactor.scrub(str(exc)))
                continue
            except ProviderError as exc:
                # Not transient (e.g. the key was revoked): stop waiting, keep the job and its id.
                poll_error = f"The status check failed: {exc}"
                log.warning("poll %s: %s", record.id, self.redactor.scrub(str(exc)))
                break
            if state.status in FINAL:
                # The job was done by the time it was asked about: the journal learns that moment, not the
                # moment the answer arrived (which would add a round trip to every learned duration), when it
                # measures the job: a check before this one saw it running, or the schedule looked early on
                # purpose (not a check at once, whose moment is the caller's).
                outcome.seen_at = asked
                outcome.timed = running_seen or (schedule.probing and not poll_now)
                break
            running_seen = True
            await report()
        outcome.waited = time.monotonic() - start
        if poll_error:
            outcome.notes.append(poll_error)
        return state


def _all_inline(state: JobState) -> bool:
    """A success whose every image came in the answer itself (nothing to download before storing it)."""
    return state.status == "succeeded" and bool(state.outputs) and all(o.data is not None for o in state.outputs)


class _HeldProgress:
    """Progress notifications every few seconds while a held submit is open (they keep client timeouts
    alive). Timer callbacks on the running asyncio loop rather than a task group per call: a call that
    ends before the first tick (the usual case) costs a timer, not a task."""

    def __init__(self, provider_id: str, progress: ProgressFn, wait: float):
        self._loop = asyncio.get_running_loop()
        self._start = time.monotonic()
        self._provider_id, self._progress, self._wait = provider_id, progress, wait
        self._sending: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(PROGRESS_EVERY, self._tick)

    def _tick(self) -> None:
        elapsed = time.monotonic() - self._start
        task = self._loop.create_task(
            self._progress(round(elapsed, 1), self._wait, f"{self._provider_id}: processing ({elapsed:.0f}s)"))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        self._timer = self._loop.call_later(PROGRESS_EVERY, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
