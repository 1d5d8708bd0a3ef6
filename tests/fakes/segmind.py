"""A wire-level fake of Segmind's synchronous v1 API and its upload API.

What it reproduces, as Segmind's model pages, its SDK and a third-party compilation of its error
documentation describe it:
* `x-api-key` on every API call (Bearer is not accepted); the two documented 401 bodies:
  `{"error": "Missing Authorization or x-api-key in header"}` and
  `{"error": "Unauthorized. API key is invalid or may have expired..."}`.
* `POST /v1/{slug}` for `flux-schnell`, `flux-dev`, `flux-kontext-pro`, `flux-img2img`, validating
  exactly the documented fields and limits (schnell: width/height 512-2048 in multiples of 8, steps 1-8,
  denoise 0-1, the sampler/scheduler enums; img2img: required image/steps 1-50/denoise/scheduler/sampler_name;
  kontext-pro: aspect_ratio enum, output_format, safety_tolerance 0-6 and at most 2 with an input image;
  dev: aspect_ratio enum, guidance 0-10). Image inputs must be a URL or a raw base64 string (the
  img2img page's sample encodes files that way), so a `data:` URI is refused. Out-of-range values get
  `invalid_status` (400 by default; the sources allow 400 or 406).
* A 200 answer is the image itself, `image/jpeg`, with `x-remaining-credits` decremented by the
  model's price and `x-cost`; every 200 is billed and appended to `ledger` (Segmind bills HTTP 200
  only). `answer` switches to the JSON variants the newer model pages' templates imply (`image` URL,
  `images` list, `output` base64, `output_url`, data URI), a 200 text body, or a JSON body without
  an image.
* 406 `{"error": "Insufficient credits..."}` when the balance is below the price; 406 "Invalid content type"
  for a body that is neither JSON nor multipart; 403 for slugs in `forbidden`; 410 for retired slugs; 404 for
  unknown ones; 405 with an HTML page for a method other than POST.
* `POST /upload-asset` (the workflows-api host; tests point both base URLs here) with
  `{"data_urls": ["data:<mime>;base64,..."]}` -> `{"urls": [...]}` (the storage docs) or, with
  `upload_style="file_urls"`, the SDK's `{"file_urls": [...], "message": ...}`.
* Result and uploaded files are served from the fake's own host (`/files/...`, `/assets/...`).

Knobs: `balance`, `prices`, `report_cost`, `answer`, `invalid_status`, `forbidden`, `upload_style`,
`errors` (this fake's name for `submit_errors`: answered to v1 calls instead of running them, after the
key check), and the shared ones of `FakeBase` (`echo_key`, `revoke()`). There is no status endpoint.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .base import Entry, FakeBase, Injected
from .wire import jpeg_bytes, json_response

PRICES = {"flux-schnell": 0.008, "flux-dev": 0.02, "flux-kontext-pro": 0.05, "flux-img2img": 0.026}
RETIRED = {"sdxl1.0-txt2img"}
SAMPLERS = {"euler", "euler_pp", "euler_ancestral", "euler_ancestral_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast"}
"""The documented prefix of the 26-27 sampler names (the sources truncate the list)."""
SCHEDULERS = {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"}
KONTEXT_RATIOS = {"match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4",
                  "21:9", "9:21", "2:1", "1:2"}
DEV_RATIOS = {"1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"}
MISSING_KEY = {"error": "Missing Authorization or x-api-key in header"}
BAD_KEY = {"error": "Unauthorized. API key is invalid or may have expired. Please check your API key."}
HTML_405 = "<html><head><title>405 Not Allowed</title></head><body><h1>405 Not Allowed</h1></body></html>"


class Invalid(Exception):
    pass


@dataclass
class SegmindFake(FakeBase):
    key_headers = ("x-api-key",)
    key: str
    balance: float = 10.0
    prices: dict[str, float] = field(default_factory=lambda: dict(PRICES))
    report_cost: bool = True
    answer: str = "image"
    """image | json-image-url | json-images | json-output-base64 | json-output-url | json-data-uri | text |
    json-no-image"""
    invalid_status: int = 400
    forbidden: set[str] = field(default_factory=set)
    upload_style: str = "urls"
    uploads: dict[str, bytes] = field(default_factory=dict)
    image_size: tuple[int, int] = (64, 48)

    @property
    def expected_key(self) -> str:
        return self.key

    def unauthorized_answer(self, presented: str | None) -> Injected:
        return 401, (MISSING_KEY if presented is None else BAD_KEY), {}

    def forbidden_answer(self) -> Injected:
        return 403, {"error": "You are not permitted to access the model flux-schnell."}, {}

    @property
    def errors(self) -> list[Entry]:
        """This fake's name for `submit_errors` (v1 calls are the paid requests)."""
        return self.submit_errors

    def v1_calls(self, slug: str | None = None) -> int:
        """How many v1 POSTs arrived (for `slug`, or any)."""
        prefix = f"POST /v1/{slug or ''}"
        return sum(1 for r in self.requests if (r == prefix if slug else r.startswith(prefix)))

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = self.log(request)
        if request.method == "GET" and path.startswith(("/files/", "/assets/")):
            return self._file(path)
        if (refused := self.check_key(request)) is not None:
            return refused
        if path == "/upload-asset" and request.method == "POST":
            return self._upload(request)
        m = re.fullmatch(r"/v1/([A-Za-z0-9._-]+)", path)
        if not m:
            return json_response(404, {"error": "The requested URL does not exist"})
        if request.method != "POST":
            return httpx2.Response(405, text=HTML_405, headers={"content-type": "text/html"})
        return self._v1(m.group(1), request)

    # --- v1 ------------------------------------------------------------------------------------

    def _v1(self, slug: str, request: httpx2.Request) -> httpx2.Response:
        if slug in RETIRED:
            return json_response(410, {"error": f"Model {slug} has been retired. Please use a newer model."})
        if slug not in self.prices:
            return json_response(404, {"error": "The requested URL does not exist"})
        if slug in self.forbidden:
            return json_response(403, {"error": f"You are not permitted to access the model {slug}."})
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype and "multipart/form-data" not in ctype:
            return json_response(406, {"error": "Invalid content type. Use application/json or "
                                                "multipart/form-data."})
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        try:
            body = json.loads(request.content)
            if not isinstance(body, dict):
                raise Invalid("the body must be a JSON object")
            VALIDATORS[slug](body)
        except (ValueError, Invalid) as exc:
            return json_response(self.invalid_status, {"error": str(exc)})
        price = self.prices[slug]
        if self.balance < price:
            return json_response(406, {"error": "Insufficient credits. Please top up your account."})
        self.balance = round(self.balance - price, 6)
        self.ledger.append({"slug": slug, **body})
        headers = {"x-remaining-credits": f"{self.balance:g}", "x-request-id": uuid.uuid4().hex,
                   "x-seed-value": str(body.get("seed", ""))}
        if self.report_cost:
            headers["x-cost"] = f"{price:g}"
        return self._answer(request, headers)

    def _answer(self, request: httpx2.Request, headers: dict[str, str]) -> httpx2.Response:
        url = self.file_url(request, f"{uuid.uuid4().hex}.jpg")
        raw = jpeg_bytes(*self.image_size)
        b64 = base64.b64encode(raw).decode()
        bodies: dict[str, Any] = {
            "json-image-url": {"image": url, "status": "Success"},
            "json-images": {"images": [url]},
            "json-output-base64": {"output": b64, "status": "Success"},
            "json-output-url": {"output_url": url},
            "json-data-uri": {"image": f"data:image/jpeg;base64,{b64}"},
            "json-no-image": {"status": "Success", "message": self.echoed("Request processed")},
        }
        if self.answer == "image":
            return httpx2.Response(200, content=raw, headers={**headers, "content-type": "image/jpeg"})
        if self.answer == "text":
            return httpx2.Response(200, text="Image generation finished", headers=headers)
        return httpx2.Response(200, json=bodies[self.answer], headers=headers)

    # --- upload and files ------------------------------------------------------------------------

    def _upload(self, request: httpx2.Request) -> httpx2.Response:
        if "application/json" not in request.headers.get("content-type", ""):
            return json_response(406, {"error": "Invalid content type. Use application/json."})
        try:
            items = json.loads(request.content)["data_urls"]
        except (ValueError, KeyError, TypeError):
            return json_response(400, {"error": "data_urls is required"})
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        urls = []
        for item in items if isinstance(items, list) else []:
            m = re.fullmatch(r"data:(image/[a-z+.-]+);base64,([A-Za-z0-9+/=]+)", str(item))
            if not m:
                return json_response(400, {"error": "each data_url must be data:<mime>;base64,<data>"})
            name = f"{uuid.uuid4().hex[:12]}.{m.group(1).split('/')[1]}"
            self.uploads[name] = base64.b64decode(m.group(2))
            urls.append(f"{base}/assets/{name}")
        if not urls:
            return json_response(400, {"error": "data_urls must not be empty"})
        if self.upload_style == "file_urls":
            return json_response(200, {"file_urls": urls, "message": "Files uploaded successfully"})
        return json_response(200, {"urls": urls})

    def _file(self, path: str) -> httpx2.Response:
        if path.startswith("/assets/"):
            data = self.uploads.get(path.removeprefix("/assets/"))
            if data is None:
                return httpx2.Response(404, text="no such asset")
            return httpx2.Response(200, content=data, headers={"content-type": "image/png"})
        return httpx2.Response(200, content=jpeg_bytes(*self.image_size),
                               headers={"content-type": "image/jpeg"})


