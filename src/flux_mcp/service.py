"""The facade the tools and the CLI call: choose a provider, run a job, check one, upload a file.

Everything about a job's life (submit once, journal, wait, settle, keep) is in `jobs.JobRunner`;
keeping images is in `keep`; the journal and the image store are behind the `Journal` and
`ImageStore` protocols. What is here is the part that needs the whole server's view: which
providers exist and are configured, what a request resolves to, and the checks made before paying.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx2

from . import assets, orphans
from .choose import AUTO, Chooser, Plan, attempt_kind, short
from .config import Settings
from .errors import (
    ConfigError,
    DownloadFailed,
    FluxError,
    InvalidInput,
    ProviderError,
    UnknownPrediction,
    UnsupportedOperation,
)
from .http import LazyClient, ProviderHttp, RetryPolicy
from .jobs import Alive, JobRunner, Outcome, ProgressFn
from .journal import Attempt, Journal, Record
from .keep import Keeper, SavePlan, save_targets
from .lifecycle import inflight
from .media import Downloader, decode_data_uri, inspect_image, to_data_uri
from .models import FINAL, UploadResult
from .money import Ask, Money, Planned
from .paths import PathPolicy
from .providers import Provider, registry
from .redact import Redactor
from .replica import KeyTaken
from .request import JobRequest, request_key
from .shared import LOCAL, UPLOAD_REFUSED, check_job_inputs
from .store import FolderStore, ImageStore
from .uploads import Uploads, is_reference

log = logging.getLogger("flux_mcp.service")

UPLOAD_REUSE_SECONDS = 3600.0
"""Uploaded files are temporary on the providers; a cached upload URL is reused for an hour."""
_PREDICTION_ID = re.compile(r"^[a-z]{2,20}:[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class FluxService:
    """Holds the providers, the journal, the image store and the job runner; one per server process."""

    def __init__(self, settings: Settings, client: httpx2.AsyncClient | LazyClient, journal: Journal, *,
                 store: ImageStore | None = None, redactor: Redactor | None = None,
                 retry: RetryPolicy | None = None, downloader: Downloader | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.client = client
        self.journal = journal
        self.store: ImageStore = store or FolderStore(settings.home)
        self.redactor = redactor or Redactor(settings.secrets())

        def make(spec: registry.ProviderSpec) -> Provider:
            cls = spec.load()
            http = ProviderHttp(client, cls.id, self.redactor, key_env=cls.key_env, retry=retry)
            return cls(settings.providers[cls.id], http)

        self.providers = registry.Adapters(settings, make)
        """Every provider; an adapter is made when first asked for (see `registry.Adapters`)."""
        self._key_locks: dict[tuple[str, str], anyio.Lock] = {}
        self.chooser = Chooser(self.providers, journal, settings.fallback)
        self.money = Money(settings, journal, clock=clock)
        self.runner = JobRunner(journal, self.store, Keeper(self.store, downloader or Downloader(client)),
                                self.redactor, money=self.money)
        self.uploads = Uploads(self.store, clock)  # shared mode's upload links (see `uploads`)

    # --- choosing a provider ------------------------------------------------------------------

    def default_provider_id(self) -> str:
        """FLUX_MCP_PROVIDER, else the first provider with a key, else the offline placeholder."""
        return registry.default_provider(self.settings)

    def configured(self) -> list[str]:
        return self.providers.configured_ids()

    def provider(self, name: str | None, *, need: str | None = None) -> Provider:
        pid = (name or self.default_provider_id()).strip().lower()
        provider = self.providers.get(pid)
        if provider is None:
            raise InvalidInput(f"Unknown provider {pid!r}. Choose one of: {', '.join(self.providers)}.")
        if not provider.configured:
            others = [p for p in self.configured() if p != pid]
            raise ConfigError(
                f"{provider.label} is not configured: set {provider.key_env} in the MCP server's environment "
                f"(env block of the client config) and restart it. Configured now: {', '.join(others)}."
            )
        able = {"edit": lambda p: p.can_edit, "upload": lambda p: p.can_upload}.get(need or "")
        if able is not None and not able(provider):
            can = [p for p in self.configured() if able(self.providers[p]) and p != "placeholder"]
            hint = (f"Configured providers that can: {', '.join(can)}." if can else
                    "No configured provider can; set a key for one of: "
                    + ", ".join(f"{p.id} ({p.key_env})" for p in self.providers.values()
                                if able(p) and p.key_env))
            own = provider.upload_hint() if need == "upload" else None
            raise UnsupportedOperation(f"{provider.label} cannot {need} images. {own + ' ' if own else ''}{hint}")
        return provider

    # --- generate / edit / check ---------------------------------------------------------------

    async def run(self, req: JobRequest, paths: PathPolicy, progress: ProgressFn | None = None,
                  ask: Ask | None = None, principal: str = LOCAL, *, alive: Alive | None = None) -> Outcome | Planned:
        """Runs a generate or edit job, unless it joins an earlier one: the same `idempotency_key` from the
        same caller always returns its job; an identical call whose earlier answer never reached the caller
        (cancelled, timed out, connection dropped) within FLUX_MCP_REJOIN_SECONDS joins that job instead of
        paying again. Everything that can be checked is checked before paying (a dry run stops there).
        `ask` puts a confirmation to the user (None: nobody can be asked); `principal` is whose jobs and
        budget these are."""
        inflight.refuse_new()
        if self.settings.shared:  # the server's disk is not the caller's: refused before anything is planned
            if (req.provider or self.default_provider_id()).strip().lower() != AUTO:
                self.provider(req.provider, need="edit" if req.kind == "edit" else None)  # its own refusal first
            check_job_inputs(req.save_to, req.image if req.kind == "edit" else None, req.variation_of)
        if req.variation_of:  # the earlier image's prompt, model, provider and size, with a new seed
            req = assets.variation(req, paths)
        if req.dry_run:  # checks and estimates only: nothing to join, nothing paid
            return await self._new(req, "", paths, progress, principal, alive, ask)
        key = request_key(req)
        if req.idempotency_key:
            # One process: the lock keeps one key to one job. Several replicas: the intent row holds the key in
            # the database before any paid request, so a same-key call elsewhere attaches (KeyTaken).
            async with self._key_lock(principal, req.idempotency_key):
                earlier = (None if self._intent_finds_key(req)
                           else await self.journal.by_idempotency_key(principal, req.idempotency_key))
                if earlier is None:
                    try:
                        return await self._new(req, key, paths, progress, principal, alive, ask)
                    except KeyTaken as taken:
                        earlier = taken.record
                if earlier.request_key != key:
                    raise InvalidInput(
                        f"idempotency_key {req.idempotency_key!r} already belongs to {earlier.id}, made with other "
                        "arguments. Use a new key for a new job, or the same arguments to get that job back.")
                return await self._join(earlier, req, paths, progress)
        if self.runner.leases is not None and isinstance(self.journal, orphans.Adopting):  # one re-issue per orphan
            found = await orphans.find(self.journal, self.runner.in_flight, principal, key,
                                       time.time() - self.settings.rejoin_seconds)
            if found is None:
                return await self._new(req, key, paths, progress, principal, alive, ask)
            async with orphans.holding(self.journal, *found):
                return await self._join(found[0], req, paths, progress)
        for earlier in await self.journal.rejoinable(principal, key, time.time() - self.settings.rejoin_seconds):
            alive = self.runner.in_flight.get(earlier.id)
            if alive is None or not await alive():  # a call whose caller still waits on it is not abandoned
                return await self._join(earlier, req, paths, progress)
        return await self._new(req, key, paths, progress, principal, alive, ask)

    def _intent_finds_key(self, req: JobRequest) -> bool:
        """Whether the job's intent alone finds the earlier job of a call's idempotency key (shared mode): it takes
        the key in the database before the paid request, or finds the job that holds it (KeyTaken), so a read
        first would only cost a statement more per call. The read comes first anyway where what runs before the
        intent could differ for a call that only gets its earlier job back: a question to the user or a budget's
        refusal (the server's limits), a max_cost_usd check, an edit's upload of its image."""
        return (self.runner.leases is not None and not self.money.decides() and req.kind != "edit"
                and req.max_cost_usd is None)

    async def _join(self, record: Record, req: JobRequest, paths: PathPolicy, progress: ProgressFn | None) -> Outcome:
        """Answers with an earlier job: its images when it finished, or waits on it while it runs."""
        log.info("joined %s (an identical call's answer never reached the caller)", record.id)
        provider = self.providers.get(record.provider)
        previews: dict[str, bytes] | None = {} if self._reads_previews() else None  # see `_check`
        if provider is None or not provider.configured:
            outcome = Outcome(record, notes=[(f"Set {provider.key_env if provider else record.provider} to check "
                                              "on this job again.")])
        elif record.status == "unknown" or (record.status in FINAL and not await self.runner.missing_files(
                record, previews)):
            outcome = Outcome(record, kept=previews or {})
        else:
            outcome = await self.runner.check(record, provider, self.wait_for(req.wait_seconds), paths, progress)
        outcome.joined = True
        return outcome

    async def _new(self, req: JobRequest, key: str, paths: PathPolicy, progress: ProgressFn | None,
                   principal: str, alive: Alive | None, ask: Ask | None = None) -> Outcome | Planned:
        """A new job: on the provider the call named (or the default), moving on to the next of the plan
        only when a provider provably created nothing (see `choose`)."""
        if not req.dry_run and (read_only := self.journal.read_only()):  # a job it cannot record is not started
            raise ConfigError(read_only)
        auto = (req.provider or self.default_provider_id()).strip().lower() == AUTO
        first = None if auto else self.provider(req.provider, need="edit" if req.kind == "edit" else None)
        plan = await self.chooser.plan(req, first)
        refusals: list[str] = []
        for i, (provider, model) in enumerate(plan.steps):
            last = i == len(plan.steps) - 1
            try:
                asked = req.model_copy(update={"provider": provider.id, "model": model})
                # Exact size, transparency, preset: planned (and checked) before the provider's own limits.
                asset = assets.plan(asked, provider, self.providers.configured())
                prepared = provider.prepare(assets.sent(asked, asset) if asset else asked)
                saves = self._save_plan(prepared, asked, asset, paths)
                source = prepared.image
                shown = source if source and not source.startswith("data:") else "the image"
                check_source = (lambda data, asset=asset, shown=shown: assets.check_source(asset, data, shown))
                if self.money.decides():
                    await provider.refresh_prices()  # the provider's current price, where it lists one
                estimate = self.money.estimate(provider, prepared)
                if prepared.dry_run:
                    if prepared.kind == "edit":
                        await self._image_input(provider, prepared.image or "", paths, send=False,
                                                check=check_source, principal=principal)
                    return await self.money.plan(estimate, prepared, [str(t) for t in saves.targets], principal)
                hold = await self.money.before_paying(estimate, prepared, principal, ask)
                try:
                    source_bytes = None
                    if prepared.kind == "edit":
                        image, source_bytes = await self._image_input(provider, prepared.image or "", paths,
                                                                      check=check_source, principal=principal)
                        prepared = prepared.model_copy(update={"image": image})
                    outcome = await self.runner.run(
                        provider, prepared, saves, self.wait_for(prepared.wait_seconds), paths, progress,
                        image_source=source, owner=(principal, key), alive=alive,
                        selection=_selection(plan, provider, refusals), hold=hold)
                    outcome.source_image = source_bytes
                finally:
                    with anyio.CancelScope(shield=True):
                        await hold.release()  # a no-op once the job was created (or may have been)
                outcome.notes.extend(hold.notes)
                return outcome
            except ProviderError as exc:  # refused, or never sent: this provider created nothing
                await self._attempted(principal, provider, model, exc)
                if len(plan.steps) == 1:
                    raise
                refusals.append(f"{provider.id}: {short(exc)}")
                log.info("%s created nothing (%s)%s", provider.id, type(exc).__name__,
                         "" if last else f"; trying {plan.steps[i + 1][0].id}")
                if last:
                    raise type(exc)("Every provider refused, so nothing was charged: " + " | ".join(refusals)
                                    + ". Fix what each says (a key, credit, a setting), then call again.",
                                    status_code=exc.status_code) from None
            except InvalidInput as exc:
                if i == 0 or last:
                    raise
                await self._attempted(principal, provider, model, exc)
                refusals.append(f"{provider.id}: does not take these arguments")
        raise AssertionError("unreachable: a plan has at least one step")  # pragma: no cover

    async def _attempted(self, principal: str, provider: Provider, model: str, exc: FluxError) -> None:
        """Journals a failover step that created nothing, with its reason (scrubbed, short)."""
        with anyio.CancelScope(shield=True):
            await self.chooser.refused(Attempt(principal, provider.id, model, attempt_kind(exc),
                                               short(self.redactor.scrub(str(exc)))))

    @staticmethod
    def _save_plan(prepared: JobRequest, asked: JobRequest, asset: assets.AssetPlan | None,
                   paths: PathPolicy) -> SavePlan:
        """Where the images go besides the data folder: a preset's folder, or the save_to targets (checked
        against what the asset plan writes beside them)."""
        if asset is not None and asset.preset:
            asset = assets.preset_folder(paths, prepared.save_to, asset, prepared.overwrite)
            return SavePlan(asset=asset, root=next((f for f in paths.folders
                                                    if Path(asset.folder or "").is_relative_to(f)), None))
        plan = save_targets(paths, prepared.save_to, prepared.num_images, prepared.overwrite, asked.prompt)
        if asset is not None:
            assets.check_targets(plan.targets, asset, paths, prepared.overwrite, plan.free_names)
            plan = dataclasses.replace(plan, asset=asset)
        return plan

    @contextlib.asynccontextmanager
    async def _key_lock(self, principal: str, key: str) -> AsyncIterator[None]:
        """Calls with one idempotency key run one at a time (the second finds the first's job)."""
        lock = self._key_locks.setdefault((principal, key), anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._key_locks.pop((principal, key), None)

    async def check(self, prediction_id: str, wait_seconds: float, paths: PathPolicy,
                    progress: ProgressFn | None = None, *, principal: str = LOCAL) -> Outcome:
        outcome = await self._check(prediction_id, wait_seconds, paths, progress, principal=principal)
        if read_only := self.journal.read_only():
            outcome.notes.append(read_only)
        return outcome

    async def _check(self, prediction_id: str, wait_seconds: float, paths: PathPolicy,
                     progress: ProgressFn | None, *, principal: str) -> Outcome:
        inflight.refuse_new()
        pid = prediction_id.strip()
        if not _PREDICTION_ID.match(pid) or ".." in pid:
            raise InvalidInput(
                f"{prediction_id!r} is not a prediction id. Ids look like 'atlascloud:pred_abc123', as returned "
                "by generate_image or edit_image."
            )
        record = await self.journal.get(pid)
        if record is None or record.principal != principal:  # another user's job is not theirs to see
            raise UnknownPrediction(
                f"No prediction {pid!r} was made by this server (its journal is in {self.settings.home}). Check "
                "the id, or start a new job with generate_image."
            )
        provider = self.providers.get(record.provider)
        if provider is None:
            return Outcome(record, notes=[f"Provider {record.provider!r} is no longer known to this server."])
        source = assets.source_of(record.request, paths) if record.kind == "edit" else None
        # On a bucket the previews' bytes are read anyway: reading them is the check that the images are there.
        previews: dict[str, bytes] | None = {} if self._reads_previews() else None
        if record.status in FINAL and not await self.runner.missing_files(record, previews):
            return Outcome(record, source_image=source, kept=previews or {})
        if not provider.configured:
            return Outcome(record, notes=[f"Set {provider.key_env} to check on this job again."])
        outcome = await self.runner.check(record, provider, self.wait_for(wait_seconds), paths, progress)
        outcome.source_image = source
        return outcome

    def _reads_previews(self) -> bool:
        """Whether a result's previews are read from the store (a bucket's: nothing is at a local path)."""
        return self.settings.preview != "off" and hasattr(self.store, "presign")

    def wait_for(self, asked: float | None) -> float:
        """How long a call waits: what it asked (else the default), never past FLUX_MCP_MAX_WAIT_SECONDS."""
        return min(self.settings.wait_seconds if asked is None else asked, self.settings.max_wait_seconds)

    # --- files --------------------------------------------------------------------------------

    async def _image_input(self, provider: Provider, image: str, paths: PathPolicy, *, send: bool = True,
                           check: Callable[[bytes], None] | None = None,
                           principal: str = LOCAL) -> tuple[str, bytes | None]:
        """Turns edit_image's `image` into what the provider accepts: a URL, an upload, or a data: URI;
        with the image's bytes when they were read here (not for a URL), checked by `check` first. With
        `send` false (a dry run) it is only checked: nothing is uploaded. In shared mode an upload link's
        reference (`upload:<link>`, see `uploads`) stands for the file PUT to it by the same principal."""
        text = image.strip()
        if self.settings.shared and is_reference(text):
            data = await self.uploads.resolve(text, principal)
            name = "upload"
        elif text.startswith(("http://", "https://")):
            return text, None
        elif text.startswith("data:"):
            data = decode_data_uri(text)
            name = "image"
        else:
            resolved, data = paths.read_bytes(text)
            name = resolved.name
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            raise InvalidInput(f"`image` is not a usable image: {exc}.") from None
        if check is not None:
            check(data)
        if provider.can_upload and not send:
            return text, data
        if provider.can_upload:
            url, _ = await self._upload_bytes(provider, data, f"{Path(name).stem}.{info.ext}", info.mime_type)
            return url, data
        if provider.accepts_data_uri:
            return to_data_uri(data, info.mime_type), data
        raise UnsupportedOperation(
            f"{provider.label} takes input images only as public http(s) URLs and has no upload API here. Pass a "
            "public URL as `image`, or use a provider that accepts local files: "
            + ", ".join(p.id for p in self.providers.values() if (p.can_upload or p.accepts_data_uri) and p.can_edit
                        and p.configured and p.id != "placeholder") + "."
        )

    async def _upload_bytes(self, provider: Provider, data: bytes, filename: str, mime: str) -> tuple[str, bool]:
        digest = hashlib.sha256(data).hexdigest()
        cached = await self.journal.upload_url(digest, provider.id, UPLOAD_REUSE_SECONDS)
        if cached:
            return cached, True
        url = await provider.upload(data, filename, mime)
        await self.journal.add_upload(digest, provider.id, url)
        return url, False

    async def upload(self, path: str, provider_name: str | None, paths: PathPolicy, *,
                     principal: str = LOCAL) -> UploadResult:
        inflight.refuse_new()
        provider = self.provider(provider_name, need="upload")
        if self.settings.shared and not is_reference(path):
            raise InvalidInput(UPLOAD_REFUSED)
        if self.settings.shared:  # a file the same principal PUT to an upload link
            data = await self.uploads.resolve(path, principal)
            resolved = Path(path.strip())
        else:
            resolved, data = paths.read_bytes(path)
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            raise InvalidInput(f"{resolved.name} is not an image this server uploads: {exc}.") from None
        url, reused = await self._upload_bytes(provider, data, resolved.name, info.mime_type)
        return UploadResult(provider=provider.id, url=url, path=str(resolved), mime_type=info.mime_type,
                            size_bytes=len(data), reused=reused)


__all__ = ["FluxService", "Outcome", "Planned", "ProgressFn", "ProviderError"]


def _selection(plan: Plan, provider: Provider, refusals: list[str]) -> str | None:
    """The one line that says why `provider` serves the call (None: it is simply the one asked for)."""
    if refusals:
        return f"{provider.id} served it after {'; '.join(refusals)} (nothing was charged there)"
    return plan.reason
