"""Atlas Cloud: asynchronous jobs at /api/v1/model/generateImage, polled at /model/prediction/{id}.

Wire details and the documentation's contradictions: shared/providers/API-NOTES.md section 1.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import (
    InsufficientCredits,
    InvalidInput,
    ProviderRejected,
    ProviderUnavailable,
    SubmitOutcomeUnknown,
)
from ..http import parse_json
from ..models import Status
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import ATLASCLOUD

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
"""A new prediction can answer 400/404 for a short while after submit (ComfyUI client's grace period)."""
HELD_SECONDS = 300.0
"""How long a sync-mode submit may stay open. Far beyond any schnell job: giving up on a held submit
would lose the job's id (it may be charged), so only a dead connection ends it early."""
_OFF = ("off", "false", "0", "no")


class AtlasCloud(Provider):
    spec = ATLASCLOUD
    models = (
        ModelInfo("black-forest-labs/flux-schnell", frozenset({"generate", "edit"}),
                  "FLUX.1 [schnell]: fastest, 1-4 steps; edits as image-to-image with `image`.",
                  size=_SIZE, max_images=4, price_usd=0.003, answers_inline=True),
        ModelInfo("black-forest-labs/flux-dev", frozenset({"generate", "edit"}),
                  "FLUX.1 [dev]: higher quality; image-to-image with `image`.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(0, 20), max_images=4, price_usd=0.012),
        ModelInfo("black-forest-labs/flux-dev-lora", frozenset({"generate"}),
                  "FLUX.1 [dev] with LoRA support.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(0, 20), max_images=4),
        ModelInfo("black-forest-labs/flux-kontext-dev", frozenset({"edit"}),
                  "FLUX.1 Kontext [dev]: instruction-based editing of an input image.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(1, 20), max_images=4, requires_image=True,
                  price_usd=0.025),
        ModelInfo("black-forest-labs/flux-kontext-dev-lora", frozenset({"edit"}),
                  "FLUX.1 Kontext [dev] with LoRA support.",
                  size=_SIZE, steps=Range(1, 50), guidance=Range(1, 20), max_images=4, requires_image=True,
                  price_usd=0.03),
        ModelInfo("wavespeed-ai/flux-schnell", frozenset({"generate"}),
                  "FLUX.1 [schnell] served by WaveSpeed.", size=_SIZE, max_images=4),
    )
    default_model = "black-forest-labs/flux-schnell"
    default_edit_model = "black-forest-labs/flux-kontext-dev"
    can_upload = True
    accepts_data_uri = True

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key()}", "Accept": "application/json"}

    def answers_inline(self, model: str | None) -> bool:
        # enable_sync_mode is documented for flux-schnell only (API-NOTES 1.3); ATLASCLOUD_SYNC_MODE=off opts out.
        return super().answers_inline(model) and self.settings.extra.get("sync_mode", "auto").lower() not in _OFF

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
        if info is None or info.steps is not None:
            if req.steps is not None:
                body["num_inference_steps"] = req.steps
        if info is None or info.guidance is not None:
            if req.guidance_scale is not None:
                body["guidance_scale"] = req.guidance_scale
        if req.image:
            body["image"] = req.image
        return body

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        url = f"{self.base_url}/api/v1/model/generateImage"
        response = await self.http.submit("POST", url, headers=self._headers(), json=self.body(req, inline=inline),
                                          held=HELD_SECONDS if inline else None)
        payload = parse_json(response)
        data = payload.get("data") if isinstance(payload, dict) and isinstance(payload.get("data"), dict) else payload
        native = None
        if isinstance(data, dict):
            native = data.get("id") or payload.get("id") or data.get("predictionId") or payload.get("predictionId")
        if response.status_code >= 300:
            # A held submit whose job then failed answers like a failed poll: HTTP 5xx, the verdict in the body.
            verdict = _STATUS.get(str(data.get("status", "")).lower()) if isinstance(data, dict) else None
            if inline and isinstance(native, str) and native and verdict in ("failed", "canceled"):
                return Submitted(native_id=native, state=self._state(data))
            raise self._error(response, submit=True)
        if not isinstance(native, str) or not native:
            raise SubmitOutcomeUnknown(
                f"Atlas Cloud accepted the request (HTTP {response.status_code}) but its answer has no readable "
                "prediction id, so this server cannot follow the job. It may have been created and charged: check "
                "the Atlas Cloud dashboard's history before asking again."
            )
        try:
            state = self._state(data) if data.get("status") else None
        except ProviderUnavailable:
            state = None  # an unknown status word must not lose the id: polling will tell
        if state is not None and state.status in ("starting", "processing"):
            state = None  # not done (a sync-mode wait can end early on Atlas's side): poll
        return Submitted(native_id=native, state=state)

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        url = f"{self.base_url}/api/v1/model/prediction/{native_id}"
        response = await self.http.fetch("GET", url, headers=self._headers())
        payload = parse_json(response)
        data = payload.get("data") if isinstance(payload, dict) and isinstance(payload.get("data"), dict) else payload
        if isinstance(data, dict) and isinstance(data.get("status"), str):
            # A failed task comes back as HTTP 5xx with its verdict in the body: the verdict wins.
            return self._state(data)
        if response.status_code in (400, 404) and time.time() - submitted_at < _WARMUP_GRACE:
            return JobState(status="starting")
        if response.status_code < 300:
            raise ProviderUnavailable("Atlas Cloud's status answer could not be read; the job is kept, check again.")
        raise self._error(response)

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        url = f"{self.base_url}/api/v1/model/uploadMedia"
        # Uploading is free and creates no job; still, it is sent once (a new URL each time).
        response = await self.http.submit("POST", url, headers=self._headers(),
                                          files={"file": (filename, data, mime_type)})
        payload = parse_json(response)
        if response.status_code >= 400 or not isinstance(payload, dict):
            raise self._error(response)
        data_ = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        found = data_.get("download_url") or payload.get("download_url") or data_.get("url") or payload.get("url")
        if not isinstance(found, str) or not found.startswith(("http://", "https://")):
            raise ProviderUnavailable("Atlas Cloud accepted the upload but returned no file URL; try again.")
        return found

    def _state(self, data: dict[str, Any]) -> JobState:
        raw = str(data.get("status", "")).lower()
        status = _STATUS.get(raw)
        if status is None:
            raise ProviderUnavailable(f"Atlas Cloud reported an unknown status {raw!r}; try check_prediction later.")
        price = data.get("price")
        cost = float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None
        if status == "succeeded":
            outputs = _outputs(data.get("outputs", data.get("output")))
            if not outputs:
                nsfw = data.get("has_nsfw_contents")
                flagged = nsfw is True or (isinstance(nsfw, list) and any(x is True for x in nsfw))
                reason = (
                    "the image was blocked by Atlas Cloud's content-safety filter; rephrase the prompt"
                    if flagged else "Atlas Cloud reported the job completed but returned no image"
                )
                return JobState(status="failed", error=reason,
                                error_code="content_filtered" if flagged else "no_output", cost_usd=cost)
            return JobState(status="succeeded", outputs=outputs, cost_usd=cost)
        if status in ("failed", "canceled"):
            return JobState(status=status, error=self.http.redactor.scrub(_error_text(data) or status),
                            error_code=str(data.get("error_code")) if data.get("error_code") is not None else None,
                            cost_usd=cost)
        return JobState(status=status)

    def _error(self, response: Any, *, submit: bool = False) -> Exception:
        detail = self.http.message_of(response).lower()
        if response.status_code < 500 and ("insufficient" in detail or "balance" in detail):
            return InsufficientCredits(
                f"Atlas Cloud says the balance is insufficient ({self.http.message_of(response)}). Top up at "
                "atlascloud.ai, or use another provider.", status_code=response.status_code)
        if response.status_code == 422:
            return ProviderRejected(
                f"Atlas Cloud rejected the parameters (HTTP 422: {self.http.message_of(response)}). Adjust them "
                "and call again.", status_code=422)
        return self.http.error_for(response, submit=submit)


def _outputs(raw: Any) -> list[OutputRef]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    out: list[OutputRef] = []
    for item in items:
        value = item
        if isinstance(item, dict):
            value = next((item[k] for k in ("url", "download_url", "image", "output") if isinstance(item.get(k), str)),
                         None)
        if not isinstance(value, str) or not value:
            continue
        if value.startswith(("http://", "https://")):
            out.append(OutputRef(url=value))
        else:
            from ..media import decode_data_uri

            try:
                out.append(OutputRef(data=decode_data_uri(value)))
            except InvalidInput:
                raise ProviderUnavailable("Atlas Cloud sent an image that is not valid base64; the job is kept, "
                                          "check again.") from None
    return out


def _error_text(data: dict[str, Any]) -> str | None:
    err = data.get("error")
    if isinstance(err, str) and err.strip():
        return err.strip()
    if isinstance(err, dict):
        for key in ("message", "msg", "error", "detail", "reason"):
            if isinstance(err.get(key), str) and err[key].strip():
                return err[key].strip()
    for key in ("message", "msg"):
        if isinstance(data.get(key), str) and data[key].strip():
            return data[key].strip()
    return None
