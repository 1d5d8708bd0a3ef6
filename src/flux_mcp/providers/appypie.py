"""AppyPie (the Pixazo gateway on Azure API Management): synchronous FLUX.1 [schnell], one image per call.

The wire, as this adapter relies on it:

* `POST https://gateway.appypie.com/flux-1-schnell/v1/getData` (the same API is served at
  gateway.pixazo.ai, AppyPie's API brand), with the key in `Ocp-Apim-Subscription-Key` and
  `Content-Type: application/json`, `Cache-Control: no-cache`.
* The body is `{prompt, num_steps (default 4, at most 8), seed, height, width}` (width and height
  default to 1024; no bounds are documented). The page's code samples are broken (a missing comma,
  an undefined variable, no key header), so they are not taken as authoritative.
* The answer is final: HTTP 200 `{"output": "<image URL>"}` (a public bucket; its lifetime is not
  documented, so the image is copied at once). A 200 may instead say `{"msg": "Image Getting
  Created"}`, and there is no way to fetch that result later: such a call is a failed image that may
  have been billed, and it is never resent.
* There is no job id, status, upload or edit API, so this adapter makes its own id and the result is
  journaled as it arrives. Several images mean several calls, each sent exactly once.
* The page's errors: 400 `{"error": "Invalid request parameters"}` or "Invalid prompt parameter", 401
  "Invalid or missing authentication", 403 "Access denied for this operation", 404 "Endpoint not
  found", 429 "Rate limit exceeded, please retry later", 500 "An unexpected error occurred". The
  gateway answers in its own shape, `{"statusCode", "message"}`: 401 "Access denied due to missing /
  invalid subscription key", 429 "Rate limit is exceeded. Try again in 60 seconds." with
  `retry-after`, and 403 "Out of call volume quota" when the plan's quota is used up.
* Pixazo's page calls the API free; AppyPie's own page states no price.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import httpx2

from ..errors import AuthFailed, FluxError, InsufficientCredits, ProviderRejected, RateLimited
from ..http import ErrorRule
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import APPYPIE
from .wire import Loose, Text, UnusableOutput, WireModel, read, resolve_output

PATH = "/flux-1-schnell/v1/getData"
DEFAULT_STEPS = 4
_MAX_SEED = 2_147_483_647
_CHECK_KEY = ("Check APPYPIE_SUBSCRIPTION_KEY: it must be the current primary or secondary key of a "
              "subscription to Flux Schnell, copied whole; then restart the server.")

_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(InsufficientCredits, "AppyPie says the subscription's call quota is used up (HTTP 403: "
              "{detail}). Wait until it renews or upgrade the plan behind APPYPIE_SUBSCRIPTION_KEY, or use "
              "another provider.", status=403, pattern="quota"),
    ErrorRule(AuthFailed, "AppyPie refused the subscription key (HTTP 401: {detail}). " + _CHECK_KEY,
              status=401),
    ErrorRule(AuthFailed, "AppyPie denied access; the subscription may not include the Flux Schnell API "
              "(HTTP 403: {detail}). " + _CHECK_KEY, status=403),
    ErrorRule(RateLimited, "AppyPie is rate limiting requests (HTTP 429: {detail}); the image was not made. "
              "Try again {when}.", status=429),
    ErrorRule(ProviderRejected, "AppyPie answered HTTP 404 ({detail}) for " + PATH + ". Check "
              "APPYPIE_BASE_URL (default https://gateway.appypie.com).", status=404),
    ErrorRule(ProviderRejected, "AppyPie rejected the request (HTTP 400: {detail}). It takes a non-empty "
              "prompt, steps 1-8 and whole-pixel width/height; adjust them and call again.", status=400),
)
"""The page's and the gateway's error answers; a 5xx is the shared "may or may not have started" (the
image may have been made and billed), and it is never resent."""


class _Answer(WireModel):
    output: Loose[list[Loose[str]] | str] = None
    msg: Text = None

    @property
    def found(self) -> str | None:
        values = self.output if isinstance(self.output, list) else [self.output]
        return next((v.strip() for v in values if v and v.strip()), None)


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
            # Pixazo titles the page "(Free)", but AppyPie's own page states no price: leave it unknown.
            price_usd=None,
            # No typical duration is documented (and the call answers with the image: nothing is polled).
            canonical="flux-schnell",
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
        answer = read(_Answer, response)
        found = answer.found if answer else None
        if found is not None:
            try:
                return resolve_output(found, self.base_url, inline=False)
            except UnusableOutput as exc:
                return (f"AppyPie answered HTTP {response.status_code}, but its image {exc}. It offers no "
                        "way to fetch a result later, and this server did not resend the request; the call "
                        "may still have been billed")
        said = self.http.message_of(response) if answer is not None else "no JSON body"
        return (f"AppyPie answered HTTP {response.status_code} without an image ({said}). It offers no way "
                "to fetch a result later, and this server did not resend the request; the call may still "
                "have been billed")

    def _error(self, response: httpx2.Response) -> FluxError:
        return self.http.error_for(response, _ERRORS, phase="submit")
