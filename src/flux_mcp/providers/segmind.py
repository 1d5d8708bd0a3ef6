"""Segmind: synchronous v1 calls, `POST /v1/{model}` answered with the image itself.

The wire, as this adapter relies on it:

* Base `https://api.segmind.com`, the key in `x-api-key` (the gateway does not take a Bearer token).
* `POST /v1/{slug}` with a JSON body runs the model and answers HTTP 200 with the image bytes
  (`image/jpeg`). Newer model pages show a JSON answer instead, so the answer is read by its type:
  an image, or JSON carrying the image under `image`, `images`, `output`, `output_url`, `outputs` or
  `url` (a URL, or base64 — that JSON shape is not documented). Text is a failed call.
* There is no job id and nothing to poll on v1: the server makes the prediction id. Several images
  in one v1 call are not documented, so `num_images > 1` becomes that many parallel calls with
  consecutive seeds, each sent exactly once (Segmind offers no idempotency: never re-POST).
* Every HTTP 200 is billed, image or not; errors are not. Headers: `x-remaining-credits`, `x-cost`.
* Fields per model: flux-schnell `prompt, steps (1-8), seed, sampler_name, scheduler, samples,
  width/height (512-2048, multiples of 8), denoise`; flux-dev `aspect_ratio` from a fixed list,
  `guidance` (0-10), `steps`, `output_format`; flux-kontext-pro `input_image`, `aspect_ratio`
  (`match_input_image` or a ratio), `safety_tolerance` (at most 2 with an input image); flux-img2img
  `image, steps (1-50), denoise, scheduler, sampler_name, base64` (`base64`'s default differs
  between pages, so it is always sent). Image inputs are a URL or a raw base64 string. Segmind's
  default seed is a constant, so a random one is always sent.
* Uploads go to another host: `POST https://workflows-api.segmind.com/upload-asset` with JSON
  `{"data_urls": ["data:<mime>;base64,..."]}`, answered `{"urls": [...]}` (the SDK documents
  `file_urls`; both are read).
* Errors carry `{"error": "<message>"}`: 401 bad or missing key, 403 model not allowed for the key's
  team, 404 no such endpoint, 405 (an HTML page), 406 insufficient credits, a team spend limit, or a
  wrong content type (told apart by the message), 410 model retired, 422 failed, 429 rate limited
  with `x-rate-limit-reset-at-utc` (no Retry-After), 500 (often a parameter value the model cannot
  handle).
"""

from __future__ import annotations

import copy
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import httpx2
from pydantic import AliasChoices, BeforeValidator, Field

from ..errors import (
    AuthFailed,
    ConfigError,
    FluxError,
    InsufficientCredits,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
)
from ..http import CLIENT_ERROR, SERVER_ERROR, ErrorRule
from ..media import to_data_uri
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import SEGMIND
from .wire import Loose, UnusableOutput, WireModel, first_string, looks_like_image, read, resolve_output

DEFAULT_UPLOAD_BASE_URL = "https://workflows-api.segmind.com"
SEED_LIMIT = 2**31
"""Seeds stay below this (the tools' own bound), wrapping when seed + i would pass it."""
MAX_IMAGES = 4
"""v1 answers one image per call; more images are more parallel calls, kept to a modest number."""
KONTEXT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4", "21:9", "9:21", "2:1",
                  "1:2")
