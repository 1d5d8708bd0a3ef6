"""AppyPie (the Pixazo gateway on Azure API Management): synchronous FLUX.1 [schnell] at
/flux-1-schnell/v1/getData, one image per call.

There is no job id, status, upload or edit API: the answer is final when it arrives, so this
adapter makes its own id and the service journals the result. Several images mean several
calls, each sent exactly once. Wire details and the documentation's gaps: shared/providers/
API-NOTES.md section 5 (and section 6 for the size/count mapping).
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

import httpx2

from ..errors import AuthFailed, FluxError, InsufficientCredits, ProviderRejected, RateLimited
from ..http import parse_json
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import APPYPIE

PATH = "/flux-1-schnell/v1/getData"
DEFAULT_STEPS = 4
_MAX_SEED = 2_147_483_647
_SECONDS_IN_TEXT = re.compile(r"(?i)try again in (\d+(?:\.\d+)?) seconds?")


class AppyPie(Provider):
    spec = APPYPIE
    models = (
        ModelInfo(
            "flux-1-schnell", frozenset({"generate"}),
            "FLUX.1 [schnell], text-to-image only: 1-8 steps (default 4); answers synchronously.",
            # AppyPie documents only the 1024 default, no min/max/multiple: this range is our own sane bound.
            size=Range(256, 2048),
            steps=Range(1, 8),
            # One call per image (the API returns one); the cap is this server's choice, not AppyPie's.
            max_images=4,
            # Pixazo titles the page "(Free)", but the AppyPie page (S-APP) states no price: leave it unknown.
            price_usd=None,
        ),
    )
    default_model = "flux-1-schnell"
    allow_unknown_models = False

    def _headers(self) -> dict[str, str]:
        return {
            "Ocp-Apim-Subscription-Key": self.key(),
            "Content-Type": "application/json",
            "Cache-Control": "no-cache",
            "Accept": "application/json",
        }

    def bodies(self, req: ImageRequest) -> list[dict[str, Any]]:
        """One request body per image; several images get distinct seeds so they differ."""
        seed = req.seed
        if seed is None and req.num_images > 1:
            seed = random.randrange(0, _MAX_SEED - req.num_images)
        bodies = []
        for i in range(req.num_images):
            body: dict[str, Any] = {
                "prompt": req.prompt,
                "num_steps": req.steps if req.steps is not None else DEFAULT_STEPS,
                "height": req.height,
                "width": req.width,
            }
            if seed is not None:
                body["seed"] = (seed + i) % (_MAX_SEED + 1)
            bodies.append(body)
        return bodies

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        """Sends one call per image, in turn; stops at the first error answer.

        If the first call fails, its error is raised as is (no image came back). Once any call has been
        answered 200, the result is final and journaled: the images made, and what happened to the rest.
        """
        outputs: list[OutputRef] = []
        failures: list[str] = []
        answered = False
        total = req.num_images
        for i, body in enumerate(self.bodies(req)):
            try:
                output = await self._call(body)
            except FluxError as exc:
                if not answered:
                    raise
                failures.append(f"image {i + 1} of {total} failed: {str(exc).rstrip('.')}")
                if i + 1 < total:
                    rest = f"images {i + 2}-{total} were" if i + 2 < total else f"image {total} was"
                    failures.append(f"{rest} not requested")
                break
            answered = True
            if isinstance(output, OutputRef):
                outputs.append(output)
            else:
                failures.append(output if total == 1 else f"image {i + 1} of {total}: {output}")
        return Submitted(native_id=uuid.uuid4().hex, state=self._state(outputs, failures, total))

    def _state(self, outputs: list[OutputRef], failures: list[str], total: int) -> JobState:
        error = self.http.redactor.scrub("; ".join(failures)) if failures else None
        if outputs:
            if error:
                error = f"Made {len(outputs)} of {total} images; {error}. Failed calls are never resent."
            return JobState(status="succeeded", outputs=outputs, error=error)
        return JobState(status="failed", error=error, error_code="no_output")

    async def _call(self, body: dict[str, Any]) -> OutputRef | str:
        """One paid call: the image, or (for a 200 without one) the reason text. Errors raise."""
        url = f"{self.base_url}{PATH}"
        response = await self.http.submit("POST", url, headers=self._headers(), json=body)
        if response.status_code >= 300:
            raise self._error(response)
        payload = parse_json(response)
        output = _output_of(payload)
        if output is not None:
            return output
        said = self.http.message_of(response) if payload is not None else "no JSON body"
        return (f"AppyPie answered HTTP {response.status_code} without an image ({said}). It offers no way "
                "to fetch a result later, and this server did not resend the request; the call may still "
                "have been billed")

    def _error(self, response: httpx2.Response) -> FluxError:
        status = response.status_code
        detail = self.http.message_of(response)
        lowered = detail.lower()
        if status == 403 and "quota" in lowered:
            # Azure APIM's quota policy answers 403 "Out of call volume quota ..." with Retry-After
            # (learn.microsoft.com/azure/api-management/quota-policy).
            return InsufficientCredits(
                f"AppyPie says the subscription's call quota is used up (HTTP 403: {detail}). Wait until it "
                "renews or upgrade the plan behind APPYPIE_SUBSCRIPTION_KEY, or use another provider.",
                status_code=status)
        if status in (401, 403):
            why = ("refused the subscription key" if status == 401 else
                   "denied access; the subscription may not include the Flux Schnell API")
            return AuthFailed(
                f"AppyPie {why} (HTTP {status}: {detail}). Check APPYPIE_SUBSCRIPTION_KEY: it must be the "
                "current primary or secondary key of a subscription to Flux Schnell, copied whole; then "
                "restart the server.", status_code=status)
        if status == 429:
            shared = self.http.error_for(response, submit=True)
            seconds = shared.retry_after if isinstance(shared, RateLimited) else None
            if seconds is None and (found := _SECONDS_IN_TEXT.search(detail)):
                seconds = float(found.group(1))
            when = f"in {seconds:g} seconds" if seconds is not None else "in a minute"
            return RateLimited(
                f"AppyPie is rate limiting requests (HTTP 429: {detail}); the image was not made. "
                f"Try again {when}.",
                status_code=status, retry_after=seconds)
        if status == 404:
            return ProviderRejected(
                f"AppyPie answered HTTP 404 ({detail}) for {PATH}. Check APPYPIE_BASE_URL (default "
                f"{self.default_base_url}).", status_code=status)
        if status == 400:
            return ProviderRejected(
                f"AppyPie rejected the request (HTTP 400: {detail}). It takes a non-empty prompt, steps 1-8 "
                "and whole-pixel width/height; adjust them and call again.", status_code=status)
        # 5xx: the image may or may not have been made (and billed); never resent.
        return self.http.error_for(response, submit=True)


def _output_of(payload: Any) -> OutputRef | None:
    """The image in a 200 answer: `output` as a URL (documented), also accepted inside a list."""
    if not isinstance(payload, dict):
        return None
    value = payload.get("output")
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v), None)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return OutputRef(url=value) if value.startswith(("http://", "https://")) else None
