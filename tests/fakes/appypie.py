"""A wire-level fake of AppyPie's Flux Schnell API, behind the Azure API Management gateway that fronts it.

What it reproduces, as the AppyPie page and Azure's API Management documentation describe it:
* The gateway's key check on `Ocp-Apim-Subscription-Key`: a missing key is HTTP 401
  `{"statusCode": 401, "message": "Access denied due to missing subscription key. ..."}`, a wrong one
  the same with "invalid subscription key" (the gateway's own answers, not the page's error table).
* `POST /flux-1-schnell/v1/getData` with JSON `prompt` (required), `num_steps` (1-8, default 4),
  `seed`, `height`, `width` (default 1024). Answers HTTP 200 `{"output": url}` synchronously;
  every such call (a model run the user may pay for) is appended to `ledger`.
* The page's own error bodies: missing/empty prompt -> 400 `{"error": "Invalid prompt parameter"}`;
  `num_steps` over 8 or any ill-typed field or non-JSON body -> 400 `{"error": "Invalid request
  parameters"}`; unknown path or method -> 404 `{"error": "Endpoint not found"}`; the 403 is
  `{"error": "Access denied for this operation"}`.
* Output files are served from the fake's own host (`/files/...`); the real ones live on a public R2 bucket.

Knobs (set by tests): `no_output` (how many of the next accepted calls answer the page's
200 `{"msg": "Image Getting Created"}` without an image; they still run, so they go to the
ledger), and the shared ones of `FakeBase`: `submit_errors` (one entry per generate call, consumed even
when it is None; see `rate_limited()` for the gateway's 429 and the module constants for the page's
bodies), `echo_key`, `revoke()`. There is no status endpoint.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .base import FakeBase, Injected
from .wire import json_response, png_bytes

PATH = "/flux-1-schnell/v1/getData"
MISSING_KEY = {"statusCode": 401, "message": "Access denied due to missing subscription key. Make sure to "
               "include subscription key when making requests to an API."}
INVALID_KEY = {"statusCode": 401, "message": "Access denied due to invalid subscription key. Make sure to "
               "provide a valid key for an active subscription."}
BAD_PARAMS = {"error": "Invalid request parameters"}
BAD_PROMPT = {"error": "Invalid prompt parameter"}
AUTH_ERROR = {"error": "Invalid or missing authentication"}
FORBIDDEN = {"error": "Access denied for this operation"}
NOT_FOUND = {"error": "Endpoint not found"}
RATE_LIMIT = {"error": "Rate limit exceeded, please retry later"}
SERVER_ERROR = {"error": "An unexpected error occurred, please try again later"}
IN_PROGRESS = {"msg": "Image Getting Created"}


def rate_limited(seconds: int = 60) -> Injected:
    """The API Management gateway's own 429, with its `retry-after` header."""
    return (429, {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {seconds} seconds."},
            {"retry-after": str(seconds)})


@dataclass
class AppyPieFake(FakeBase):
    key_headers = ("ocp-apim-subscription-key",)
    key: str
    no_output: int = 0
    bodies: list[Any] = field(default_factory=list)
    """Every request body received on the generate path, accepted or not."""
    headers: list[httpx2.Headers] = field(default_factory=list)
    image_size: tuple[int, int] = (64, 64)

    @property
    def expected_key(self) -> str:
        return self.key

    def unauthorized_answer(self, presented: str | None) -> Injected:
        return 401, (MISSING_KEY if presented is None else INVALID_KEY), {}

    def forbidden_answer(self) -> Injected:
        return 403, FORBIDDEN, {}

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = self.log(request)
        if request.method == "GET" and path.startswith("/files/"):
            png = png_bytes(*self.image_size)
            return httpx2.Response(200, content=png, headers={"content-type": "image/png"})
        if (refused := self.check_key(request)) is not None:
            return refused
        if request.method == "POST" and path == PATH:
            return self._generate(request)
        return json_response(404, NOT_FOUND)

    @property
    def generate_calls(self) -> int:
        """How many generate requests reached the fake (paid or refused)."""
        return self.requests.count(f"POST {PATH}")

    def _generate(self, request: httpx2.Request) -> httpx2.Response:
        self.headers.append(request.headers)
        try:
            body = json.loads(request.content)
        except ValueError:
            body = None
        self.bodies.append(body)
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        if not isinstance(body, dict) or "application/json" not in request.headers.get("content-type", ""):
            return json_response(400, BAD_PARAMS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return json_response(400, BAD_PROMPT)
        steps = body.get("num_steps", 4)
        if not _is_int(steps) or not 1 <= steps <= 8:
            return json_response(400, BAD_PARAMS)
        if any(k in body and not _is_int(body[k]) for k in ("seed", "height", "width")):
            return json_response(400, BAD_PARAMS)
        if any(k in body and body[k] <= 0 for k in ("height", "width")):
            return json_response(400, BAD_PARAMS)
        self.ledger.append(body)
        if self.no_output > 0:
            self.no_output -= 1
            return json_response(200, {"msg": self.echoed(IN_PROGRESS["msg"])})
        return json_response(200, {"output": self.file_url(request, f"prompt-{uuid.uuid4().hex[:12]}.png")})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
