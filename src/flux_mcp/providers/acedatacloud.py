"""AceDataCloud (FluxAPI): jobs at `POST /flux/images`, sent with `async: true`, polled at `POST /flux/tasks`.

The wire, as this adapter relies on it:

* Base `https://api.acedata.cloud`, every call with `authorization: Bearer <ACEDATACLOUD_API_TOKEN>`
  (one token for all of the platform's services) and JSON bodies.
* `POST /flux/images` takes `{action: "generate" | "edit", prompt, model, size, count?, image_url?,
  callback_url?, async?}`. Without `async` the answer waits for the images (a minute or two), so
  `async: true` is always sent and the answer is `{task_id}` (the SDK also looks at `data.task_id`
  and `id`). A synchronous answer is `{success: true, task_id, trace_id, data: [{image_url, ...}]}`
  (one tutorial: `{status: "success", data: {...}}`; `data` may be a list or one object).
* `size` is required: `WxH` pixels for flux-dev/pro (256-1440, multiples of 32; revisions of the
  docs disagree), an aspect ratio for kontext and flux-2 models. `count` is for generating only and
  multiplies the cost; edits take `image_url`, a direct image URL (data: URIs are undocumented).
  There is no seed field.
* `POST /flux/tasks` with `{id, action: "retrieve"}` answers the task record `{id, created_at,
  started_at?, finished_at?, request, response?}`. Flux tasks have **no status word**: no
  `response` yet means pending; `response.success == true` with `data[].image_url` means done;
  `response.success == false` with `response.error {code, message}` means failed. The official SDK
  also honours generic `state`/`status` words, and so does this adapter. An unknown id is answered
  with an empty record `{}`.
* Errors: the envelope `{success: false, error: {code, message}, trace_id}` (the error may also be a
  bare string). Codes: 400 `token_mismatched`, `api_not_implemented`, `disabled`, `bad_request`,
  `no_token`; 401 `invalid_token`, `token_expired`; 403 `used_up` (no balance; a 403 without a code
  may also mean no access); 404 `no_api`; 429 `too_many_requests`; 500 `api_error`. No rate-limit
  headers are documented. Prices are not published; task queries are free.
* Uploads go to `https://platform.acedata.cloud/api/v1/files/` (multipart `file`) with a separate
  **platform** token, answered `{file_url}` (a third-party caller reads `url`).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any

import httpx2
from pydantic import AliasChoices, BeforeValidator, Field

from ..errors import (
    AuthFailed,
    ConfigError,
    FluxError,
    InsufficientCredits,
    InvalidInput,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
    UnsupportedOperation,
)
from ..http import SERVER_ERROR, ErrorRule, Phase
from ..models import Status
from .base import ImageRequest, JobState, Kind, ModelInfo, Provider, Range, Submitted
from .registry import ACEDATACLOUD
from .wire import Loose, Text, UnusableOutput, WireModel, finished, first_string, read, resolve_output

RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
"""The aspect ratios kontext and flux-2 models take as `size`."""
_PIXELS = Range(256, 1440, multiple_of=32)
_SHAPE = Range(64, 4096)
"""Ratio models: width and height only choose the nearest ratio; the provider sets the pixels."""
_MAX_COUNT = 4
"""No documented maximum; `count` multiplies the cost, so the same cap as the other providers."""
_NOT_FOUND_GRACE = 60.0
"""/flux/tasks answers `{}` for ids it does not know; right after submit that means "not yet"."""
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TOKEN_VAR = "ACEDATACLOUD_API_TOKEN"
_PLATFORM_VAR = "ACEDATACLOUD_PLATFORM_TOKEN"
_DEFAULT_PLATFORM = "https://platform.acedata.cloud"
_BOTH: frozenset[Kind] = frozenset({"generate", "edit"})

_WORDS: dict[str, Status] = {
    "succeed": "succeeded", "succeeded": "succeeded", "success": "succeeded", "completed": "succeeded",
    "complete": "succeeded", "finished": "succeeded",
    "failed": "failed", "failure": "failed", "error": "failed", "rejected": "failed",
    "cancelled": "canceled", "canceled": "canceled",
    "pending": "starting", "queued": "starting", "created": "starting", "submitted": "starting",
    "starting": "starting", "processing": "processing", "running": "processing", "in_progress": "processing",
}
"""Generic state/status words the official SDK honours, plus the usual pending words."""

_WHY = "(HTTP {status}: {detail})"
_CODES: dict[str, tuple[type[FluxError], str]] = {
    "invalid_token": (AuthFailed, (
        "refused the API token in {var} " + _WHY + ". Check that the token is current and copied whole, then "
        "restart the server.")),
    "token_expired": (AuthFailed, (
        "says the API token in {var} has expired " + _WHY + ". Put a current token there and restart the "
        "server.")),
    "token_mismatched": (AuthFailed, (
        "says the token in {var} does not match this API " + _WHY + ". Use a token issued for the Flux "
        "Images Generation service, then restart the server.")),
    "no_token": (AuthFailed, "received no token " + _WHY + ". Set {var} and restart the server."),
    "disabled": (AuthFailed, (
        "says the token or its Flux service is disabled " + _WHY + ". Re-enable it in the AceDataCloud "
        "console, or put another token in {var}.")),
    "used_up": (InsufficientCredits, (
        "says the balance is used up " + _WHY + ". Top up at platform.acedata.cloud, or use another "
        "provider.")),
    "no_api": (ProviderRejected, (
        "has no such API " + _WHY + ". Check ACEDATACLOUD_BASE_URL (default https://api.acedata.cloud).")),
    "api_not_implemented": (ProviderRejected,
                            "does not implement this request " + _WHY + ". Try another model."),
    "bad_request": (ProviderRejected, (
        "rejected the request " + _WHY + ". Adjust the arguments (prompt, model, size) and call again.")),
}
"""The documented error codes, which say what went wrong whatever the HTTP status."""

_SERVER_TROUBLE = ("AceDataCloud had a server error " + _WHY + ". The job is kept; call check_prediction "
                   "again later.")
_ERRORS: tuple[ErrorRule, ...] = (
    *(ErrorRule(cls, "AceDataCloud " + text, code=code) for code, (cls, text) in _CODES.items()),
    ErrorRule(RateLimited, "AceDataCloud is rate limiting requests " + _WHY + "; {then} {when}.",
              code="too_many_requests"),
    ErrorRule(RateLimited, "AceDataCloud is rate limiting requests " + _WHY + "; {then} {when}.", status=429),
    # api_error under another status is still a server-side failure after the job was sent.
    ErrorRule(SubmitOutcomeUnknown, "AceDataCloud reported a server error for the submit request " + _WHY
              + ". It may or may not have started the job; this server did not resend it. Check the task "
              "history in the AceDataCloud console before asking again, to avoid paying twice.",
              code="api_error", status=range(500), phase="submit"),
    ErrorRule(ProviderUnavailable, _SERVER_TROUBLE, code="api_error", phase="poll"),
    ErrorRule(ProviderUnavailable, _SERVER_TROUBLE, status=SERVER_ERROR, phase="poll"),
    ErrorRule(AuthFailed, "AceDataCloud denied the request " + _WHY + ": the balance may be used up or the "
              "token in {var} may lack access to this model. Check the AceDataCloud console.", status=403),
    ErrorRule(AuthFailed, "AceDataCloud " + _CODES["invalid_token"][1], status=401),
    ErrorRule(ProviderRejected, "AceDataCloud " + _CODES["bad_request"][1], status=400),
)
"""AceDataCloud's documented errors: the code first, then the status; a submit's 5xx is the shared rule."""

_PLATFORM_REFUSED = ("AceDataCloud's platform refused the token in " + _PLATFORM_VAR + " " + _WHY + ". Check "
                     "that it is a current platform.acedata.cloud token (not the API token) and restart the "
                     "server, or pass a public image URL instead.")
_UPLOAD_FAILED = "The upload to AceDataCloud failed " + _WHY + ". Try again in a moment."
_UPLOAD_LIMITED = "AceDataCloud's platform is rate limiting uploads " + _WHY + ". Try again {when}."
_UPLOAD_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(AuthFailed, _PLATFORM_REFUSED, status=(401, 403)),
    ErrorRule(AuthFailed, _PLATFORM_REFUSED,
              code=("invalid_token", "token_expired", "token_mismatched", "no_token")),
    ErrorRule(RateLimited, _UPLOAD_LIMITED, status=429),
    ErrorRule(RateLimited, _UPLOAD_LIMITED, code="too_many_requests"),
    ErrorRule(ProviderUnavailable, _UPLOAD_FAILED, status=SERVER_ERROR),
    ErrorRule(ProviderUnavailable, _UPLOAD_FAILED, status=range(400)),
    ErrorRule(ProviderRejected, "AceDataCloud refused the upload " + _WHY + "."),
)


# --- the answers, as read ------------------------------------------------------------------------

_Url = Annotated[str | None, BeforeValidator(first_string("image_url", "url"))]


class _Error(WireModel):
    code: Loose[str | int] = None
    message: Text = Field(None, validation_alias=AliasChoices("message", "detail"))


class _Item(WireModel):
    image_url: Text = Field(None, validation_alias=AliasChoices("image_url", "url"))
    task_id: Text = None


class _Answer(WireModel):
    """A /flux/images answer, or a task's `response`: a success flag or state word, images, an error."""

    success: Loose[bool] = None
    task_id: Text = None
    id: Text = None
    data: Loose[list[Loose[_Item]] | _Item] = None
    error: Loose[str | _Error] = None
    state: Text = None
    status: Text = None
    message: Text = None
    failure_reason: Text = Field(None, validation_alias=AliasChoices("failure_reason", "fail_reason"))

    @property
    def word(self) -> str | None:
        word = self.state or self.status
        return word.lower() if word else None

    @property
    def items(self) -> list[_Item]:
        items = self.data if isinstance(self.data, list) else [self.data]
        return [item for item in items if item is not None]

    @property
    def native_id(self) -> str | None:
        """`task_id`, then `data.task_id`, then `id`, as the official SDK looks for it."""
        inner = self.data.task_id if isinstance(self.data, _Item) else None
        return self.task_id or inner or self.id

    @property
    def has_error(self) -> bool:
        return self.success is False or bool(self.error)

    @property
    def looks_final(self) -> bool:
        return bool({"success", "data"} & self.model_fields_set) or self.word is not None

    @property
    def error_code(self) -> str | None:
        code = self.error.code if isinstance(self.error, _Error) else None
        return str(code) if code is not None else None

    def reason(self) -> str | None:
        if isinstance(self.error, str) and self.error.strip():
            return self.error.strip()
        if isinstance(self.error, _Error) and self.error.message:
            return self.error.message
        return self.message or self.failure_reason


