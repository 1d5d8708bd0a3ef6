"""ImagePipeline: FLUX Schnell through the legacy `generate/v3` endpoint (dedicated servers), and image
edits and uploads through its current job API.

The wire, as this adapter relies on it:

* Base `https://api.imagepipeline.io`; v3 takes the key in `API-Key`, the job API in `X-API-Key`
  (different header names, not a case difference): both are sent.
* `POST /generate/v3` with `prompt`, `samples` (1-4; the server makes **2** when it is left out, so
  it is always sent), `width`/`height` (at most 1536; no minimum or multiple is documented),
  `num_inference_steps` (default 20, no bounds documented), `seed` (-1 = random) and `server_id`.
  FLUX on v3 runs only on dedicated servers, so the server id is in practice required.
* The answer is either final at once — `{status: "SUCCESS", download_urls: [...]}`, one URL per
  sample, maybe without an id — or `{status: "PENDING", id}`, polled at
  `GET /generate/v3/status/{id}` until it is no longer PENDING. A failure is `FAILURE` (docs) or
  `FAILED` (third-party callers) with only a message, under `message`, `error` or `detail`.
* v3 has no model field (any model id would silently run FLUX Schnell), and no edit, upload or
  error-code documentation. The account pays for its dedicated server (test servers $1/hour,
  unlimited images), not per image.
* Edits: `POST /edit/image/v1` with `prompt`, `input_image` (an image URL; the API also takes a list
  of two), `width`/`height` (at most 2048; the source's size when left out), `seed`,
  `num_inference_steps` (1-100), `guidance_scale` (0-20) and more (`refine_strength`,
  `faster_inference`, `mask_segment`, `negative_prompt`, `output_format`: webp by default, jpeg or
  png) that this adapter leaves to their defaults. ImagePipeline does not say which model runs it.
  The answer is a queued job, `{job_id, status: "queued", endpoint, estimated_time_seconds,
  queued_at}`, polled at `GET /edit/image/v1/status/{job_id}` (the job API's status path is always
  the submit path plus `/status/{job_id}`). Status words: `queued`, `pending`, `processing`,
  `completed`, `failed`, `cancelled`. Done: one image, `result_url` (a signed link that expires
  within a day) with `result_mime_type`, the timings, `credits_charged`/`credits_amount` and
  `cost_usd`; failed: `error`, `failure_reason_code` (e.g. `RATE_LIMIT_EXCEEDED`, `INPUT_INVALID`,
  `MODEL_ERROR`, `TIMEOUT`) and `retryable`.
* Uploads: `POST /upload/image/v1`, multipart part `file`, answered `{url, filename, content_type,
  size_bytes}`; the URL is permanent.
* Error answers are read the way the job API documents them: 401 invalid key, 422
  `{"detail": [{"loc": [...], "msg": ...}]}` for invalid fields, 429 with `Retry-After`, and
  otherwise `{error, error_code, message}` with codes such as `INVALID_PARAMETERS`,
  `INSUFFICIENT_BALANCE`, `INSUFFICIENT_CREDITS`, `CREDIT_CHARGE_FAILED`, `NOT_FOUND`.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx2
from pydantic import StrictInt, StrictStr

from ..errors import InsufficientCredits, ProviderRejected, ProviderUnavailable, SubmitOutcomeUnknown
from ..http import CLIENT_ERROR, ErrorRule, Phase
from ..models import Status
from .base import ImageRequest, JobState, ModelInfo, Provider, Range, Submitted
from .registry import IMAGEPIPELINE
from .wire import Loose, Text, UnusableOutput, WireModel, finished, read, resolve_output

PATH = "/generate/v3"
EDIT_PATH = "/edit/image/v1"
UPLOAD_PATH = "/upload/image/v1"
EDIT_MODEL = "edit/image/v1"
"""The edit model's id here is its endpoint: ImagePipeline names no model for it."""
EDIT_PREFIX = "edit:"
"""Native ids of edit jobs carry this prefix (v3 ids have none), so a status check knows its endpoint."""
_JOB_STATUS: dict[str, Status] = {
    "queued": "starting", "pending": "starting", "processing": "processing", "completed": "succeeded",
    "failed": "failed", "cancelled": "canceled", "canceled": "canceled",
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Ids go into a URL path and into the prediction id, so only plain ones are taken from the wire."""
_FAILED = frozenset({"FAILURE", "FAILED"})
_PENDING = frozenset({"starting", "processing"})

_NO_CREDIT = ("ImagePipeline says the account balance is insufficient (HTTP {status}: {code_detail}). Top up "
              "at imagepipeline.io, or use another provider.")
_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(InsufficientCredits, _NO_CREDIT, status=402),
    ErrorRule(InsufficientCredits, _NO_CREDIT,
              code=("INSUFFICIENT_BALANCE", "INSUFFICIENT_CREDITS", "CREDIT_CHARGE_FAILED")),
    ErrorRule(InsufficientCredits, _NO_CREDIT, status=CLIENT_ERROR, pattern="insufficient|balance"),
    ErrorRule(ProviderRejected, "ImagePipeline has no job {job} (HTTP 404: {detail}); its record may have "
              "expired. Start a new job with generate_image.", status=404, phase="poll"),
    ErrorRule(ProviderRejected, "ImagePipeline rejected the request (HTTP {status}: {code_detail}). Adjust "
              "the arguments and call again.{advice}", status=(400, 404, 422), coded=True),
    ErrorRule(ProviderRejected, "ImagePipeline rejected the parameters (HTTP 422: {detail}). Fix them and "
              "call again.{advice}", status=422),
)
"""ImagePipeline's error answers, as the job API documents them; the rest are the shared ones. `advice`
is the hint about IMAGEPIPELINE_SERVER_ID when a refused submit mentions the server."""


class _Detail(WireModel):
    message: Text = None
    error: Text = None
    detail: Text = None

    def reason(self) -> str | None:
        return self.message or self.error or self.detail


class _Answer(WireModel):
    """A submit or status answer: a status word, an id, result URLs or a failure message."""

    status: str | None = None
    id: Loose[StrictStr | StrictInt] = None
    download_urls: list[Loose[str]] | Loose[str] = None
    message: Text = None
    error: Loose[str | _Detail] = None
    detail: Loose[str | _Detail] = None
    error_code: Text = None

    @property
    def word(self) -> str | None:
        return self.status.strip().upper() or None if self.status else None

    @property
    def native_id(self) -> str | None:
        if self.id is None:
            return None
        text = str(self.id).strip()
        return text if _SAFE_ID.match(text) else None

    def reason(self) -> str | None:
        """The failure text: `message`, `error` or `detail` (which one is undocumented)."""
        for value in (self.message, self.error, self.detail):
            text = value if isinstance(value, str) else value.reason() if value else None
            if text and text.strip():
                return text.strip()
        return None


class _Job(WireModel):
    """A job API submit or status answer."""

    job_id: Loose[StrictStr | StrictInt] = None
    status: str | None = None
    result_url: Text = None
    result_mime_type: Text = None
    error: Loose[str | _Detail] = None
    message: Text = None
    failure_reason_code: Text = None
    error_code: Text = None
    retryable: Loose[bool] = None
    cost_usd: Loose[float] = None

    @property
    def native_id(self) -> str | None:
        text = str(self.job_id).strip() if self.job_id is not None else ""
        return EDIT_PREFIX + text if _SAFE_ID.match(text) else None

    def reason(self) -> str | None:
        error = self.error.reason() if isinstance(self.error, _Detail) else self.error
        return (error or "").strip() or self.message


class _Uploaded(WireModel):
    url: Text = None


class ImagePipeline(Provider):
    spec = IMAGEPIPELINE
    models = (
        ModelInfo(
            "flux-schnell", frozenset({"generate"}),
            "FLUX Schnell (ImagePipeline's optimised base model on dedicated servers), text-to-image only; "
            "up to 1536x1536, 1-4 images per call.",
            # Max 1536 is documented; the minimum and any required multiple are not: 256 is our own floor.
            size=Range(256, 1536),
            # num_inference_steps is documented only as "default 20", with no bounds: 1-50 is our own range.
            steps=Range(1, 50),
            max_images=4,
            # Dedicated servers (test servers $1/hour, unlimited images): there is no per-image price.
            price_usd=None,
            # No typical duration is documented for v3.
            canonical="flux-schnell",
        ),
        ModelInfo(
            EDIT_MODEL, frozenset({"edit"}),
            "ImagePipeline's image-editing job API (ImagePipeline does not say which model runs it): changes "
            "an input image following the prompt; up to 2048x2048, steps 1-100, guidance_scale 0-20.",
            # At most 2048 is documented; no minimum: 256 is our own floor, as for v3.
            size=Range(256, 2048), steps=Range(1, 100), guidance=Range(0, 20), max_images=1,
            requires_image=True,
            # Billed in credits (one per job in the documented example); the USD price is not published.
            price_usd=None,
            # The job API's documented sample submit answer estimates 8 s for the job.
            typical_seconds=8.0,
        ),
    )
    default_model = "flux-schnell"
    default_edit_model = EDIT_MODEL
    can_upload = True
    allow_unknown_models = False
    """v3 takes no model field: any other model id would silently run FLUX Schnell."""

    @property
    def server_id(self) -> str | None:
        return self.settings.extra.get("server_id")

    def _headers(self) -> dict[str, str]:
        # v3 documents `API-Key`; the newer job API uses `X-API-Key`. Sending both is harmless.
        key = self.key()
        return {"API-Key": key, "X-API-Key": key, "Accept": "application/json"}

    def body(self, req: ImageRequest) -> dict[str, Any]:
        """The v3 request body. `samples` is always sent: left out, the server makes 2 images.

        `num_inference_steps` is sent only when asked for; otherwise the server uses its default (20).
        """
        body: dict[str, Any] = {
            "prompt": req.prompt,
            "samples": req.num_images,
            "width": req.width,
            "height": req.height,
            "seed": req.seed if req.seed is not None else -1,
        }
        if req.steps is not None:
            body["num_inference_steps"] = req.steps
        if self.server_id:
            body["server_id"] = self.server_id
        return body

    def edit_body(self, req: ImageRequest) -> dict[str, Any]:
        """The job API's edit body: what was asked, the rest left to the API's defaults."""
        body: dict[str, Any] = {
            "prompt": req.prompt,
            "input_image": req.image,
            "width": req.width,
            "height": req.height,
            "seed": req.seed if req.seed is not None else -1,
        }
        if req.steps is not None:
            body["num_inference_steps"] = req.steps
        if req.guidance_scale is not None:
            body["guidance_scale"] = req.guidance_scale
        return body

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        if req.kind == "edit":
            return await self._submit_edit(req)
        response = await self.http.submit("POST", f"{self.base_url}{PATH}", headers=self._headers(),
                                          json=self.body(req))
        if response.status_code >= 400:
            raise self._error(response, "submit")
        answer = read(_Answer, response)
        if answer is None:
            raise SubmitOutcomeUnknown(
                f"ImagePipeline answered HTTP {response.status_code} with no readable job status. It may "
                "have started the job; this server did not resend it. Check the ImagePipeline dashboard "
                "before asking again, to avoid paying twice.")
        native = answer.native_id
        if answer.word == "PENDING":
            if native is None:
                raise SubmitOutcomeUnknown(
                    "ImagePipeline queued the job but gave no usable id to follow it, so its images cannot "
                    "be fetched here. This server did not resend it; check the ImagePipeline dashboard.")
            return Submitted(native_id=native)
        try:
            state = self._state(answer)
        except ProviderUnavailable:
            raise SubmitOutcomeUnknown(
                f"ImagePipeline answered with an unknown status {answer.word or 'none'!r}"
                + (f" for job {native}" if native else "")
                + ". It may have started the job; this server did not resend it. Check the ImagePipeline "
                "dashboard before asking again, to avoid paying twice.") from None
        if state.status == "failed" and state.error and "server" in state.error.lower():
            state.error += self._server_hint()
        return Submitted(native_id=native or uuid.uuid4().hex, state=state)

    async def _submit_edit(self, req: ImageRequest) -> Submitted:
        response = await self.http.submit("POST", f"{self.base_url}{EDIT_PATH}", headers=self._headers(),
                                          json=self.edit_body(req))
        if response.status_code >= 400:
            raise self._error(response, "submit", v3=False)
        job = read(_Job, response)
        native = job.native_id if job else None
        if job is None or native is None:
            raise SubmitOutcomeUnknown(
                f"ImagePipeline answered the edit with HTTP {response.status_code} but no usable job id, so "
                "this server cannot follow it. It may have started the job; this server did not resend it. "
                "Check the ImagePipeline dashboard before asking again, to avoid paying twice.")
        try:
            state = self._job_state(job, native)
        except ProviderUnavailable:
            state = None  # an unknown status word must not lose the id: polling will tell
        return Submitted(native_id=native, state=state if state and state.status not in _PENDING else None)

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        if native_id.startswith(EDIT_PREFIX):
            return await self._poll_job(native_id)
        response = await self.http.fetch("GET", f"{self.base_url}{PATH}/status/{native_id}",
                                         headers=self._headers())
        if response.status_code >= 400:
            raise self._error(response, "poll", job=native_id)
        answer = read(_Answer, response)
        if answer is None:
            raise ProviderUnavailable(f"ImagePipeline's status answer for job {native_id} could not be read; "
                                      "try check_prediction again later.", status_code=response.status_code)
        return self._state(answer, native_id)

    async def _poll_job(self, native_id: str) -> JobState:
        job_id = native_id.removeprefix(EDIT_PREFIX)
        response = await self.http.fetch("GET", f"{self.base_url}{EDIT_PATH}/status/{job_id}",
                                         headers=self._headers())
        if response.status_code >= 400:
            raise self._error(response, "poll", v3=False, job=job_id)
        job = read(_Job, response)
        if job is None:
            raise ProviderUnavailable(f"ImagePipeline's status answer for job {job_id} could not be read; "
                                      "try check_prediction again later.", status_code=response.status_code)
        return self._job_state(job, native_id)

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        # Uploading is free and creates no job; still, it is sent once (a new URL each time).
        response = await self.http.submit("POST", f"{self.base_url}{UPLOAD_PATH}", headers=self._headers(),
                                          files={"file": (filename, data, mime_type)})
        if response.status_code >= 400:
            raise self._error(response, "upload", v3=False)
        answer = read(_Uploaded, response)
        try:
            ref = resolve_output(answer.url or "", self.base_url, inline=False) if answer else None
        except UnusableOutput:
            ref = None
        if ref is None or ref.url is None:
            raise ProviderUnavailable("ImagePipeline accepted the upload but returned no file URL; try again.")
        return ref.url

    # --- the mappings to the shared state -------------------------------------------------------

    def _job_state(self, job: _Job, native_id: str) -> JobState:
        """A job API answer as the shared state; an unknown status word is an error, not a guess."""
        word = (job.status or "").strip().lower()
        status = _JOB_STATUS.get(word)
        if status is None:
            raise ProviderUnavailable(f"ImagePipeline reported an unknown status {word or 'none'!r} for job "
                                      f"{native_id.removeprefix(EDIT_PREFIX)}; try check_prediction again later.")
        if status == "succeeded":
            state = finished(self.label, [job.result_url] if job.result_url else [], self.base_url,
                             inline=False, empty="ImagePipeline reported the edit completed but returned no "
                             "result_url", cost_usd=job.cost_usd)
            for ref in state.outputs:
                ref.mime_type = ref.mime_type or job.result_mime_type
            return state
        if status in ("failed", "canceled"):
            reason = job.reason() or f"ImagePipeline reported the job {status} without giving a reason"
            if status == "failed" and job.retryable:
                reason += " (ImagePipeline marks this failure as retryable: the same call may work later)"
            return JobState(status=status, error=self.http.redactor.scrub(reason),
                            error_code=job.failure_reason_code or job.error_code, cost_usd=job.cost_usd)
        return JobState(status=status)


    def _state(self, answer: _Answer, native_id: str | None = None) -> JobState:
        """PENDING, SUCCESS or FAILURE/FAILED as the shared state; any other word is an error, not a guess."""
        word = answer.word
        if word == "PENDING":
            return JobState(status="processing")
        if word == "SUCCESS":
            urls = answer.download_urls if isinstance(answer.download_urls, list) else [answer.download_urls]
            return finished(self.label, [u for u in urls if u], self.base_url, inline=False,
                            empty="ImagePipeline reported success but returned no image URL")
        if word in _FAILED:
            reason = answer.reason() or "ImagePipeline reported the job failed without giving a reason"
            return JobState(status="failed", error=self.http.redactor.scrub(reason),
                            error_code=answer.error_code)
        raise ProviderUnavailable(
            f"ImagePipeline reported an unknown status {word or 'none'!r}"
            + (f" for job {native_id}" if native_id else "") + "; try check_prediction again later.")

    def _error(self, response: httpx2.Response, phase: Phase, *, v3: bool = True, **fields: str) -> Exception:
        """Maps an HTTP error answer with `_ERRORS`, then the shared rules (a refused v3 submit that
        mentions the server gets the hint about IMAGEPIPELINE_SERVER_ID)."""
        about_server = v3 and "server" in self.http.message_of(response).lower()
        hint = self._server_hint() if phase == "submit" and about_server else ""
        return self.http.error_for(response, _ERRORS, phase=phase, advice=hint, **fields)

    def _server_hint(self) -> str:
        if self.server_id:
            return " Check that IMAGEPIPELINE_SERVER_ID names a running server of this account."
        return (" FLUX on ImagePipeline runs on dedicated servers: set IMAGEPIPELINE_SERVER_ID to the "
                "account's server id and restart the server.")
