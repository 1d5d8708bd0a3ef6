"""AceDataCloud (FluxAPI): jobs at POST /flux/images, sent with `async: true`, polled at POST /flux/tasks.

Wire details and the documentation's contradictions: shared/providers/API-NOTES.md section 3.
Flux tasks have no status word of their own; the state is derived from the task record (3.4).
Local files are uploaded to platform.acedata.cloud, which takes a separate platform token (3.2).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

import httpx2

from ..errors import (
    AuthFailed,
    ConfigError,
    InsufficientCredits,
    InvalidInput,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
    UnsupportedOperation,
)
from ..http import parse_json
from ..models import Status
from .base import ImageRequest, JobState, Kind, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import ACEDATACLOUD

RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
"""The aspect ratios kontext and flux-2 models take as `size` [S-ACE]."""
_PIXELS = Range(256, 1440, multiple_of=32)
_SHAPE = Range(64, 4096)
"""Ratio models: width and height only choose the nearest ratio; the provider sets the pixels."""
_MAX_COUNT = 4
"""No documented maximum; `count` multiplies the cost [ACE-SKILL], so the same cap as the other providers."""
_NOT_FOUND_GRACE = 60.0
"""/flux/tasks answers `{}` for ids it does not know (INFERRED); right after submit that means "not yet"."""
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
"""Generic state/status words the official SDK honours (3.4), plus the usual pending words."""

_CODES: dict[str, tuple[type[ProviderError], str]] = {
    "invalid_token": (AuthFailed, (
        "refused the API token in {var} ({why}). Check that the token is current and copied whole, then "
        "restart the server.")),
    "token_expired": (AuthFailed, (
        "says the API token in {var} has expired ({why}). Put a current token there and restart the "
        "server.")),
    "token_mismatched": (AuthFailed, (
        "says the token in {var} does not match this API ({why}). Use a token issued for the Flux Images "
        "Generation service, then restart the server.")),
    "no_token": (AuthFailed, "received no token ({why}). Set {var} and restart the server."),
    "disabled": (AuthFailed, (
        "says the token or its Flux service is disabled ({why}). Re-enable it in the AceDataCloud console, "
        "or put another token in {var}.")),
    "used_up": (InsufficientCredits, (
        "says the balance is used up ({why}). Top up at platform.acedata.cloud, or use another "
        "provider.")),
    "no_api": (ProviderRejected, (
        "has no such API ({why}). Check ACEDATACLOUD_BASE_URL (default https://api.acedata.cloud).")),
    "api_not_implemented": (ProviderRejected, (
        "does not implement this request ({why}). Try another model.")),
    "bad_request": (ProviderRejected, (
        "rejected the request ({why}). Adjust the arguments (prompt, model, size) and call again.")),
}
"""The documented error codes (3.5) that say what went wrong whatever the HTTP status."""


def _pixels(model: str, description: str) -> ModelInfo:
    return ModelInfo(model, _BOTH, f"{description} `size` is sent as WxH pixels.", size=_PIXELS,
                     max_images=_MAX_COUNT)


def _ratio(model: str, description: str, kinds: frozenset[Kind] = _BOTH) -> ModelInfo:
    return ModelInfo(model, kinds, f"{description} width/height choose the nearest aspect ratio "
                     f"({', '.join(RATIOS)}).", size=_SHAPE, max_images=_MAX_COUNT)


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
    """`image_url` must be a direct image URL [ACE-MCP]; data: URIs are undocumented there, so never sent."""

    @property
    def can_upload(self) -> bool:
        """Only with the platform token: uploads go to platform.acedata.cloud, not to the API host."""
        return bool(self.settings.extra.get("platform_token"))

    def upload_hint(self) -> str | None:
        if self.can_upload:
            return None
        return (f"To upload to {self.label}, set {_PLATFORM_VAR} (a platform.acedata.cloud token, not the API "
                "token) in the server's environment and restart it.")

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
        """The /flux/images body; `async` always, because a synchronous answer can take minutes [ACE-MCP]."""
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
        payload = parse_json(response)
        if response.status_code >= 400 or not isinstance(payload, dict):
            raise self._error(response, submit=True)
        native = _task_id(payload)
        if native is None and _has_error(payload):
            raise self._error(response, submit=True)
        state = None
        if _looks_final(payload):  # a synchronous answer (or an early verdict) despite `async`
            try:
                state = self._read(payload)
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
        record = parse_json(response)
        if response.status_code >= 400:
            raise self._error(response)
        if not isinstance(record, dict):
            raise ProviderUnavailable(f"{self.label}'s task API gave an unreadable answer; call "
                                      "check_prediction again in a moment.", status_code=response.status_code)
        if not _is_task(record):
            if _has_error(record):
                raise self._error(response)
            return self._unknown_task(native_id, submitted_at)
        answer = record.get("response")
        if isinstance(answer, dict) and answer:
            return self._read(answer, record)
        if _word(record) is not None:
            return self._read(record)
        if record.get("finished_at") is not None:
            return JobState(status="failed", error_code="no_output",
                            error=f"{self.label} marked the task finished but gave no result")
        return JobState(status="processing" if record.get("started_at") is not None else "starting")

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
        payload = parse_json(response)
        if response.status_code >= 400 or not isinstance(payload, dict) or _has_error(payload):
            raise self._upload_error(response)
        inner = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        found = next((d[k] for d in (payload, inner) for k in ("file_url", "url")
                      if isinstance(d.get(k), str) and d[k].startswith(("http://", "https://"))), None)
        if found is None:
            raise ProviderUnavailable(f"{self.label} accepted the upload but returned no file URL; "
                                      "try again.")
        return found

    def _read(self, answer: dict[str, Any], record: dict[str, Any] | None = None) -> JobState:
        state = _verdict(answer, record)
        if state.error:
            state.error = self.http.redactor.scrub(state.error)
        return state

    # --- errors ---------------------------------------------------------------------------------

    def _error(self, response: httpx2.Response, *, submit: bool = False) -> Exception:
        """Maps the `{success: false, error: {code, message}}` envelope (3.5): code first, then status."""
        status = response.status_code
        code = _error_code(parse_json(response))
        why = f"HTTP {status}: {self.http.message_of(response)}"
        key = code if code in _CODES else None
        if key is None and code not in ("too_many_requests", "api_error"):
            key = {401: "invalid_token", 400: "bad_request"}.get(status)
        if key is not None:
            cls, text = _CODES[key]
            return cls(f"{self.label} {text.format(var=_TOKEN_VAR, why=why)}", status_code=status, code=code)
        if code == "too_many_requests" or status == 429:
            after = _retry_after(response)
            when = f"in {after:g} seconds" if after is not None else "in a minute"
            what = ("the job was not created. Try again" if submit
                    else "the job keeps running. Call check_prediction")
            return RateLimited(f"{self.label} is rate limiting requests ({why}); {what} {when}.",
                               retry_after=after, status_code=status, code=code)
        if status >= 500 or code == "api_error":
            if submit and status >= 500:
                return self.http.error_for(response, submit=True)
            if submit:  # api_error under another status is still a server-side failure after the job was sent
                return SubmitOutcomeUnknown(
                    f"{self.label} reported a server error for the submit request ({why}). It may or may "
                    "not have started the job; this server did not resend it. Check the task history in "
                    "the AceDataCloud console before asking again, to avoid paying twice.")
            return ProviderUnavailable(f"{self.label} had a server error ({why}). The job is kept; call "
                                       "check_prediction again later.", status_code=status, code=code)
        if status == 403:  # without a code: "insufficient balance or no access rights" [ACE-TUT]
            return AuthFailed(f"{self.label} denied the request ({why}): the balance may be used up or the "
                              f"token in {_TOKEN_VAR} may lack access to this model. Check the AceDataCloud "
                              "console.", status_code=status, code=code)
        return self.http.error_for(response, submit=submit)

    def _upload_error(self, response: httpx2.Response) -> Exception:
        status = response.status_code
        code = _error_code(parse_json(response))
        why = f"HTTP {status}: {self.http.message_of(response)}"
        if status in (401, 403) or code in ("invalid_token", "token_expired", "token_mismatched", "no_token"):
            return AuthFailed(f"{self.label}'s platform refused the token in {_PLATFORM_VAR} ({why}). Check "
                              "that it is a current platform.acedata.cloud token (not the API token) and "
                              "restart the server, or pass a public image URL instead.",
                              status_code=status, code=code)
        if status == 429 or code == "too_many_requests":
            return RateLimited(f"{self.label}'s platform is rate limiting uploads ({why}). Try again in a "
                               "minute.",
                               retry_after=_retry_after(response), status_code=status, code=code)
        if status >= 500 or status < 400:
            return ProviderUnavailable(f"The upload to {self.label} failed ({why}). Try again in a moment.",
                                       status_code=status, code=code)
        return ProviderRejected(f"{self.label} refused the upload ({why}).", status_code=status, code=code)


# --- reading answers ------------------------------------------------------------------------------


def nearest_ratio(width: int, height: int) -> str:
    """The supported aspect ratio closest to width:height, compared on a log scale (2:1 and 1:2 alike)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - target)

    return min(RATIOS, key=distance)