class _Task(_Answer):
    """A /flux/tasks record; `{}` for an id the task API does not know."""

    request: Loose[dict[str, object]] = None
    response: Loose[_Answer] = None
    created_at: Loose[float | str] = None
    started_at: Loose[float | str] = None
    finished_at: Loose[float | str] = None

    @property
    def is_task(self) -> bool:
        return bool({"id", "request", "response", "created_at"} & self.model_fields_set)


class _Uploaded(WireModel):
    url: Text = Field(None, validation_alias=AliasChoices("file_url", "url"))
    data: Loose[_Uploaded] = None


_TYPICAL_SECONDS = 10.0
"""AceDataCloud's documentation gives two figures: its prose says a synchronous answer takes about one
to two minutes, its sample task record finished 9.6 s after it was created. The shorter one is taken:
a figure that is too short costs only a few polite status checks while the job is searched for, one
that is too long would teach the journal that length (the first check would find the job done)."""


def _pixels(model: str, description: str) -> ModelInfo:
    # The API's model names are the canonical FLUX names.
    return ModelInfo(model, _BOTH, f"{description} `size` is sent as WxH pixels.", size=_PIXELS,
                     max_images=_MAX_COUNT, canonical=model, typical_seconds=_TYPICAL_SECONDS)


def _ratio(model: str, description: str, kinds: frozenset[Kind] = _BOTH) -> ModelInfo:
    return ModelInfo(model, kinds, f"{description} width/height choose the nearest aspect ratio "
                     f"({', '.join(RATIOS)}).", size=_SHAPE, max_images=_MAX_COUNT, canonical=model,
                     typical_seconds=_TYPICAL_SECONDS, exact_size=False, key_background=_BOTH)