# --- the documented fields of each model ----------------------------------------------------------


def _int(body: dict[str, Any], name: str, low: int, high: int, *, required: bool = False,
         multiple: int = 1) -> None:
    if name not in body:
        if required:
            raise Invalid(f"{name} is required")
        return
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high or value % multiple:
        extra = f" in multiples of {multiple}" if multiple > 1 else ""
        raise Invalid(f"{name} must be an integer between {low} and {high}{extra}")


def _num(body: dict[str, Any], name: str, low: float, high: float, *, required: bool = False) -> None:
    if name not in body:
        if required:
            raise Invalid(f"{name} is required")
        return
    value = body[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise Invalid(f"{name} must be a number between {low:g} and {high:g}")


def _enum(body: dict[str, Any], name: str, allowed: set[str], *, required: bool = False) -> None:
    if name not in body:
        if required:
            raise Invalid(f"{name} is required")
        return
    if body[name] not in allowed:
        raise Invalid(f"{name} must be one of {', '.join(sorted(allowed))}")


def _prompt(body: dict[str, Any]) -> None:
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        raise Invalid("Prompt is Mandatory and must be string")


def _image(body: dict[str, Any], name: str, *, required: bool) -> None:
    value = body.get(name)
    if value is None:
        if required:
            raise Invalid(f"{name} is required")
        return
    if not isinstance(value, str) or value.startswith("data:"):
        raise Invalid(f"{name} must be an image URL or a base64 string")
    if not value.startswith(("http://", "https://")):
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            raise Invalid(f"{name} is not valid base64") from None


def _schnell(body: dict[str, Any]) -> None:
    _prompt(body)
    _int(body, "steps", 1, 8)
    _int(body, "seed", 0, 2**63)
    _enum(body, "sampler_name", SAMPLERS)
    _enum(body, "scheduler", SCHEDULERS)
    _int(body, "samples", 1, 10)
    _int(body, "width", 512, 2048, multiple=8)
    _int(body, "height", 512, 2048, multiple=8)
    _num(body, "denoise", 0, 1)


def _dev(body: dict[str, Any]) -> None:
    _prompt(body)
    _int(body, "samples", 1, 10)
    _num(body, "guidance", 0, 10)
    _num(body, "prompt_strength", 0, 1)
    _enum(body, "aspect_ratio", DEV_RATIOS)
    _int(body, "seed", 0, 2**63)
    _enum(body, "output_format", {"webp", "jpg", "png"})
    _int(body, "output_quality", 0, 100)


def _kontext_pro(body: dict[str, Any]) -> None:
    _prompt(body)
    _image(body, "input_image", required=False)
    _enum(body, "aspect_ratio", KONTEXT_RATIOS)
    _enum(body, "output_format", {"jpg", "png"})
    _int(body, "safety_tolerance", 0, 6)
    if body.get("input_image") and body.get("safety_tolerance", 2) > 2:
        raise Invalid("safety_tolerance must be at most 2 when an input image is used")
    _int(body, "seed", 0, 2**63)


def _img2img(body: dict[str, Any]) -> None:
    _prompt(body)
    _image(body, "image", required=True)
    _int(body, "steps", 1, 50, required=True)
    _int(body, "seed", 0, 2**63)
    _num(body, "denoise", 0, 1, required=True)
    _enum(body, "scheduler", SCHEDULERS | {"beta"}, required=True)
    _enum(body, "sampler_name", SAMPLERS, required=True)
    if "base64" in body and not isinstance(body["base64"], bool):
        raise Invalid("base64 must be a boolean")


VALIDATORS = {"flux-schnell": _schnell, "flux-dev": _dev, "flux-kontext-pro": _kontext_pro,
              "flux-img2img": _img2img}

__all__ = ["SegmindFake"]