DEV_RATIOS = ("1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
_ANY_SIZE = Range(256, 2048)
"""For aspect-ratio models width/height only choose the nearest ratio."""

_ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(ProviderRejected, "Segmind refused the request's content type (HTTP 406: {detail}). This is a "
              "flux-mcp bug; please report it.", status=406, pattern=r"content[ -]?type"),
    ErrorRule(InsufficientCredits, "Segmind refused the call: the team's spend limit is reached (HTTP 406: "
              "{detail}). Ask the team admin to raise it on segmind.com, or use another provider.",
              status=406, pattern="limit"),
    ErrorRule(InsufficientCredits, "Segmind says the account does not have enough credits (HTTP {status}: "
              "{detail}). Top up at segmind.com (Billing), or use another provider.", status=406),
    ErrorRule(InsufficientCredits, "Segmind says the account does not have enough credits (HTTP {status}: "
              "{detail}). Top up at segmind.com (Billing), or use another provider.",
              status=CLIENT_ERROR, pattern="insufficient.*credit|credit.*insufficient"),
    ErrorRule(AuthFailed, "Segmind does not let this key use {what} (HTTP 403: {detail}). Enable it for the "
              "key's team on segmind.com{instead}.", status=403),
    ErrorRule(ProviderRejected, "Segmind has no endpoint for {what} (HTTP 404: {detail}). Check the model id "
              "and {where}.", status=404),
    ErrorRule(ProviderRejected, "Segmind answered 405 Method Not Allowed ({detail}) for {what}. Check that "
              "SEGMIND_BASE_URL points at the Segmind API (https://api.segmind.com).", status=405),
    ErrorRule(ProviderRejected, "Segmind has retired {what} (HTTP 410: {detail}). Choose another model: "
              "{choices}.", status=410),
    ErrorRule(RateLimited, "Segmind is rate limiting requests (HTTP 429: {detail}); {then} {when}{reset}.",
              status=429),
    ErrorRule(ProviderRejected, "Segmind rejected the parameters (HTTP {status}: {detail}); nothing was "
              "charged. Adjust them and call again.", status=(400, 422)),
    ErrorRule(ProviderUnavailable, "Segmind had a server error (HTTP {status}: {detail}). Segmind bills only "
              "successful answers, so this call should not have been charged. A 500 is often a parameter "
              "value the model cannot handle: adjust it, or try again later.", status=SERVER_ERROR),
)
"""Segmind's documented error answers, each with what to do next. Every v1 call is a submit (never
resent), but a 5xx is not an unknown outcome here: Segmind bills only HTTP 200."""

_Item = Annotated[str | None, BeforeValidator(first_string("url", "image", "data"))]


class _JsonAnswer(WireModel):
    """A v1 answer in JSON: the image under one of several names (undocumented), maybe inside `data`."""

    image: list[_Item] | _Item = Field(None, validation_alias=AliasChoices(
        "image", "images", "output", "output_url", "outputs", "url"))
    data: Loose[_JsonAnswer] = None

    def found(self) -> str | None:
        values = self.image if isinstance(self.image, list) else [self.image]
        value = next((v for v in values if v), None)
        return value or (self.data.found() if self.data else None)


class _UploadAnswer(WireModel):
    urls: list[Loose[str]] | Loose[str] = Field(None, validation_alias=AliasChoices("urls", "file_urls"))


