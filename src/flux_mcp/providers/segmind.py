"""Segmind: synchronous v1 calls, `POST /v1/{model}` answered with the image itself.

There is no job id and nothing to poll: the server makes the prediction id, and `num_images > 1`
becomes that many parallel calls with consecutive seeds, each sent exactly once. Uploads go to a
different host (`workflows-api.segmind.com/upload-asset`). Wire details and the documentation's
contradictions: shared/providers/API-NOTES.md section 2.
"""

from __future__ import annotations

import copy
import math
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx2

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
from ..http import parse_json
from ..media import decode_data_uri, to_data_uri
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .registry import SEGMIND

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
_IMAGE_KEYS = ("image", "images", "output", "output_url", "outputs", "url")


class Segmind(Provider):
    spec = SEGMIND
    models = (
        ModelInfo("flux-schnell", frozenset({"generate"}),
                  "FLUX.1 [schnell]: fast, 1-8 steps (default 4); width/height 512-2048 in multiples of 8.",
                  size=Range(512, 2048, multiple_of=8), steps=Range(1, 8), max_images=MAX_IMAGES,
                  price_usd=0.008),
        ModelInfo("flux-dev", frozenset({"generate"}),
                  "FLUX.1 [dev]: higher quality; width/height choose the nearest aspect ratio "
                  f"({', '.join(DEV_RATIOS)}).",
                  # guidance 0-10 is documented; the steps bound is not (the page's sample sends 25).
                  size=_ANY_SIZE, steps=Range(1, 50), guidance=Range(0, 10), max_images=MAX_IMAGES,
                  price_usd=0.02),
        ModelInfo("flux-kontext-pro", frozenset({"edit"}),
                  "FLUX.1 Kontext [pro]: instruction-based editing. Keeps the input's aspect ratio at the "
                  "default 1024x1024; other width/height choose the nearest ratio.",
                  size=_ANY_SIZE, requires_image=True, price_usd=0.05),
        ModelInfo("flux-img2img", frozenset({"edit"}),
                  "FLUX.1 [dev] image-to-image (denoise 0.75): restyles the input, keeping its size; "
                  "steps 1-50 (default 20).",
                  size=None, steps=Range(1, 50), requires_image=True, price_usd=0.026),
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
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or (ctype in ("", "application/octet-stream") and _looks_like_image(
                response.content)):
            if not response.content:
                return None, "Segmind answered HTTP 200 with an empty image"
            mime = ctype if ctype.startswith("image/") else None
            return OutputRef(data=response.content, mime_type=mime), None
        payload = parse_json(response)
        if isinstance(payload, dict):
            found = _find_output(payload)
            if found is not None:
                return found, None
            return None, f"Segmind answered HTTP 200 without an image ({self.http.message_of(response)})"
        return None, (f"Segmind answered HTTP 200 with {ctype or 'an untyped body'} instead of an image "
                      f"({self.http.message_of(response)})")

    def _combine(self, req: ImageRequest, calls: list[_Call]) -> JobState:
        info = self.model_info(req.model)
        price = info.price_usd if info else None
        billed = [c for c in calls if c.billed]
        costs = [c.cost if c.cost is not None else price for c in billed]
        known = [c for c in costs if c is not None]
        cost = sum(known) if billed and len(known) == len(costs) else None
        remaining = min((c.remaining for c in calls if c.remaining is not None), default=None)
        done = [c for c in calls if c.output is not None]
        failed = [c for c in calls if c.output is None]
        outputs = [c.output for c in done if c.output]
        if done and not failed:
            return JobState("succeeded", outputs=outputs, cost_usd=cost, remaining_credits=remaining)
        reasons = "; ".join(
            f"image {calls.index(c) + 1} (seed {c.seed}): {c.problem or c.error}" for c in failed)
        if done:
            return JobState(
                "succeeded", outputs=outputs, cost_usd=cost, remaining_credits=remaining,
                error=self.http.redactor.scrub(
                    f"{len(failed)} of {len(calls)} Segmind calls failed and were not resent: {reasons}."))
        if billed:
            what = reasons if len(calls) > 1 else (calls[0].problem or str(calls[0].error))
            return JobState("failed", error=self.http.redactor.scrub(what), error_code="no_output",
                            cost_usd=cost, remaining_credits=remaining)
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
        payload = parse_json(response)
        if not 200 <= response.status_code < 300 or not isinstance(payload, dict):
            raise self._error(response, None)
        for key in ("urls", "file_urls"):
            urls = payload.get(key)
            urls = urls if isinstance(urls, list) else [urls]
            for url in urls:
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    return url
        raise ProviderUnavailable("Segmind accepted the upload but returned no file URL; try again.")

    def _error(self, response: httpx2.Response, model: str | None) -> Exception:
        """Segmind's documented error answers, each with what to do next."""
        status = response.status_code
        detail = self.http.message_of(response)
        low = detail.lower()
        what = f"model {model}" if model else "the upload"
        if status == 406 and "content type" in low.replace("-", " "):
            return ProviderRejected(
                f"Segmind refused the request's content type (HTTP 406: {detail}). This is a flux-mcp bug; "
                "please report it.", status_code=406)
        if status == 406 and "limit" in low:
            return InsufficientCredits(
                f"Segmind refused the call: the team's spend limit is reached (HTTP 406: {detail}). Ask the "
                "team admin to raise it on segmind.com, or use another provider.", status_code=406)
        if status == 406 or (status < 500 and "insufficient" in low and "credit" in low):
            return InsufficientCredits(
                f"Segmind says the account does not have enough credits (HTTP {status}: {detail}). Top up at "
                "segmind.com (Billing), or use another provider.", status_code=status)
        if status == 403:
            instead = f", or choose another model: {self._choices()}" if model else ""
            return AuthFailed(
                f"Segmind does not let this key use {what} (HTTP 403: {detail}). Enable it for the key's "
                f"team on segmind.com{instead}.", status_code=403)
        if status == 404:
            where = "SEGMIND_UPLOAD_BASE_URL" if model is None else "SEGMIND_BASE_URL"
            return ProviderRejected(
                f"Segmind has no endpoint for {what} (HTTP 404: {detail}). Check the model id and {where}.",
                status_code=404)
        if status == 405:
            return ProviderRejected(
                f"Segmind answered 405 Method Not Allowed ({detail}) for {what}. Check that SEGMIND_BASE_URL "
                "points at the Segmind API (https://api.segmind.com).", status_code=405)
        if status == 410:
            return ProviderRejected(
                f"Segmind has retired {what} (HTTP 410: {detail}). Choose another model: {self._choices()}.",
                status_code=410)
        if status == 429:
            return self._rate_limited(response, detail)
        if status in (400, 422):
            return ProviderRejected(
                f"Segmind rejected the parameters (HTTP {status}: {detail}); nothing was charged. Adjust "
                "them and call again.", status_code=status)
        if status >= 500:
            return ProviderUnavailable(
                f"Segmind had a server error (HTTP {status}: {detail}). Segmind bills only successful "
                "answers, so this call should not have been charged. A 500 is often a parameter value the model cannot handle: "
                "adjust it, or try again later.", status_code=status)
        return self.http.error_for(response, submit=True)

    def _rate_limited(self, response: httpx2.Response, detail: str) -> Exception:
        raw = response.headers.get("x-rate-limit-reset-at-utc", "").strip()
        wait = _seconds_until(raw) if raw else None
        if wait is None:
            return self.http.error_for(response, submit=True)
        seconds = max(1, math.ceil(wait))
        return RateLimited(
            f"Segmind is rate limiting requests (HTTP 429: {detail}); the job was not created. Try again in "
            f"about {seconds} seconds (the limit resets at {self.http.redactor.scrub(raw)}).",
            status_code=429, retry_after=float(seconds))

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
    """Segmind takes a URL or a raw base64 string [SEG-M-I2I]: a data: URI loses its prefix."""
    if image and image.startswith("data:"):
        return image.split(",", 1)[1] if "," in image else image
    return image


def _find_output(payload: dict[str, Any]) -> OutputRef | None:
    """The image in a JSON answer: `image`, `images`, `output`, `output_url` ... as a URL or base64."""
    for key in _IMAGE_KEYS:
        value = payload.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, dict):
            value = next((value[k] for k in ("url", "image", "data") if isinstance(value.get(k), str)), None)
        if not isinstance(value, str) or not value.strip():
            continue
        value = value.strip()
        if value.startswith(("http://", "https://")):
            return OutputRef(url=value)
        try:
            data = decode_data_uri(value)
        except FluxError:
            continue
        if _looks_like_image(data):
            return OutputRef(data=data)
    data = payload.get("data")
    return _find_output(data) if isinstance(data, dict) else None


def _looks_like_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8"))


def _number(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _seconds_until(raw: str) -> float | None:
    """Seconds until `x-rate-limit-reset-at-utc` (ISO 8601, HTTP date, or epoch seconds/milliseconds)."""
    when: datetime | None = None
    number = _number(raw)
    if number is not None:
        return max(0.0, (number / 1000 if number > 1e11 else number) - time.time())
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
