"""Atlas Cloud: asynchronous FLUX jobs, polled by id.

The wire, as this adapter relies on it:

* Base `https://api.atlascloud.ai`, every call with `Authorization: Bearer <ATLASCLOUD_API_KEY>`.
* `POST /api/v1/model/generateImage` takes a flat JSON body `{model, prompt, size: "W*H", num_images
  (1-4), seed (-1 = random), ...}` — one page also shows the fields nested under `input`, but the
  official clients all send them flat. Only fields in the model's schema are sent: `num_inference_steps`
  and `guidance_scale` exist on dev/kontext models, not on schnell. Edits are the same endpoint with an
  `image` (URL, base64 or data: URI).
* The answer is normally the envelope `{code, data: {id, status}}`; pages also show the id at the top
  level or as `predictionId`, so all of these are read.
* `GET /api/v1/model/prediction/{id}` answers the same envelope (or the bare prediction). Status words:
  `created`, `starting`, `queued`, `processing` (pending); `completed`, `succeeded`, `success` (done);
  `failed`, `error`, `timeout`, `canceled`/`cancelled`. Results are `outputs` (one page: `output`),
  strings or objects with `url`/`download_url`/`image`/`output`. A job can complete with no outputs
  and `has_nsfw_contents` set: the content filter blocked it. A failed job comes back as HTTP 5xx with
  the verdict in the body (`data.status: failed`, `data.error` a string or an object, optional
  `data.error_code`). A new id can answer 400/404 for about 30 seconds after submit.
* `price` is the run's cost in USD. Documented prices per run: schnell $0.003, dev $0.012, kontext-dev
  $0.025, kontext-dev-lora $0.03.
* Sync mode (`enable_sync_mode`, documented for flux-schnell) holds the submit open until the image is
  made; with `enable_base64_output` the results come back as base64 (whether raw or as data: URIs is
  not documented, so both are read). On the upstream it derives from, a sync wait that times out
  leaves the job running: an early "processing" answer is polled like any other job.
* `POST /api/v1/model/uploadMedia`, multipart part `file`, answers the file's URL as
  `data.download_url` (other pages: `download_url`, `data.url`, `url`); uploaded files are temporary.
* `GET /api/v1/model/history?no=&size=&model=&status=&sessionID=` lists the jobs made with the key,
  newest first: `{code, data: {items: [{ID, createdAt, model, requestBody, result, status}], pageNo,
  pageSize, total}}`. `no` is the 1-based page, `size` 1-50 rows, `model` an exact model id, `sessionID`
  one job's id. `createdAt` is in epoch seconds; `requestBody` is the submit's JSON body as sent (a
  string of JSON; an object is read too). Listing is free and creates nothing. Its retries are those of
  any GET. This adapter pages back to a moment (a job that appears while it reads only pushes older
  rows down, so a row may be seen twice and none is skipped) and matches a body field for field.
* Errors: 401 bad key, 402 (or a message about "insufficient"/"balance") no balance, 403 no
  permission, 404 unknown id, 422 invalid parameters, 429 rate limited (no rate-limit headers are
  documented), 5xx server error or failed job. The message is under `msg`, `message` or `error`.
  The official client never retries a POST: it is billed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated, Any

import httpx2
from pydantic import AliasChoices, BeforeValidator, Field

from ..errors import (
    FluxError,
    InsufficientCredits,
    ProviderRejected,
    ProviderUnavailable,
    SubmitOutcomeUnknown,
)
from ..http import CLIENT_ERROR, MAX_API_BYTES, AnswerTooLarge, ErrorRule, Phase, ProviderHttp
from ..models import Status
from .base import ImageRequest, JobState, ModelInfo, Provider, Range, SubmitLookup, Submitted
from .registry import ATLASCLOUD
from .wire import Loose, Text, UnusableOutput, WireModel, finished, first_string, read, resolve_output

log = logging.getLogger("flux_mcp.providers.atlascloud")
CATALOGUE_TTL = 3600.0
"""Seconds the catalogue's prices are trusted before it is read again."""

if TYPE_CHECKING:
    from ..config import ProviderSettings

