"""ImagePipeline: FLUX Schnell through the `generate/v3` endpoint (dedicated servers).

`POST /generate/v3` answers either at once (`status: SUCCESS` with `download_urls`, one per sample)
or with `status: PENDING` and an `id` to poll at `GET /generate/v3/status/{id}` until it is no
longer PENDING; `FAILURE` (docs) or `FAILED` (third-party callers) carry only a message. v3 has no
edit, upload or error-code documentation: error answers are read the way the newer job API
documents them (401, 422 `detail` list, 429 + Retry-After, `{error, error_code, message}`).
Wire details and the documentation's gaps: shared/providers/API-NOTES.md section 4 (and section 6
for the size/count mapping).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx2

from ..errors import InsufficientCredits, ProviderRejected, ProviderUnavailable, SubmitOutcomeUnknown
from ..http import parse_json
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import IMAGEPIPELINE

PATH = "/generate/v3"
_NO_CREDIT_CODES = frozenset({"INSUFFICIENT_BALANCE", "INSUFFICIENT_CREDITS", "CREDIT_CHARGE_FAILED"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Ids go into a URL path and into the prediction id, so only plain ones are taken from the wire."""
_FAILED = frozenset({"FAILURE", "FAILED"})


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
        ),
    )
    default_model = "flux-schnell"
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

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        response = await self.http.submit("POST", f"{self.base_url}{PATH}", headers=self._headers(),
                                          json=self.body(req))
        payload = parse_json(response)
        if response.status_code >= 400:
            raise self._error(response, submit=True)
        if not isinstance(payload, dict):
            raise SubmitOutcomeUnknown(
                f"ImagePipeline answered HTTP {response.status_code} with no readable job status. It may "
                "have started the job; this server did not resend it. Check the ImagePipeline dashboard "
                "before asking again, to avoid paying twice.")
        word = _status_word(payload)
        native = _native_id(payload)
        if word == "PENDING":
            if native is None:
                raise SubmitOutcomeUnknown(
                    "ImagePipeline queued the job but gave no usable id to follow it, so its images cannot "
                    "be fetched here. This server did not resend it; check the ImagePipeline dashboard.")
            return Submitted(native_id=native)
        if word == "SUCCESS" or word in _FAILED:
            state = self._state(payload, succeeded=word == "SUCCESS")
            if state.status == "failed" and state.error and "server" in state.error.lower():
                state.error += self._server_hint()
            return Submitted(native_id=native or uuid.uuid4().hex, state=state)
        raise SubmitOutcomeUnknown(
            f"ImagePipeline answered with an unknown status {word or 'none'!r}"
            + (f" for job {native}" if native else "")
            + ". It may have started the job; this server did not resend it. Check the ImagePipeline "
            "dashboard before asking again, to avoid paying twice.")

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        response = await self.http.fetch("GET", f"{self.base_url}{PATH}/status/{native_id}",
                                         headers=self._headers())
        payload = parse_json(response)
        if response.status_code == 404:
            raise ProviderRejected(
                f"ImagePipeline has no job {native_id} (HTTP 404: {self.http.message_of(response)}); its "
                "record may have expired. Start a new job with generate_image.", status_code=404)
        if response.status_code >= 400:
            raise self._error(response)
        word = _status_word(payload) if isinstance(payload, dict) else None
        if word == "PENDING":
            return JobState(status="processing")
        if isinstance(payload, dict) and (word == "SUCCESS" or word in _FAILED):
            return self._state(payload, succeeded=word == "SUCCESS")
        raise ProviderUnavailable(
            f"ImagePipeline reported an unknown status {word or 'none'!r} for job {native_id}; "
            "try check_prediction again later.", status_code=response.status_code)

    def _state(self, payload: dict[str, Any], *, succeeded: bool) -> JobState:
        """A SUCCESS or FAILURE/FAILED answer as a final state; a success without images is a failure."""
        if succeeded:
            outputs = [OutputRef(url=u) for u in _urls(payload.get("download_urls"))]
            if not outputs:
                return JobState(status="failed", error_code="no_output",
                                error="ImagePipeline reported success but returned no image URL")
            return JobState(status="succeeded", outputs=outputs)
        code = payload.get("error_code")
        reason = _message(payload) or "ImagePipeline reported the job failed without giving a reason"
        return JobState(status="failed", error=self.http.redactor.scrub(reason),
                        error_code=code if isinstance(code, str) else None)

    def _error(self, response: httpx2.Response, *, submit: bool = False) -> Exception:
        """Maps an HTTP error answer; unknown ones go to the shared mapping."""
        status = response.status_code
        payload = parse_json(response)
        body = payload if isinstance(payload, dict) else {}
        code = str(body.get("error_code") or "").upper()
        detail = self.http.message_of(response)
        if status == 402 or code in _NO_CREDIT_CODES or (
                status < 500 and ("insufficient" in detail.lower() or "balance" in detail.lower())):
            label = f"{code}: " if code else ""
            return InsufficientCredits(
                f"ImagePipeline says the account balance is insufficient (HTTP {status}: {label}{detail}). "
                "Top up at imagepipeline.io, or use another provider.", status_code=status, code=code or None)
        hint = self._server_hint() if submit and "server" in detail.lower() else ""
        if status == 422 and isinstance(body.get("detail"), list):
            return ProviderRejected(
                f"ImagePipeline rejected the parameters (HTTP 422: {self._validation(body['detail'])}). Fix "
                "them and call again." + hint, status_code=422)
        if status in (400, 404, 422) and code:
            return ProviderRejected(
                f"ImagePipeline rejected the request (HTTP {status}: {code}: {detail}). Adjust the arguments "
                "and call again." + hint, status_code=status, code=code)
        error = self.http.error_for(response, submit=submit)
        if hint and type(error) is ProviderRejected:
            return ProviderRejected(str(error) + hint, status_code=status)
        return error

    def _validation(self, items: list[Any]) -> str:
        """A 422 `detail` list (`[{"loc": ["body", "prompt"], "msg": "field required"}]`) as one line."""
        parts = []
        for item in items[:3]:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            raw_loc = item.get("loc")
            loc = [str(p) for p in raw_loc if p != "body"] if isinstance(raw_loc, list) else []
            msg = str(item.get("msg", "invalid"))
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        return self.http.redactor.scrub("; ".join(parts) or "invalid parameters")

    def _server_hint(self) -> str:
        if self.server_id:
            return " Check that IMAGEPIPELINE_SERVER_ID names a running server of this account."
        return (" FLUX on ImagePipeline runs on dedicated servers: set IMAGEPIPELINE_SERVER_ID to the "
                "account's server id and restart the server.")


def _status_word(payload: Any) -> str | None:
    raw = payload.get("status") if isinstance(payload, dict) else None
    return raw.strip().upper() if isinstance(raw, str) and raw.strip() else None


def _native_id(payload: dict[str, Any]) -> str | None:
    raw = payload.get("id")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return None
    text = str(raw).strip()
    return text if _SAFE_ID.match(text) else None


def _urls(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    return [u.strip() for u in items if isinstance(u, str) and u.strip().startswith(("http://", "https://"))]


def _message(payload: dict[str, Any]) -> str | None:
    """The failure text: `message`, `error` or `detail` (which one is undocumented)."""
    for key in ("message", "error", "detail"):
        value = payload.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, dict):
            inner = _message(value)
            if inner:
                return inner
    return None
