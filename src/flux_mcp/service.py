"""The facade the tools and the CLI call: choose a provider, run a job, check one, upload a file.

Everything about a job's life (submit once, journal, wait, settle, keep) is in `jobs.JobRunner`;
keeping images is in `keep`; the journal and the image store are behind the `Journal` and
`ImageStore` protocols. What is here is the part that needs the whole server's view: which
providers exist and are configured, what a request resolves to, and the checks made before paying.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import httpx2

from .config import Settings
from .errors import (
    ConfigError,
    DownloadFailed,
    InvalidInput,
    ProviderError,
    UnknownPrediction,
    UnsupportedOperation,
)
from .http import LazyClient, ProviderHttp, RetryPolicy
from .jobs import JobRunner, Outcome, ProgressFn
from .journal import Journal
from .keep import Keeper, save_targets
from .media import Downloader, decode_data_uri, inspect_image, to_data_uri
from .models import FINAL, UploadResult
from .paths import PathPolicy
from .providers import Provider, registry
from .redact import Redactor
from .request import JobRequest
from .shared import LOCAL, UPLOAD_REFUSED, check_job_inputs
from .store import FolderStore, ImageStore

log = logging.getLogger("flux_mcp.service")

UPLOAD_REUSE_SECONDS = 3600.0
"""Uploaded files are temporary on the providers; a cached upload URL is reused for an hour."""
_PREDICTION_ID = re.compile(r"^[a-z]{2,20}:[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class FluxService:
    """Holds the providers, the journal, the image store and the job runner; one per server process."""

    def __init__(self, settings: Settings, client: httpx2.AsyncClient | LazyClient, journal: Journal, *,
                 store: ImageStore | None = None, redactor: Redactor | None = None,
                 retry: RetryPolicy | None = None, downloader: Downloader | None = None):
        self.settings = settings
        self.client = client
        self.journal = journal
        self.store: ImageStore = store or FolderStore(settings.home)
        self.redactor = redactor or Redactor(settings.secrets())
        self.providers: dict[str, Provider] = {}
        for spec in registry.SPECS:
            cls = spec.load()
            http = ProviderHttp(client, cls.id, self.redactor, key_env=cls.key_env, retry=retry)
            self.providers[cls.id] = cls(settings.providers[cls.id], http)
        self.runner = JobRunner(journal, self.store, Keeper(self.store, downloader or Downloader(client)),
                                self.redactor)

    # --- choosing a provider ------------------------------------------------------------------

    def default_provider_id(self) -> str:
        """FLUX_MCP_PROVIDER, else the first provider with a key, else the offline placeholder."""
        return registry.default_provider(self.settings)

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

    # --- generate / edit / check ---------------------------------------------------------------

    async def run(self, req: JobRequest, paths: PathPolicy, progress: ProgressFn | None = None, *,
                  principal: str = LOCAL) -> Outcome:
        """Runs a generate or edit job for `principal`: everything that can be checked is checked before paying."""
        provider = self.provider(req.provider, need="edit" if req.kind == "edit" else None)
        if self.settings.shared:
            check_job_inputs(req.save_to, req.image if req.kind == "edit" else None)
        model = req.model or (provider.default_edit_model if req.kind == "edit" else provider.default_model)
        req = provider.prepare(req.model_copy(update={"provider": provider.id, "model": model}))
        plan = save_targets(paths, req.save_to, req.num_images, req.overwrite, req.prompt)
        source = req.image
        if req.kind == "edit":
            req = req.model_copy(update={"image": await self._image_input(provider, req.image or "", paths)})
        wait = self.wait_for(req.wait_seconds)
        return await self.runner.run(provider, req, plan, wait, paths, progress, image_source=source,
                                     principal=principal)

    async def check(self, prediction_id: str, wait_seconds: float, paths: PathPolicy,
                    progress: ProgressFn | None = None, *, principal: str = LOCAL) -> Outcome:
        pid = prediction_id.strip()
        if not _PREDICTION_ID.match(pid) or ".." in pid:
            raise InvalidInput(
                f"{prediction_id!r} is not a prediction id. Ids look like 'atlascloud:pred_abc123', as returned "
                "by generate_image or edit_image."
            )
        record = await self.journal.get(pid)
        if record is not None and record.principal != principal:
            record = None  # another principal's prediction: answered as one that does not exist
        if record is None:
            raise UnknownPrediction(
                f"No prediction {pid!r} was made by this server (its journal is in {self.settings.home}). Check "
                "the id, or start a new job with generate_image."
            )
        provider = self.providers.get(record.provider)
        if provider is None:
            return Outcome(record, notes=[f"Provider {record.provider!r} is no longer known to this server."])
        if record.status in FINAL and not await self.runner.missing_files(record):
            return Outcome(record)
        if not provider.configured:
            return Outcome(record, notes=[f"Set {provider.key_env} to check on this job again."])
        return await self.runner.check(record, provider, self.wait_for(wait_seconds), paths, progress)

    def wait_for(self, asked: float | None) -> float:
        """How long a call waits: what it asked (else the default), never past FLUX_MCP_MAX_WAIT_SECONDS."""
        return min(self.settings.wait_seconds if asked is None else asked, self.settings.max_wait_seconds)

    # --- files --------------------------------------------------------------------------------

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
        cached = await self.journal.upload_url(digest, provider.id, UPLOAD_REUSE_SECONDS)
        if cached:
            return cached, True
        url = await provider.upload(data, filename, mime)
        await self.journal.add_upload(digest, provider.id, url)
        return url, False

    async def upload(self, path: str, provider_name: str | None, paths: PathPolicy) -> UploadResult:
        provider = self.provider(provider_name, need="upload")
        if self.settings.shared:
            raise InvalidInput(UPLOAD_REFUSED)
        resolved, data = paths.read_bytes(path)
        try:
            info = inspect_image(data)
        except DownloadFailed as exc:
            raise InvalidInput(f"{resolved.name} is not an image this server uploads: {exc}.") from None
        url, reused = await self._upload_bytes(provider, data, resolved.name, info.mime_type)
        return UploadResult(provider=provider.id, url=url, path=str(resolved), mime_type=info.mime_type,
                            size_bytes=len(data), reused=reused)


__all__ = ["FluxService", "Outcome", "ProgressFn", "ProviderError"]