_STATUS: dict[str, Status] = {
    "created": "starting", "starting": "starting", "queued": "starting", "pending": "starting",
    "processing": "processing", "running": "processing", "in_progress": "processing",
    "completed": "succeeded", "succeeded": "succeeded", "success": "succeeded",
    "failed": "failed", "error": "failed", "timeout": "failed",
    "canceled": "canceled", "cancelled": "canceled",
}
_SIZE = Range(256, 1536)
"""Atlas does not document size limits; these are the WaveSpeed FLUX schema bounds its models derive from."""
_WARMUP_GRACE = 30.0
"""A new prediction can answer 400/404 for a short while after submit (the ComfyUI client's grace period)."""
HELD_SECONDS = 300.0
"""How long a sync-mode submit may stay open. Far beyond any schnell job: giving up on a held submit
would lose the job's id (it may be charged), so only a dead connection ends it early."""
_OFF = ("off", "false", "0", "no")
_REMEMBERED = 4096
"""How many ids of jobs whose answers carry base64 images are remembered (for their larger status cap)."""

HISTORY_PAGE = 50
"""Rows per history page: the most the official client asks for."""
HISTORY_PAGES = 20
"""The most history pages read back for one lookup; a window deeper than that is not told."""
HISTORY_SLACK = 30.0
"""Seconds the window is widened by on each side: `createdAt` is the provider's clock, in whole seconds."""

_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(InsufficientCredits, "Atlas Cloud says the balance is insufficient ({detail}). Top up at "
              "atlascloud.ai, or use another provider.", status=CLIENT_ERROR, pattern="insufficient|balance"),
    ErrorRule(ProviderRejected, "Atlas Cloud rejected the parameters (HTTP 422: {detail}). Adjust them and "
              "call again.", status=422),
)
"""Atlas Cloud's documented error answers; the rest are the shared ones (401, 402, 403, 429, 5xx)."""


# --- the answers, as read ------------------------------------------------------------------------

Output = Annotated[str | None, BeforeValidator(first_string("url", "download_url", "image", "output"))]


class _Error(WireModel):
    message: Text = Field(None, validation_alias=AliasChoices("message", "msg", "error", "detail", "reason"))


class _Prediction(WireModel):
    id: Text = Field(None, validation_alias=AliasChoices("id", "predictionId"))
    status: str | None = None
    outputs: list[Output] | Output = Field(None, validation_alias=AliasChoices("outputs", "output"))
    error: Loose[str | _Error] = None
    error_code: Loose[int | str] = None
    message: Text = Field(None, validation_alias=AliasChoices("message", "msg"))
    price: Loose[float] = None
    has_nsfw_contents: Loose[bool | list[Loose[bool]]] = None


class _Listed(WireModel):
    model: Text = None
    price: Loose[float] = None


class _Catalogue(WireModel):
    """`GET /api/v1/models`: `{code, data: [{model, type, schema, price, ...}]}`."""

    data: list[Loose[_Listed]] = Field(default_factory=list)


class _Answer(_Prediction):
    """A submit or status answer: the `{code, data}` envelope, or the prediction itself."""

    data: _Prediction | None = None

    @property
    def prediction(self) -> _Prediction:
        return self.data or self

    @property
    def native_id(self) -> str | None:
        return (self.data.id if self.data else None) or self.id


class _UploadData(WireModel):
    url: Text = Field(None, validation_alias=AliasChoices("download_url", "url"))


class _Upload(_UploadData):
    data: Loose[_UploadData] = None


class _HistoryItem(WireModel):
    id: Text = Field(None, validation_alias=AliasChoices("ID", "id", "predictionId"))
    created_at: Loose[float] = Field(None, validation_alias=AliasChoices("createdAt", "created_at"))
    model: Text = None
    request_body: Loose[str | dict[str, Any]] = Field(None, validation_alias=AliasChoices("requestBody",
                                                                                         "request_body"))
    status: Text = None

    def body(self) -> dict[str, Any] | None:
        """The submit's body as the provider kept it (None: not readable)."""
        raw = self.request_body
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                return None
        return raw if isinstance(raw, dict) else None

    def when(self) -> float | None:
        """`createdAt` in epoch seconds (a value in milliseconds is read as such)."""
        at = self.created_at
        return None if at is None else at / 1000 if at > 1e11 else at


class _HistoryPage(WireModel):
    items: list[Loose[_HistoryItem]] = Field(default_factory=list)
    page_size: Loose[int] = Field(None, validation_alias=AliasChoices("pageSize", "page_size"))
    total: Loose[int] = None


