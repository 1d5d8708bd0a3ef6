"""The domain logic behind the four tools, free of MCP wiring: submit once, journal, wait, keep the images."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2

from .config import Settings
from .errors import (
    ConfigError,
    DownloadFailed,
    FluxError,
    InvalidInput,
    PathNotAllowed,
    ProviderError,
    ProviderUnavailable,
    UnknownPrediction,
    UnsupportedOperation,
)
from .http import HELD_REQUESTS, LazyClient, ProviderHttp, RetryPolicy
from .images import light_work
from .journal import Journal, Record
from .lifecycle import inflight
from .media import FORMATS, Downloader, ImageStore, convert, decode_data_uri, inspect_image, to_data_uri
from .models import FINAL, ImageOutput, UploadResult
from .paths import PathPolicy
from .providers import PROVIDER_CLASSES, ImageRequest, JobState, Provider, Submitted
from .providers.placeholder import NOTE as PLACEHOLDER_NOTE
from .redact import Redactor
from .waiting import PollSchedule

log = logging.getLogger("flux_mcp.service")

ProgressFn = Callable[[float, float | None, str], Awaitable[None]]
UPLOAD_REUSE_SECONDS = 3600.0
"""Uploaded files are temporary on the providers; a cached upload URL is reused for an hour."""
_PREDICTION_ID = re.compile(r"^[a-z]{2,20}:[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_PROGRESS_EVERY = 5.0
INLINE_LONGEST = 10.0
"""Submits are held open (sync mode) only for models whose jobs typically end within this many seconds."""
INLINE_MIN_WAIT = 15.0
"""...and only when the call may wait at least this long (a short wait wants the id back at once)."""


@dataclass
class JobParams:
    """What generate_image and edit_image were asked, after type validation."""

    prompt: str
    provider: str | None = None
    model: str | None = None
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    wait_seconds: float | None = None
    save_to: str | None = None
    overwrite: bool = False
    image: str | None = None


@dataclass
class Outcome:
    """A prediction as the tools present it."""

    record: Record
    notes: list[str] = field(default_factory=list)
    waited: float = 0.0
    seen_at: float | None = None
    """When the status request that found the job final was sent."""
    kept: dict[str, bytes] = field(default_factory=dict)
    """The bytes just written at each image's path (previews are made from them, not read back)."""