def _takes_ratio(model: str) -> bool:
    # Unknown ids follow the documented families: kontext, flux-2 and ultra take ratios, dev/pro take pixels.
    return "kontext" in model or model.startswith("flux-2") or "ultra" in model


def _retry_after(response: httpx2.Response) -> float | None:
    raw = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None  # an HTTP-date: "in a minute" is close enough


def _task_id(payload: dict[str, Any]) -> str | None:
    """`task_id`, then `data.task_id`, then `id`, as the official SDK looks for it."""
    data = payload.get("data")
    for value in (payload.get("task_id"), data.get("task_id") if isinstance(data, dict) else None,
                  payload.get("id")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _has_error(payload: dict[str, Any]) -> bool:
    return payload.get("success") is False or bool(payload.get("error"))


def _is_task(record: dict[str, Any]) -> bool:
    return any(k in record for k in ("id", "request", "response", "created_at"))


def _looks_final(payload: dict[str, Any]) -> bool:
    return "success" in payload or "data" in payload or _word(payload) is not None


def _word(payload: dict[str, Any] | None) -> str | None:
    for key in ("state", "status"):
        value = (payload or {}).get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().lower()
    return None


def _outputs(data: Any) -> list[OutputRef]:
    """`data` as a list of items or one item [3.7]; each item's `image_url`."""
    items = data if isinstance(data, list) else [data]
    urls = [item.get("image_url") or item.get("url") for item in items if isinstance(item, dict)]
    return [OutputRef(url=u) for u in urls if isinstance(u, str) and u.startswith(("http://", "https://"))]


def _error_code(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        code = payload["error"].get("code")
        return str(code) if code is not None else None
    return None


def _error_text(answer: dict[str, Any]) -> str | None:
    err = answer.get("error")
    if isinstance(err, str) and err.strip():
        return err.strip()
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail")
        if isinstance(message, str) and message.strip():
            return message.strip()
    for key in ("message", "failure_reason", "fail_reason"):
        if isinstance(answer.get(key), str) and answer[key].strip():
            return answer[key].strip()
    return None


def _verdict(answer: dict[str, Any], record: dict[str, Any] | None = None) -> JobState:
    """The state a finished-looking answer gives: a task's `response`, or a synchronous /flux/images body.

    A state/status word wins; then `success` (or an error); then images alone. Anything else is not guessed.
    """
    outputs = _outputs(answer.get("data"))
    word = _word(answer) or _word(record)
    if word is not None:
        status = _WORDS.get(word)
        if status is None:
            raise ProviderUnavailable(f"AceDataCloud reported an unknown task state {word!r}; call "
                                      "check_prediction again later.")
        if status == "succeeded":
            return _succeeded(outputs)
        if status in ("failed", "canceled"):
            return _failed(answer, status)
        return JobState(status=status)
    if answer.get("success") is True:
        return _succeeded(outputs)
    if _has_error(answer):
        return _failed(answer, "failed")
    if outputs:
        return JobState(status="succeeded", outputs=outputs)
    raise ProviderUnavailable("AceDataCloud gave a task result this server does not recognise (no success "
                              "flag, error or image); call check_prediction again later.")


def _succeeded(outputs: list[OutputRef]) -> JobState:
    if not outputs:
        return JobState(status="failed", error_code="no_output",
                        error="AceDataCloud reported the task succeeded but returned no image")
    return JobState(status="succeeded", outputs=outputs)


def _failed(answer: dict[str, Any], status: Status) -> JobState:
    code = _error_code(answer)
    text = _error_text(answer) or f"AceDataCloud reported the task {status} without a reason"
    return JobState(status=status, error=f"{text} ({code})" if code else text, error_code=code)