class _History(WireModel):
    """`GET /api/v1/model/history`: `{code, data: {items, pageNo, pageSize, total}}`."""

    data: _HistoryPage | None = None


class _Found:
    """The history of a window: each job's id with the body it was created with (`SubmitLookup`)."""

    def __init__(self, adapter: AtlasCloud, models: Collection[str], jobs: list[tuple[str, dict[str, Any]]]):
        self._adapter = adapter
        self._models = frozenset(models)
        self._jobs = jobs

    def created_by(self, req: ImageRequest) -> list[str] | None:
        if req.model not in self._models or (req.image and not req.image.startswith(("http://", "https://"))):
            return None  # not looked up; or the input was sent as an upload or inline data the journal lacks
        bodies = [self._adapter.body(req)]
        info = self._adapter.model_info(req.model)
        if info is not None and info.answers_inline:  # held or polled (the journal keeps no choice): either
            bodies.append(self._adapter.body(req, inline=True))
        return [job for job, body in self._jobs if body in bodies]


class AtlasCloud(Provider):
    spec = ATLASCLOUD
    # No typical durations: Atlas Cloud's pages show one sample finished job (10 s, 8.3 s of it inference),
    # the same template on every model's page, so it says nothing about any one model. The LoRA variants
    # have no canonical name: they are the base models plus LoRA weights only Atlas Cloud takes here.
    models = (
        ModelInfo("black-forest-labs/flux-schnell", frozenset({"generate", "edit"}),
                  "FLUX.1 [schnell]: fastest, 1-4 steps; edits as image-to-image with `image`.",
                  size=_SIZE, max_images=4, price_usd=0.003, answers_inline=True, canonical="flux-schnell"),
        ModelInfo("black-forest-labs/flux-dev", frozenset({"generate", "edit"}),
                  "FLUX.1 [dev]: higher quality; image-to-image with `image`.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(0, 20), max_images=4, price_usd=0.012,
                  canonical="flux-dev"),
        ModelInfo("black-forest-labs/flux-dev-lora", frozenset({"generate"}),
                  "FLUX.1 [dev] with LoRA support.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(0, 20), max_images=4),
        ModelInfo("black-forest-labs/flux-kontext-dev", frozenset({"edit"}),
                  "FLUX.1 Kontext [dev]: instruction-based editing of an input image.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(1, 20), max_images=4, requires_image=True,
                  price_usd=0.025, canonical="flux-kontext-dev", key_background=frozenset({"edit"})),
        ModelInfo("black-forest-labs/flux-kontext-dev-lora", frozenset({"edit"}),
                  "FLUX.1 Kontext [dev] with LoRA support.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(1, 20), max_images=4, requires_image=True,
                  price_usd=0.03, key_background=frozenset({"edit"})),
        ModelInfo("wavespeed-ai/flux-schnell", frozenset({"generate"}),
                  "FLUX.1 [schnell] served by WaveSpeed.", size=_SIZE, max_images=4, canonical="flux-schnell"),
    )
    default_model = "black-forest-labs/flux-schnell"
    default_edit_model = "black-forest-labs/flux-kontext-dev"
    can_upload = True
    accepts_data_uri = True
    finds_submitted = True

    def __init__(self, settings: ProviderSettings, http: ProviderHttp):
        super().__init__(settings, http)
        self._inline_ids: dict[str, None] = {}
        self._catalogue: dict[str, float] = {}
        """Model id -> the catalogue's price per run (USD), once read."""
        self._catalogue_read = -CATALOGUE_TTL
        """Jobs whose status answers carry base64 images, so they may be as large as a submit's answer."""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key()}", "Accept": "application/json"}

    def answers_inline(self, model: str | None) -> bool:
        # Sync mode is documented for flux-schnell only; ATLASCLOUD_SYNC_MODE=off opts out.
        sync_mode = self.settings.extra.get("sync_mode", "auto").lower()
        return super().answers_inline(model) and sync_mode not in _OFF

    def body(self, req: ImageRequest, *, inline: bool = False) -> dict[str, Any]:
        """The flat request body: only the fields the model's schema has."""
        info = self.model_info(req.model)
        body: dict[str, Any] = {
            "model": req.model,
            "prompt": req.prompt,
            "size": f"{req.width}*{req.height}",
            "num_images": req.num_images,
            "seed": req.seed if req.seed is not None else -1,
            # Inline: the answer carries the images themselves, so no download from a second host follows.
            "enable_base64_output": inline,
        }
        if inline:
            body["enable_sync_mode"] = True
        if (info is None or info.steps is not None) and req.steps is not None:
            body["num_inference_steps"] = req.steps
        if (info is None or info.guidance is not None) and req.guidance_scale is not None:
            body["guidance_scale"] = req.guidance_scale
        if req.image:
            body["image"] = req.image
        return body

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        url = f"{self.base_url}/api/v1/model/generateImage"
        response = await self.http.submit("POST", url, headers=self._headers(), json=self.body(req, inline=inline),
                                          held=HELD_SECONDS if inline else None)
        answer = read(_Answer, response)
        native = answer.native_id if answer else None
        if response.status_code >= 300:
            # A held submit whose job then failed answers like a failed poll: HTTP 5xx, the verdict in it.
            if inline and answer and native and self._word(answer.prediction) in ("failed", "canceled"):
                return Submitted(native_id=native, state=self._state(answer.prediction))
            raise self._error(response, "submit")
        if answer is None or not native:
            raise SubmitOutcomeUnknown(
                f"Atlas Cloud accepted the request (HTTP {response.status_code}) but its answer has no "
                "readable prediction id, so this server cannot follow the job. It may have been created and "
                "charged: check the Atlas Cloud dashboard's history before asking again."
            )
        if inline:
            self._remember_inline(native)
        try:
            state = self._state(answer.prediction) if answer.prediction.status else None
        except ProviderUnavailable:
            state = None  # an unknown status word must not lose the id: polling will tell
        if state is not None and state.status in ("starting", "processing"):
            state = None  # not done (a sync-mode wait can end early on Atlas's side): poll
        return Submitted(native_id=native, state=state)

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        url = f"{self.base_url}/api/v1/model/prediction/{native_id}"
        try:
            cap = MAX_API_BYTES if native_id in self._inline_ids else None
            response = await self.http.fetch("GET", url, headers=self._headers(), max_bytes=cap)
        except AnswerTooLarge as exc:
            if native_id in self._inline_ids:
                raise
            # Asked with base64 output before this process started: the images are in the answer.
            self._remember_inline(native_id)
            raise AnswerTooLarge(f"{exc} Its answer may hold the images themselves (base64 output), so the "
                                 f"next check reads up to {MAX_API_BYTES} bytes.") from None
        answer = read(_Answer, response)
        if answer is not None and answer.prediction.status is not None:
            # A failed task comes back as HTTP 5xx with its verdict in the body: the verdict wins.
            return self._state(answer.prediction)
        if response.status_code in (400, 404) and time.time() - submitted_at < _WARMUP_GRACE:
            return JobState(status="starting")
        if response.status_code < 300:
            raise ProviderUnavailable("Atlas Cloud's status answer could not be read; the job is kept, check "
                                      "again.")
        raise self._error(response, "poll")

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        url = f"{self.base_url}/api/v1/model/uploadMedia"
        # Uploading is free and creates no job; still, it is sent once (a new URL each time).
        response = await self.http.submit("POST", url, headers=self._headers(),
                                          files={"file": (filename, data, mime_type)})
        answer = read(_Upload, response)
        if response.status_code >= 400 or answer is None:
            raise self._error(response, "upload")
        found = (answer.data.url if answer.data else None) or answer.url
        try:
            ref = resolve_output(found or "", self.base_url, inline=False)
        except UnusableOutput:
            ref = None
        if ref is None or ref.url is None:
            raise ProviderUnavailable("Atlas Cloud accepted the upload but returned no file URL; try again.")
        return ref.url

    async def find_submitted(self, models: Collection[str], since: float, until: float) -> SubmitLookup:
        """Pages the history of each model back to `since` (newest first), keeping the jobs created between
        `since` and `until` (each widened by HISTORY_SLACK) with the bodies they were created with."""
        low, high = since - HISTORY_SLACK, until + HISTORY_SLACK
        jobs: dict[str, tuple[str, dict[str, Any]]] = {}
        for model in sorted(set(models)):
            for page in range(1, HISTORY_PAGES + 1):
                items, size, total = await self._history_page(model, page)
                for item in items:
                    at, body = item.when(), item.body()
                    if item.id and at is not None and low <= at <= high and body is not None \
                            and body.get("model") == model:
                        jobs[item.id] = (item.id, body)
                if len(items) < size or (total is not None and page * size >= total) \
                        or min(item.when() or 0.0 for item in items) < low:
                    break  # the last page, or one that reaches back past the window
            else:
                raise ProviderUnavailable(f"Atlas Cloud's history holds more than {HISTORY_PAGES * HISTORY_PAGE} "
                                          f"{model} jobs since the moment looked for; it was not read further.")
        return _Found(self, models, list(jobs.values()))

    async def _history_page(self, model: str, page: int) -> tuple[list[_HistoryItem], int, int | None]:
        """One page of the model's history: its rows (each with a readable time), the page size the provider
        used (it may cap the one asked for) and the total."""
        response = await self.http.fetch("GET", f"{self.base_url}/api/v1/model/history", headers=self._headers(),
                                         params={"no": page, "size": HISTORY_PAGE, "model": model})
        if response.status_code >= 300:
            raise self._error(response, "poll")
        answer = read(_History, response)
        if answer is None or answer.data is None:
            raise ProviderUnavailable("Atlas Cloud's history answer could not be read.")
        items = [item for item in answer.data.items if item is not None]
        if any(item.when() is None for item in items):
            raise ProviderUnavailable("Atlas Cloud's history answer has rows without a readable createdAt.")
        size = answer.data.page_size if answer.data.page_size and answer.data.page_size > 0 else HISTORY_PAGE
        return items, size, answer.data.total

    # --- the one mapping to the shared state ----------------------------------------------------

    def _state(self, pred: _Prediction) -> JobState:
        """A prediction as the shared job state; an unknown status word is an error, never a guess."""
        raw = self._word(pred)
        status = _STATUS.get(raw)
        if status is None:
            raise ProviderUnavailable(f"Atlas Cloud reported an unknown status {raw!r}; try check_prediction "
                                      "later.")
        if status == "succeeded":
            values = pred.outputs if isinstance(pred.outputs, list) else [pred.outputs]
            nsfw = pred.has_nsfw_contents
            flagged = nsfw is True or (isinstance(nsfw, list) and any(x is True for x in nsfw))
            empty = ("the image was blocked by Atlas Cloud's content-safety filter; rephrase the prompt"
                     if flagged else "Atlas Cloud reported the job completed but returned no image")
            state = finished(self.label, [v for v in values if v], self.base_url, inline=True, empty=empty,
                             cost_usd=pred.price)
            if state.error_code == "no_output" and flagged:
                state.error_code = "content_filtered"
            return state
        if status in ("failed", "canceled"):
            error = pred.error
            text = (error if isinstance(error, str) else error.message if error else None) or pred.message
            return JobState(status=status, error=self.http.redactor.scrub(text or status),
                            error_code=str(pred.error_code) if pred.error_code is not None else None,
                            cost_usd=pred.price)
        return JobState(status=status)

    @staticmethod
    def _word(pred: _Prediction) -> str:
        return (pred.status or "").strip().lower()

    def _error(self, response: httpx2.Response, phase: Phase) -> Exception:
        return self.http.error_for(response, _ERRORS, phase=phase)

    async def refresh_prices(self) -> None:
        """The catalogue (`GET /api/v1/models`, no key needed) lists each model with its current `price` in
        USD per run: read at most once an hour; an answer that cannot be read keeps the documented prices."""
        if time.monotonic() - self._catalogue_read < CATALOGUE_TTL:
            return
        self._catalogue_read = time.monotonic()
        try:
            response = await self.http.fetch("GET", f"{self.base_url}/api/v1/models",
                                             headers={"Accept": "application/json"})
        except FluxError as exc:
            log.info("Atlas Cloud's catalogue was not read (%s); documented prices apply", type(exc).__name__)
            return
        catalogue = read(_Catalogue, response) if response.status_code < 300 else None
        if catalogue is None:
            return
        self._catalogue = {m.model: m.price for m in catalogue.data
                           if m is not None and m.model and m.price is not None and m.price >= 0}

    def listed_price(self, model: str | None) -> float | None:
        return self._catalogue.get(model or "")

    def _remember_inline(self, native_id: str) -> None:
        self._inline_ids[native_id] = None
        while len(self._inline_ids) > _REMEMBERED:
            del self._inline_ids[next(iter(self._inline_ids))]