class AceDataCloud(Provider):
    spec = ACEDATACLOUD
    models = (
        _pixels("flux-dev", "FLUX.1 [dev]."),
        _pixels("flux-pro", "FLUX.1 [pro]."),
        _ratio("flux-kontext-pro", "FLUX.1 Kontext [pro]: instruction-based editing, also generates."),
        _ratio("flux-kontext-max", "FLUX.1 Kontext [max]: highest-quality Kontext editing, also generates."),
        _ratio("flux-2-flex", "FLUX.2 [flex]."),
        _ratio("flux-2-pro", "FLUX.2 [pro]."),
        _ratio("flux-2-max", "FLUX.2 [max]."),
        _ratio("flux-2-klein", "FLUX.2 [klein]: small and fast.", frozenset({"generate"})),
    )
    default_model = "flux-dev"
    default_edit_model = "flux-kontext-pro"
    accepts_data_uri = False
    """`image_url` must be a direct image URL (the official MCP server says so); data: URIs are undocumented
    there, so never sent."""

    @property
    def can_upload(self) -> bool:  # type: ignore[override]  # the base declares a plain attribute
        """Only with the platform token: uploads go to platform.acedata.cloud, not to the API host."""
        return bool(self.settings.extra.get("platform_token"))

    def upload_hint(self) -> str | None:
        if self.can_upload:
            return None
        return (f"To upload to {self.label}, set {_PLATFORM_VAR} (a platform.acedata.cloud token, not the "
                "API token) in the server's environment and restart it.")

    @property
    def platform_url(self) -> str:
        base = (self.settings.extra.get("platform_base_url") or _DEFAULT_PLATFORM).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"ACEDATACLOUD_PLATFORM_BASE_URL must start with http:// or https:// "
                              f"(got {base!r}).")
        return base

    # --- requests -------------------------------------------------------------------------------

    def prepare(self, req: ImageRequest) -> ImageRequest:
        """The inherited limits, plus the fields this API lacks and the images it cannot take."""
        if req.seed is not None:
            raise InvalidInput(f"seed is not a setting of {self.id} (its API has no seed field); "
                               "leave it out.")
        super().prepare(req)
        if req.kind == "edit":
            if req.num_images > 1:
                raise InvalidInput(f"{self.id} edits make one image (`count` is for generating only).")
            if not (req.image or "").strip().startswith(("http://", "https://")) and not self.can_upload:
                raise UnsupportedOperation(
                    f"{self.label} takes the input image only as a public http(s) image URL. To edit a local "
                    f"file or a data: URI, set {_PLATFORM_VAR} (a platform.acedata.cloud token, not the API "
                    "token) in the server's environment and restart it, so this server can upload the image "
                    "first; or pass a public image URL as `image`."
                )
        return req

    def size_of(self, req: ImageRequest) -> str:
        """`size` in the form the model takes: WxH pixels for dev/pro, else the nearest aspect ratio."""
        if _takes_ratio(req.model):
            return nearest_ratio(req.width, req.height)
        return f"{req.width}x{req.height}"

    def body(self, req: ImageRequest) -> dict[str, Any]:
        """The /flux/images body; `async` always, because a synchronous answer can take minutes."""
        body: dict[str, Any] = {"action": req.kind, "prompt": req.prompt, "model": req.model,
                                "size": self.size_of(req), "async": True}
        if req.kind == "generate":
            body["count"] = req.num_images
        else:
            body["image_url"] = req.image
        return body

    def _headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.key()}", "accept": "application/json"}

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        response = await self.http.submit("POST", f"{self.base_url}/flux/images", headers=self._headers(),
                                          json=self.body(req))
        if response.status_code >= 400:
            raise self._error(response, "submit")
        answer = read(_Answer, response)
        native = answer.native_id if answer else None
        if answer is not None and native is None and answer.has_error:
            raise self._error(response, "submit")
        state = None
        if answer is not None and answer.looks_final:  # a synchronous answer (or early verdict) despite async
            try:
                state = self._state(answer)
            except ProviderUnavailable:
                state = None  # the job exists; an answer this server cannot read is left to the polls
        if native is None and state is not None and state.status == "succeeded":
            native = uuid.uuid4().hex  # the images are here: the id only has to be unique
        if native is None or not _SAFE_ID.match(native):
            raise SubmitOutcomeUnknown(
                f"{self.label} answered HTTP {response.status_code} without a usable task id, so this server "
                "cannot follow the job. It may have started (and may be charged); check the task history in "
                "the AceDataCloud console before asking again."
            )
        if state is not None and state.status in ("starting", "processing"):
            state = None
        return Submitted(native_id=native, state=state)

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        response = await self.http.fetch("POST", f"{self.base_url}/flux/tasks", headers=self._headers(),
                                         json={"id": native_id, "action": "retrieve"})
        if response.status_code >= 400:
            raise self._error(response, "poll")
        record = read(_Task, response)
        if record is None:
            raise ProviderUnavailable(f"{self.label}'s task API gave an unreadable answer; call "
                                      "check_prediction again in a moment.", status_code=response.status_code)
        if not record.is_task:
            if record.has_error:
                raise self._error(response, "poll")
            return self._unknown_task(native_id, submitted_at)
        if record.response is not None and record.response.model_fields_set:
            return self._state(record.response, record)
        if record.word is not None:
            return self._state(record)
        if record.finished_at is not None:
            return JobState(status="failed", error_code="no_output",
                            error=f"{self.label} marked the task finished but gave no result")
        return JobState(status="processing" if record.started_at is not None else "starting")

    def _unknown_task(self, native_id: str, submitted_at: float) -> JobState:
        age = time.time() - submitted_at
        if age < _NOT_FOUND_GRACE:
            return JobState(status="starting")
        raise ProviderRejected(
            f"{self.label} does not know task {native_id} (its task API answered with an empty record "
            f"{age / 60:.0f} min after submit). It may have expired or belong to another token than the one "
            f"in {_TOKEN_VAR}; start a new job if you still need the image.",
            status_code=404, code="not_found")

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        token = self.settings.extra.get("platform_token")
        if not token:
            raise UnsupportedOperation(f"Uploading to {self.label} needs {_PLATFORM_VAR} (a "
                                       "platform.acedata.cloud token); set it and restart the server, or "
                                       "pass a public image URL.")
        # Free and creates no job, but every call stores a new file: sent once, like a submit.
        response = await self.http.submit("POST", f"{self.platform_url}/api/v1/files/",
                                          headers=self._headers(token),
                                          files={"file": (filename, data, mime_type)})
        answer = read(_Uploaded, response)
        if response.status_code >= 400 or answer is None or _upload_failed(response):
            raise self.http.error_for(response, _UPLOAD_ERRORS, phase="upload")
        found = answer.url or (answer.data.url if answer.data else None)
        try:
            ref = resolve_output(found or "", self.platform_url, inline=False)
        except UnusableOutput:
            ref = None
        if ref is None or ref.url is None:
            raise ProviderUnavailable(f"{self.label} accepted the upload but returned no file URL; "
                                      "try again.")
        return ref.url

    # --- the one mapping to the shared state ----------------------------------------------------

    def _state(self, answer: _Answer, record: _Task | None = None) -> JobState:
        """A finished-looking answer (a task's `response`, or a synchronous /flux/images body) as the
        shared state. A state/status word wins; then `success` (or an error); then images alone.
        Anything else is not guessed."""
        word = answer.word or (record.word if record else None)
        if word is not None:
            status = _WORDS.get(word)
            if status is None:
                raise ProviderUnavailable(f"AceDataCloud reported an unknown task state {word!r}; call "
                                          "check_prediction again later.")
            if status == "succeeded":
                return self._succeeded(answer)
            if status in ("failed", "canceled"):
                return self._failed(answer, status)
            return JobState(status=status)
        if answer.success is True:
            return self._succeeded(answer)
        if answer.has_error:
            return self._failed(answer, "failed")
        if any(item.image_url for item in answer.items):
            return self._succeeded(answer)
        raise ProviderUnavailable("AceDataCloud gave a task result this server does not recognise (no "
                                  "success flag, error or image); call check_prediction again later.")

    def _succeeded(self, answer: _Answer) -> JobState:
        urls = [item.image_url for item in answer.items if item.image_url]
        return finished(self.label, urls, self.base_url, inline=False,
                        empty="AceDataCloud reported the task succeeded but returned no image")

    def _failed(self, answer: _Answer, status: Status) -> JobState:
        code = answer.error_code
        text = answer.reason() or f"AceDataCloud reported the task {status} without a reason"
        error = self.http.redactor.scrub(f"{text} ({code})" if code else text)
        return JobState(status=status, error=error, error_code=code)

    def _error(self, response: httpx2.Response, phase: Phase) -> FluxError:
        return self.http.error_for(response, _ERRORS, phase=phase)


# --- helpers --------------------------------------------------------------------------------------


def nearest_ratio(width: int, height: int) -> str:
    """The supported aspect ratio closest to width:height, compared on a log scale (2:1 and 1:2 alike)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - target)

    return min(RATIOS, key=distance)


def _takes_ratio(model: str | None) -> bool:
    # Unknown ids follow the documented families: kontext, flux-2 and ultra take ratios, dev/pro take pixels.
    model = model or ""
    return "kontext" in model or model.startswith("flux-2") or "ultra" in model


def _upload_failed(response: httpx2.Response) -> bool:
    """An upload answer in the error envelope, whatever its status."""
    answer = read(_Answer, response)
    return answer is not None and answer.has_error