class Segmind(Provider):
    spec = SEGMIND
    # Typical durations are the ones each model's page states (about 10, 20, 21 and 25 s). v1 answers with
    # the image itself, so they are never polled for; they tell how long a call takes. flux-img2img is
    # FLUX.1 [dev] image-to-image, so it is the canonical flux-dev for edits.
    models = (
        ModelInfo("flux-schnell", frozenset({"generate"}),
                  "FLUX.1 [schnell]: fast, 1-8 steps (default 4); width/height 512-2048 in multiples of 8.",
                  size=Range(512, 2048, multiple_of=8), steps=Range(1, 8), max_images=MAX_IMAGES,
                  price_usd=0.008, canonical="flux-schnell", typical_seconds=10.0),
        ModelInfo("flux-dev", frozenset({"generate"}),
                  "FLUX.1 [dev]: higher quality; width/height choose the nearest aspect ratio "
                  f"({', '.join(DEV_RATIOS)}).",
                  # guidance 0-10 is documented; the steps bound is not (the page's sample sends 25).
                  size=_ANY_SIZE, steps=Range(1, 50), guidance=Range(0, 10), max_images=MAX_IMAGES,
                  price_usd=0.02, canonical="flux-dev", typical_seconds=20.0, exact_size=False),
        ModelInfo("flux-kontext-pro", frozenset({"edit"}),
                  "FLUX.1 Kontext [pro]: instruction-based editing. Keeps the input's aspect ratio at the "
                  "default 1024x1024; other width/height choose the nearest ratio.",
                  size=_ANY_SIZE, requires_image=True, price_usd=0.05, canonical="flux-kontext-pro",
                  typical_seconds=21.0, exact_size=False, key_background=frozenset({"generate", "edit"})),
        ModelInfo("flux-img2img", frozenset({"edit"}),
                  "FLUX.1 [dev] image-to-image (denoise 0.75): restyles the input, keeping its size; "
                  "steps 1-50 (default 20).",
                  size=None, steps=Range(1, 50), requires_image=True, price_usd=0.026, canonical="flux-dev",
                  typical_seconds=25.0, exact_size=False),
    )
    default_model = "flux-schnell"
    default_edit_model = "flux-kontext-pro"
    can_upload = True
    accepts_data_uri = True
    allow_unknown_models = False
    """Every Segmind model has its own fields; a guessed body would be a paid failure at best."""

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.key()}

    def prepare(self, req: ImageRequest) -> ImageRequest:
        """The inherited checks, plus a seed: Segmind's default seed is a constant, not random."""
        req = super().prepare(req)
        if req.seed is None:
            req = req.model_copy(update={"seed": random.randrange(SEED_LIMIT)})
        return req

    def body(self, req: ImageRequest, seed: int) -> dict[str, Any]:
        """The request body for one call (one image) with `seed`."""
        image = _inline(req.image)
        if req.model == "flux-schnell":
            return {"prompt": req.prompt, "steps": req.steps or 4, "seed": seed, "sampler_name": "euler",
                    "scheduler": "normal", "samples": 1, "width": req.width, "height": req.height,
                    "denoise": 1}
        if req.model == "flux-dev":
            body: dict[str, Any] = {"prompt": req.prompt, "seed": seed, "samples": 1, "output_format": "png",
                                    "aspect_ratio": nearest_ratio(req.width, req.height, DEV_RATIOS)}
            if req.steps is not None:
                body["steps"] = req.steps
            if req.guidance_scale is not None:
                body["guidance"] = req.guidance_scale
            return body
        if req.model == "flux-kontext-pro":
            keep = (req.width, req.height) == (1024, 1024)
            return {"prompt": req.prompt, "input_image": image, "seed": seed, "output_format": "png",
                    "safety_tolerance": 2,
                    "aspect_ratio": "match_input_image" if keep else nearest_ratio(req.width, req.height,
                                                                                    KONTEXT_RATIOS)}
        if req.model == "flux-img2img":
            return {"prompt": req.prompt, "image": image, "steps": req.steps or 20, "seed": seed,
                    "denoise": 0.75, "scheduler": "normal", "sampler_name": "euler", "base64": False}
        raise AssertionError(f"prepare refuses unknown model {req.model!r}")

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        """One v1 call per image, in parallel; each is sent once, whatever the others do."""
        base_seed = req.seed if req.seed is not None else random.randrange(SEED_LIMIT)
        seeds = [(base_seed + i) % SEED_LIMIT for i in range(req.num_images)]
        calls: list[_Call] = [_Call(seed) for seed in seeds]
        started = time.time()

        async def run(call: _Call) -> None:
            try:
                await self._call(req, call)
            except FluxError as exc:  # SubmitOutcomeUnknown included: kept, reported, never resent
                call.error = exc

        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(run, call)
        return Submitted(native_id=uuid.uuid4().hex, state=self._combine(req, calls), submitted_at=started)

    async def _call(self, req: ImageRequest, call: _Call) -> None:
        url = f"{self.base_url}/v1/{req.model}"
        body = self.body(req, call.seed)
        response = await self.http.submit("POST", url, headers=self._headers(), json=body)
        if not 200 <= response.status_code < 300:
            raise self._error(response, req.model)
        call.billed = True  # Segmind bills every HTTP 200, image or not
        call.cost = _number(response.headers.get("x-cost"))
        call.remaining = _number(response.headers.get("x-remaining-credits"))
        call.output, call.problem = self._output_of(response)

    def _output_of(self, response: httpx2.Response) -> tuple[OutputRef | None, str | None]:
        """The image of a billed (HTTP 200) answer, or why there is none."""
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or (ctype in ("", "application/octet-stream") and looks_like_image(
                response.content)):
            if not response.content:
                return None, "Segmind answered HTTP 200 with an empty image"
            mime = ctype if ctype.startswith("image/") else None
            return OutputRef(data=response.content, mime_type=mime), None
        answer = read(_JsonAnswer, response)
        if answer is None:
            return None, (f"Segmind answered HTTP 200 with {ctype or 'an untyped body'} instead of an image "
                          f"({self.http.message_of(response)})")
        found = answer.found()
        if found is None:
            return None, f"Segmind answered HTTP 200 without an image ({self.http.message_of(response)})"
        try:
            return resolve_output(found, self.base_url, inline=True), None
        except UnusableOutput as exc:
            return None, f"Segmind answered HTTP 200, but its image {exc}"

    def _combine(self, req: ImageRequest, calls: list[_Call]) -> JobState:
        info = self.model_info(req.model)
        price = info.price_usd if info else None
        billed = [c for c in calls if c.billed]
        costs = [c.cost if c.cost is not None else price for c in billed]
        known = [c for c in costs if c is not None]
        cost = sum(known) if billed and len(known) == len(costs) else None
        guessed = any(c.cost is None for c in billed)
        remaining = min((c.remaining for c in calls if c.remaining is not None), default=None)
        done = [c for c in calls if c.output is not None]
        failed = [c for c in calls if c.output is None]
        outputs = [c.output for c in done if c.output]
        if done and not failed:
            return JobState("succeeded", outputs=outputs, cost_usd=cost, cost_estimated=guessed,
                            remaining_credits=remaining)
        reasons = "; ".join(
            f"image {calls.index(c) + 1} (seed {c.seed}): {c.problem or c.error}" for c in failed)
        if done:
            return JobState(
                "succeeded", outputs=outputs, cost_usd=cost, cost_estimated=guessed, remaining_credits=remaining,
                error=self.http.redactor.scrub(
                    f"{len(failed)} of {len(calls)} Segmind calls failed and were not resent: {reasons}."))
        if billed:
            what = reasons if len(calls) > 1 else (calls[0].problem or str(calls[0].error))
            return JobState("failed", error=self.http.redactor.scrub(what), error_code="no_output",
                            cost_usd=cost, cost_estimated=guessed, remaining_credits=remaining)
        errors = [c.error for c in calls if c.error is not None]
        first = next((e for e in errors if isinstance(e, SubmitOutcomeUnknown)), errors[0])
        if len(calls) == 1:
            raise first
        combined = copy.copy(first)
        combined.args = (f"All {len(calls)} Segmind calls failed; none was resent. {first}",)
        raise combined

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        base = (self.settings.extra.get("upload_base_url") or DEFAULT_UPLOAD_BASE_URL).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"SEGMIND_UPLOAD_BASE_URL must start with http:// or https:// (got {base!r}).")
        # Free and creates no job, but each call makes a new file: sent once, never retried.
        response = await self.http.submit(
            "POST", f"{base}/upload-asset", json={"data_urls": [to_data_uri(data, mime_type)]},
            headers={**self._headers(), "accept": "application/json, text/plain, */*"})
        answer = read(_UploadAnswer, response)
        if not 200 <= response.status_code < 300 or answer is None:
            raise self._error(response, None)
        for url in answer.urls if isinstance(answer.urls, list) else [answer.urls]:
            if url and url.strip().lower().startswith(("http://", "https://")):
                return url.strip()
        raise ProviderUnavailable("Segmind accepted the upload but returned no file URL; try again.")

    def _error(self, response: httpx2.Response, model: str | None) -> Exception:
        """Segmind's documented error answers (`_ERRORS`), each with what to do next."""
        instead = f", or choose another model: {self._choices()}" if model else ""
        return self.http.error_for(
            response, _ERRORS, phase="submit" if model else "upload",
            what=f"model {model}" if model else "the upload", instead=instead, choices=self._choices(),
            where="SEGMIND_UPLOAD_BASE_URL" if model is None else "SEGMIND_BASE_URL")

    def _choices(self) -> str:
        return ", ".join(m.id for m in self.models)


@dataclass
class _Call:
    """One v1 call (one image) and what came of it."""

    seed: int
    output: OutputRef | None = None
    problem: str | None = None
    """Why an HTTP 200 (billed) answer held no image."""
    error: FluxError | None = None
    billed: bool = False
    cost: float | None = None
    remaining: float | None = None


def nearest_ratio(width: int, height: int, ratios: tuple[str, ...]) -> str:
    """The ratio in `ratios` closest to width:height, compared on a log scale (2:1 and 1:2 are symmetric)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        a, b = ratio.split(":")
        return abs(math.log(int(a) / int(b)) - target)

    return min(ratios, key=distance)


def _inline(image: str | None) -> str | None:
    """Segmind takes a URL or a raw base64 string: a data: URI loses its prefix."""
    if image and image.startswith("data:"):
        return image.split(",", 1)[1] if "," in image else image
    return image


def _number(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