class FluxService:
    """Holds the providers, the journal and the image store; one per server process."""

    def __init__(self, settings: Settings, client: httpx2.AsyncClient | LazyClient, journal: Journal, *,
                 redactor: Redactor | None = None, retry: RetryPolicy | None = None,
                 downloader: Downloader | None = None):
        self.settings = settings
        self.client = client
        self.journal = journal
        self.redactor = redactor or Redactor(settings.secrets())
        self.providers: dict[str, Provider] = {}
        for cls in PROVIDER_CLASSES:
            http = ProviderHttp(client, cls.id, self.redactor, key_env=cls.key_env, retry=retry)
            self.providers[cls.id] = cls(settings.providers[cls.id], http)
        self.downloader = downloader or Downloader(client)
        self.store = ImageStore(settings.home)
        self._held = 0
        """Submits held open right now (sync mode)."""

    # --- choosing a provider ------------------------------------------------------------------

    @staticmethod
    def default_for(settings: Settings) -> str:
        """FLUX_MCP_PROVIDER, else the first provider with a key, else the offline placeholder."""
        if settings.default_provider:
            return settings.default_provider
        for cls in PROVIDER_CLASSES:
            if cls.key_env and settings.providers[cls.id].api_key is not None:
                return cls.id
        return "placeholder"

    def default_provider_id(self) -> str:
        return self.default_for(self.settings)

    def configured(self) -> list[str]:
        return [pid for pid, p in self.providers.items() if p.configured]

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

    # --- generate / edit ----------------------------------------------------------------------

    async def run(self, kind: str, params: JobParams, paths: PathPolicy,
                  progress: ProgressFn | None = None) -> Outcome:
        inflight.refuse_new()
        provider = self.provider(params.provider, need="edit" if kind == "edit" else None)
        model = params.model or (provider.default_edit_model if kind == "edit" else provider.default_model)
        assert model is not None
        req = ImageRequest(kind=kind, prompt=params.prompt, model=model, width=params.width, height=params.height,  # type: ignore[arg-type]
                           num_images=params.num_images, seed=params.seed, steps=params.steps,
                           guidance_scale=params.guidance_scale, image=params.image)
        provider.prepare(req)
        save_targets = self._save_targets(paths, params.save_to, req.num_images, params.overwrite, req.prompt)
        if kind == "edit":
            req.image = await self._image_input(provider, params.image or "", paths)

        wait = self.settings.wait_seconds if params.wait_seconds is None else params.wait_seconds
        req.inline = self._inline(provider, req.model, wait)
        sent = time.time()
        submitted = await self._submit(provider, req, progress, wait)
        now = time.time()
        state = submitted.state
        record = Record(
            id=f"{provider.id}:{submitted.native_id}", provider=provider.id, native_id=submitted.native_id,
            model=req.model, kind=kind, status=state.status if state else "starting",
            request={"prompt": req.prompt, "width": req.width, "height": req.height, "num_images": req.num_images,
                     "seed": req.seed, "steps": req.steps, "guidance_scale": req.guidance_scale,
                     "image": _short_input(params.image), "save_to": [str(t) for t in save_targets] or None,
                     "overwrite": params.overwrite},
            # The job's clock starts when the request leaves: a held submit's answer comes only at its end.
            cost_usd=provider.price(req), created_at=min(sent, submitted.submitted_at), updated_at=now,
        )
        settled = journaled = False
        if state is not None and state.status in FINAL:
            self._settle(record, state, now)  # the answer was final: the journal records the job and it at once
            settled = True
        if not (settled and state is not None and _light(state, save_targets)):
            self.journal.add(record)
            journaled = True
        # else: the images came inline and keeping them needs no await (no thread, no download), so the
        # one journal write after they are on disk is as early as a write before them could be.
        log.info("submitted %s (%s, %s%s)", record.id, provider.id, req.model, ", held" if req.inline else "")
        try:
            return await self._finish(record, provider, state, wait, paths, progress, settled=settled,
                                      journaled=journaled)
        except BaseException:
            if not journaled:
                self.journal.add(record)  # whatever went wrong, the paid job and its id are kept
            raise

    def _inline(self, provider: Provider, model: str, wait: float) -> bool:
        """Whether to hold the submit open until the images come back in its answer (one request, and
        the job is noticed the moment it ends): for models documented to allow it whose jobs are short
        next to the call's wait, while the pool has room for another held request."""
        if self._held >= HELD_REQUESTS or wait < INLINE_MIN_WAIT or not provider.answers_inline(model):
            return False
        expected = self.journal.typical_duration(provider.id, model)
        return expected is None or (expected <= INLINE_LONGEST and 3 * expected <= wait)

    async def _submit(self, provider: Provider, req: ImageRequest, progress: ProgressFn | None,
                      wait: float) -> Submitted:
        """Sends the paid request. Shielded from cancellation: once it is out, its answer (the job's id)
        is awaited and journaled even if the call is cancelled meanwhile. A stopping server waits for it
        (and the caller's journal write, which follows with no await in between), within a deadline."""
        with inflight.submitting(f"the {provider.id} {req.model} job"):
            if not req.inline:
                return await provider.submit(req)
            self._held += 1
            ticking = _HeldProgress(provider.id, progress, wait) if progress else None
            try:
                return await provider.submit(req)
            finally:
                self._held -= 1
                if ticking:
                    ticking.stop()

    async def check(self, prediction_id: str, wait_seconds: float, paths: PathPolicy,
                    progress: ProgressFn | None = None) -> Outcome:
        inflight.refuse_new()
        pid = prediction_id.strip()
        if not _PREDICTION_ID.match(pid) or ".." in pid:
            raise InvalidInput(
                f"{prediction_id!r} is not a prediction id. Ids look like 'atlascloud:pred_abc123', as returned "
                "by generate_image or edit_image."
            )
        record = self.journal.get(pid)
        if record is None:
            raise UnknownPrediction(
                f"No prediction {pid!r} was made by this server (its journal is in {self.settings.home}). Check "
                "the id, or start a new job with generate_image."
            )
        provider = self.providers.get(record.provider)
        if provider is None:
            return Outcome(record, notes=[f"Provider {record.provider!r} is no longer known to this server."])
        if record.status in FINAL and not _missing_files(record):
            return Outcome(record)
        if not provider.configured:
            return Outcome(record, notes=[f"Set {provider.key_env} to check on this job again."])
        return await self._finish(record, provider, None, wait_seconds, paths, progress, checking=True)

    async def _finish(self, record: Record, provider: Provider, state: JobState | None, wait: float,
                      paths: PathPolicy, progress: ProgressFn | None, *, checking: bool = False,
                      settled: bool = False, journaled: bool = True) -> Outcome:
        """Waits (if needed), journals the final state and keeps the images. `settled`: the record already
        holds `state`; `journaled`: and the journal has it too (else it is first written with the images)."""
        outcome = Outcome(record)
        if record.status in FINAL and state is None:
            if record.status == "succeeded" and None in record.outputs:
                # Images that came inline have no URL to fetch again: the provider is asked for them anew
                # (where it has a status endpoint; a synchronous provider's images cannot be asked for).
                try:
                    state = await provider.poll(record.native_id, record.created_at)
                except UnsupportedOperation:
                    state = None
                if state is not None and state.status == "succeeded":
                    await self._materialize(record, provider, state, paths, outcome)
                    return outcome
            await self._materialize(record, provider, None, paths, outcome)
            return outcome
        if state is None:
            # A check looks at once; a fresh submit gives the job a moment first.
            state = await self._wait(record, provider, wait, progress, outcome, poll_now=checking)
        if state is None or state.status not in FINAL:
            if state is not None and state.status != record.status:
                record.status = state.status
                self.journal.update(record)
            return outcome
        if not settled:
            self._settle(record, state, outcome.seen_at)
            self.journal.update(record)
        if state.status == "succeeded":
            # Images that came inline exist only in memory until written: a cancelled call still writes them.
            with anyio.CancelScope(shield=any(o.data is not None for o in state.outputs)):
                await self._materialize(record, provider, state, paths, outcome, journaled=journaled)
        if record.provider == "placeholder":
            outcome.notes.append(PLACEHOLDER_NOTE)
        return outcome

    @staticmethod
    def _settle(record: Record, state: JobState, seen_at: float | None) -> None:
        """Writes a final state into the record (the caller journals it, before any download)."""
        record.status = state.status
        record.completed_at = record.completed_at or seen_at or time.time()
        record.error = state.error
        if state.cost_usd is not None:
            record.cost_usd = state.cost_usd
        if state.remaining_credits is not None:
            record.remaining_credits = state.remaining_credits
        if state.status == "succeeded":
            record.outputs = [o.url for o in state.outputs]
            # A success can carry a note (e.g. 2 of 3 images made); it must survive re-downloads.
            record.request["provider_note"] = state.error

    async def _wait(self, record: Record, provider: Provider, wait: float, progress: ProgressFn | None,
                    outcome: Outcome, *, poll_now: bool) -> JobState | None:
        """Polls until the job is final or `wait` seconds pass; returns the last state seen (None: none)."""
        schedule = PollSchedule(expected=self.journal.typical_duration(record.provider, record.model))
        start = time.monotonic()
        deadline = start + wait
        state: JobState | None = None
        poll_error: str | None = None
        last_progress = 0.0
        first = poll_now
        while True:
            now = time.monotonic()
            delay = 0.0 if first else schedule.next_delay(time.time() - record.created_at)
            if not first and now + delay > deadline:
                break
            first = False
            # Sleep in slices so progress notifications keep flowing (and keep client timeouts alive).
            wake = now + delay
            while (remaining := wake - time.monotonic()) > 0:
                await anyio.sleep(min(remaining, _PROGRESS_EVERY))
                if progress and time.monotonic() - last_progress >= _PROGRESS_EVERY - 0.01:
                    last_progress = time.monotonic()
                    await progress(round(time.monotonic() - start, 1), wait, f"{record.provider}: "
                                   f"{(state.status if state else record.status)} ({time.monotonic() - start:.0f}s)")
            try:
                asked = time.time()
                state = await provider.poll(record.native_id, record.created_at)
                poll_error = None
            except ProviderUnavailable as exc:
                poll_error = f"The last status check failed: {exc}"
                log.warning("poll %s: %s", record.id, exc)
                continue
            except ProviderError as exc:
                # Not transient (e.g. the key was revoked): stop waiting, keep the job and its id.
                poll_error = f"The status check failed: {exc}"
                log.warning("poll %s: %s", record.id, exc)
                break
            if state.status in FINAL:
                # The job was done by the time it was asked about: the journal learns that moment, not the
                # moment the answer arrived (which would add a round trip to every learned duration).
                outcome.seen_at = asked
                break
            if progress:
                last_progress = time.monotonic()
                await progress(round(time.monotonic() - start, 1), wait,
                               f"{record.provider}: {state.status} ({time.monotonic() - start:.0f}s)")
        outcome.waited = time.monotonic() - start
        if poll_error:
            outcome.notes.append(poll_error)
        return state

    async def _materialize(self, record: Record, provider: Provider, state: JobState | None, paths: PathPolicy,
                           outcome: Outcome, *, journaled: bool = True) -> None:
        """Keeps a local copy of every output (and the save_to copies); a failed download keeps the URL."""
        host = urlsplit(provider.settings.base_url).hostname
        trusted = frozenset({host.lower()}) if host else frozenset()
        targets = [Path(t) for t in (record.request.get("save_to") or [])]
        count = len(state.outputs) if state else len(record.outputs)
        slots: list[tuple[ImageOutput, str | None]] = [(ImageOutput(), None)] * count
        overwrite = bool(record.request.get("overwrite"))

        async def one(i: int) -> None:
            ref = state.outputs[i] if state else None
            url = ref.url if ref else record.outputs[i]
            kept = self.store.existing(record.id, i) if state is None else None
            target = targets[i] if i < len(targets) else None
            try:
                if ref and ref.data is not None:
                    data = ref.data
                elif kept is not None:
                    data = kept.read_bytes()
                else:
                    data = await self._download(url, trusted)
                keep = functools.partial(self._keep_one, record, i, data, url, kept, target, paths, overwrite)
                if kept is None and light_work(data, target.suffix.lstrip(".") if target else None):
                    image, problem, written = keep()
                else:
                    # Decoding, re-encoding or much data: CPU and disk work kept off the event loop.
                    image, problem, written = await anyio.to_thread.run_sync(keep)
                slots[i] = (image, problem)
                if image.path and written is not None:
                    outcome.kept[image.path] = written
            except DownloadFailed as exc:
                slots[i] = (ImageOutput(url=url), f"image {i + 1}: {exc}")
            except OSError as exc:  # the disk, not the image: full, read-only, gone
                slots[i] = (ImageOutput(url=url), f"image {i + 1} could not be written to disk ({exc.strerror or exc})")

        if count == 1 or (state is not None and all(o.data is not None for o in state.outputs)):
            for i in range(count):  # nothing to download: no concurrency to gain
                await one(i)
        else:
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
        images = [image for image, _ in slots]
        problems = [problem for _, problem in slots if problem]
        record.images = images
        note = record.request.get("provider_note")
        if problems:
            record.error = self.redactor.scrub(
                "; ".join(([note] if note else []) + problems) + ". The job succeeded; call check_prediction "
                + ("again to retry the download while the provider URL is valid." if any(i.url for i in images)
                   else "again to fetch the images anew.")
            )
        elif record.status == "succeeded":
            record.error = note
        if record.status == "succeeded" and not images:
            record.status = "failed"
            record.error = record.error or f"{provider.label} reported success but returned no image."
        if journaled:
            self.journal.update(record)
        else:
            record.updated_at = time.time()
            self.journal.add(record)

    def _keep_one(self, record: Record, i: int, data: bytes, url: str | None, kept: Path | None,
                  target: Path | None, paths: PathPolicy, overwrite: bool
                  ) -> tuple[ImageOutput, str | None, bytes | None]:
        """Checks one image, keeps it in the data folder and writes its save_to copy. Returns the image,
        a problem with its save_to copy if any, and the bytes now at the image's path (None: not read)."""
        info = inspect_image(data)
        provenance = {"prompt": record.request.get("prompt", ""), "model": record.model,
                      "provider": record.provider, "prediction_id": record.id,
                      "seed": str(record.request.get("seed")), "software": "flux-mcp"}
        if kept is None:
            path, written = self.store.keep(record.id, i, data, info, provenance)
        else:
            path, written = kept, data
        mime, problem = info.mime_type, None
        if target is not None:
            try:
                path, mime, written = self._save_copy(target, data, info, provenance, paths, overwrite,
                                                      labelled=kept is not None)
            except FluxError as exc:
                problem = f"image {i + 1} was not written to {target}: {exc}"
        image = ImageOutput(url=url, path=str(path), mime_type=mime, width=info.width, height=info.height)
        return image, problem, written

    async def _download(self, url: str | None, trusted: frozenset[str]) -> bytes:
        if not url:
            raise DownloadFailed("the provider gave neither a URL nor the image data")
        if url.startswith("data:"):
            return decode_data_uri(url)
        return await self.downloader.fetch(url, trusted)

    # --- files --------------------------------------------------------------------------------

    def _save_targets(self, paths: PathPolicy, save_to: str | None, count: int, overwrite: bool,
                      prompt: str) -> list[Path]:
        """Decides (and checks, before anything is paid for) where each image will be written."""
        if not save_to:
            return []
        raw = save_to.strip()
        is_folder = raw.endswith(("/", "\\")) or paths.absolute(raw).is_dir() or not Path(raw).suffix
        if is_folder:
            folder = paths.check_write(str(Path(raw) / "x.png")).parent
            stem = _slug(prompt)
            targets = [folder / f"{stem}{'' if i == 0 else f'-{i + 1}'}.png" for i in range(count)]
            if not overwrite:
                # In a folder the server picks the names, so it picks free ones.
                targets = [_free_name(t, taken=set(targets[:i])) for i, t in enumerate(targets)]
        else:
            first = paths.check_write(raw)
            ext = first.suffix.lower().lstrip(".")
            if ext not in FORMATS:
                raise InvalidInput(f"save_to must end in .png, .jpg, .jpeg or .webp (got {first.name!r}).")
            targets = [first if i == 0 else first.with_name(f"{first.stem}-{i + 1}{first.suffix}")
                       for i in range(count)]
        for t in targets:
            paths.check_write(str(t))
            if t.exists() and not overwrite:
                raise PathNotAllowed(f"{paths.display(t)} already exists. Pass overwrite=true to replace it, or "
                                     "choose another save_to.")
            if t.exists() and not t.is_file():
                raise PathNotAllowed(f"{t} exists and is not a regular file.")
        return targets

    def _save_copy(self, target: Path, data: bytes, info, provenance: dict[str, str], paths: PathPolicy,
                   overwrite: bool, *, labelled: bool = False) -> tuple[Path, str, bytes]:
        from .media import atomic_write, sweep_save_folder_once

        checked = paths.check_write(str(target))
        ext = checked.suffix.lower().lstrip(".") or "png"
        payload = convert(data, info, ext, provenance, labelled=labelled)
        atomic_write(checked, payload, overwrite=overwrite)
        sweep_save_folder_once(checked.parent)  # temp files a killed process left next to the user's files
        return checked, FORMATS[ext][1], payload

    async def _image_input(self, provider: Provider, image: str, paths: PathPolicy) -> str:
        """Turns edit_image's `image` into what the provider accepts: a URL, an upload, or a data: URI."""
        text = image.strip()
        if text.startswith(("http://", "https://")):
            return text
        if text.startswith("data:"):
            data = decode_data_uri(text)
            name = "image"
        else:
            resolved, data = paths.read_bytes(text)
            name = resolved.name
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            raise InvalidInput(f"`image` is not a usable image: {exc}.") from None
        if provider.can_upload:
            url, _ = await self._upload_bytes(provider, data, f"{Path(name).stem}.{info.ext}", info.mime_type)
            return url
        if provider.accepts_data_uri:
            return to_data_uri(data, info.mime_type)
        raise UnsupportedOperation(
            f"{provider.label} takes input images only as public http(s) URLs and has no upload API here. Pass a "
            "public URL as `image`, or use a provider that accepts local files: "
            + ", ".join(p.id for p in self.providers.values() if (p.can_upload or p.accepts_data_uri) and p.can_edit
                        and p.configured and p.id != "placeholder") + "."
        )

    async def _upload_bytes(self, provider: Provider, data: bytes, filename: str, mime: str) -> tuple[str, bool]:
        digest = hashlib.sha256(data).hexdigest()
        cached = self.journal.upload_url(digest, provider.id, UPLOAD_REUSE_SECONDS)
        if cached:
            return cached, True
        url = await provider.upload(data, filename, mime)
        self.journal.add_upload(digest, provider.id, url)
        return url, False

    async def upload(self, path: str, provider_name: str | None, paths: PathPolicy) -> UploadResult:
        inflight.refuse_new()
        provider = self.provider(provider_name, need="upload")
        resolved, data = paths.read_bytes(path)
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            raise InvalidInput(f"{resolved.name} is not an image this server uploads: {exc}.") from None
        url, reused = await self._upload_bytes(provider, data, resolved.name, info.mime_type)
        return UploadResult(provider=provider.id, url=url, path=str(resolved), mime_type=info.mime_type,
                            size_bytes=len(data), reused=reused)


