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
* Errors: 401 bad key, 402 (or a message about "insufficient"/"balance") no balance, 403 no
  permission, 404 unknown id, 422 invalid parameters, 429 rate limited (no rate-limit headers are
  documented), 5xx server error or failed job. The message is under `msg`, `message` or `error`.
  The official client never retries a POST: it is billed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import httpx2
from pydantic import AliasChoices, BeforeValidator, Field

from ..errors import InsufficientCredits, ProviderRejected, ProviderUnavailable, SubmitOutcomeUnknown
from ..http import CLIENT_ERROR, MAX_API_BYTES, AnswerTooLarge, ErrorRule, Phase, ProviderHttp
from ..models import Status
from .base import ImageRequest, JobState, ModelInfo, Provider, Range, Submitted
from .registry import ATLASCLOUD
from .wire import Loose, Text, UnusableOutput, WireModel, finished, first_string, read, resolve_output

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

    def __init__(self, settings: ProviderSettings, http: ProviderHttp):
        super().__init__(settings, http)
        self._inline_ids: dict[str, None] = {}
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

    def _remember_inline(self, native_id: str) -> None:
        self._inline_ids[native_id] = None
        while len(self._inline_ids) > _REMEMBERED:
            del self._inline_ids[next(iter(self._inline_ids))]