class _HeldProgress:
    """Progress notifications every few seconds while a held submit is open (they keep client timeouts
    alive). Timer callbacks on the running asyncio loop rather than a task group per call: a call that
    ends before the first tick (the usual case) costs a timer, not a task."""

    def __init__(self, provider_id: str, progress: ProgressFn, wait: float):
        self._loop = asyncio.get_running_loop()
        self._start = time.monotonic()
        self._provider_id, self._progress, self._wait = provider_id, progress, wait
        self._sending: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(_PROGRESS_EVERY, self._tick)

    def _tick(self) -> None:
        elapsed = time.monotonic() - self._start
        task = self._loop.create_task(
            self._progress(round(elapsed, 1), self._wait, f"{self._provider_id}: processing ({elapsed:.0f}s)"))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        self._timer = self._loop.call_later(_PROGRESS_EVERY, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _light(state: JobState, save_targets: list[Path]) -> bool:
    """A success whose images all came inline and are kept without a thread (see images.light_work)."""
    return (state.status == "succeeded" and not save_targets and bool(state.outputs)
            and all(o.data is not None and light_work(o.data) for o in state.outputs))


def _missing_files(record: Record) -> bool:
    """A success whose images are not all on disk (or were never kept: the process stopped first)."""
    return record.status == "succeeded" and (len(record.images) < max(len(record.outputs), 1) or any(
        i.path is None or not Path(i.path).is_file() for i in record.images))


def _short_input(image: str | None) -> str | None:
    if image is None:
        return None
    return image if not image.startswith("data:") else f"data: URI ({len(image)} chars)"


def _slug(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())[:6]
    return "-".join(words)[:60] or "image"


def _free_name(target: Path, taken: set[Path]) -> Path:
    candidate, n = target, 2
    while candidate.exists() or candidate in taken:
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return candidate


__all__ = ["FluxService", "JobParams", "Outcome", "ProgressFn", "ProviderError"]
